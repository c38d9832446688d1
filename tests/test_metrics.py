"""Prometheus metrics ([broker] metrics): a real broker serving them over HTTP, scraped with
urllib while a real pool runs a batch and after it; the config key; the optional extra."""

from __future__ import annotations

import json
import re
import socket
import textwrap
import urllib.request
from pathlib import Path

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from respworkers import protocol
from respworkers.broker.metrics import MAX_QUEUE_LABELS, OTHER_QUEUE, Recorder
from respworkers.broker.model import DONE
from respworkers.config import Config, parse
from respworkers.errors import ConfigError
from respworkers.options import job_options

from conftest import Cluster, wait_for

pytestmark = pytest.mark.timeout(90)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int) -> Samples:
    """Every sample of the endpoint, parsed from the text format: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def exported_names(port: int) -> set[str]:
    """Every series name the endpoint declares, also of families without series yet."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {family.name + suffix for family in text_string_to_metric_families(text)
            for suffix in suffixes.get(family.type, ("",))}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def test_metrics_during_and_after_a_batch(cluster: Cluster) -> None:
    port = free_port()
    cluster.broker("--metrics", f"127.0.0.1:{port}", "--backoff", "0")
    pool = cluster.pool("jobs_fixtures:Tester", 2, "-q", "alpha", "-q", "beta")
    n_alpha, n_beta = 12, 8
    with cluster.client() as c:
        ids = [c.submit("sleep:0.15", queue="alpha") for _ in range(n_alpha)]
        ids += [c.submit("sleep:0.05", queue="beta") for _ in range(n_beta)]
        failing = c.submit("raise", queue="beta", tries=2)

        # During the batch: jobs wait and run, two workers are busy on this host.
        during = wait_for(lambda: (lambda s: s if total(s, "respworkers_queue_running",
                                                        queue="alpha") >= 1 else None)(scrape(port)),
                          10, what="a scrape showing a running alpha job")
        assert value(during, "respworkers_jobs_submitted_total") == n_alpha + n_beta + 1
        assert value(during, "respworkers_queue_depth", queue="alpha") >= 1
        assert total(during, "respworkers_queue_running") <= 2
        assert total(during, "respworkers_workers", state="busy") >= 1
        assert value(during, "respworkers_jobs_done_total") < n_alpha + n_beta

        outcomes = {o.id: o for o in c.results([*ids, failing], timeout=60)}
        assert all(outcomes[i].status == "done" for i in ids)
        assert outcomes[failing].status == "failed"

    # After it: the snapshot is at most half a second old.
    n = n_alpha + n_beta
    after = wait_for(lambda: (lambda s: s if total(s, "respworkers_jobs_done_total") == n
                              and total(s, "respworkers_workers", state="idle") == 2 else None)(
        scrape(port)), 10, what="the scrape to show the finished batch")
    host = socket.gethostname()
    assert value(after, "respworkers_jobs_submitted_total") == n + 1
    assert value(after, "respworkers_jobs_failed_total") == 1
    assert value(after, "respworkers_jobs_retried_total") == 1
    assert value(after, "respworkers_jobs_ended_total", queue="alpha", state="done") == n_alpha
    assert value(after, "respworkers_jobs_ended_total", queue="beta", state="done") == n_beta
    assert value(after, "respworkers_jobs_ended_total", queue="beta", state="failed") == 1
    assert value(after, "respworkers_workers", state="idle", host=host) == 2
    for queue in ("alpha", "beta"):
        assert value(after, "respworkers_queue_depth", queue=queue) == 0
        assert value(after, "respworkers_queue_running", queue=queue) == 0
        assert value(after, "respworkers_queue_workers", queue=queue) == 2
    # Histograms: one queue wait per job (its first start), one run time per attempt.
    assert value(after, "respworkers_queue_wait_seconds_count", queue="alpha") == n_alpha
    assert value(after, "respworkers_queue_wait_seconds_count", queue="beta") == n_beta + 1
    assert value(after, "respworkers_queue_wait_seconds_bucket", queue="alpha", le="+Inf") == n_alpha
    assert value(after, "respworkers_run_seconds_count", queue="alpha") == n_alpha
    assert value(after, "respworkers_run_seconds_count", queue="beta") == n_beta + 2
    # Every alpha attempt slept 0.15 s: none is in a bucket below it, the sum is at least that.
    assert value(after, "respworkers_run_seconds_bucket", queue="alpha", le="0.1") == 0
    assert value(after, "respworkers_run_seconds_sum", queue="alpha") >= 0.15 * n_alpha
    # 12 alpha jobs of 0.15 s on two workers: the last ones waited their turn.
    assert value(after, "respworkers_queue_wait_seconds_sum", queue="alpha") > 0.3
    commits = value(after, "respworkers_journal_commit_seconds_count")
    assert commits >= 1
    assert value(after, "respworkers_journal_commit_rows_count") == commits
    assert value(after, "respworkers_journal_commit_rows_sum") >= n + 1  # each job written once at least
    assert value(after, "respworkers_journal_failing") == 0
    assert value(after, "respworkers_jobs_refused_total") == 0
    assert total(after, "respworkers_bad_messages_total") == 0
    assert any(name == "process_cpu_seconds_total" for name, _ in after)
    pool.kill_all()
    # The shipped Grafana dashboard queries only series this broker serves.
    exported = exported_names(port)
    for name in dashboard_metrics():
        assert name in exported, f"deploy/grafana/respworkers.json queries {name}, not exported"


def dashboard_metrics() -> set[str]:
    """The metric names the Grafana dashboard's queries use (it must be valid JSON)."""
    dashboard = json.loads((Path(__file__).parent.parent / "deploy/grafana/respworkers.json")
                           .read_text())
    assert dashboard["templating"]["list"][0]["type"] == "datasource"
    assert dashboard["templating"]["list"][0]["query"] == "prometheus"
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    names = set(re.findall(r"\b((?:respworkers|process)_[a-z_]+)\b", " ".join(exprs)))
    assert "respworkers_queue_wait_seconds_bucket" in names and len(names) > 15
    return names


def test_bad_messages_and_refusals_are_counted(cluster: Cluster) -> None:
    """A raw client (no client-side checks): garbage, and a job over the broker's max_tries."""
    port = free_port()
    cluster.broker("--metrics", f"127.0.0.1:{port}")
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(cluster.clients)
        sock.send_multipart([b"RWC9 GARBAGE"])
        sock.send_multipart(protocol.encode_submit("too-many", "default", job_options(tries=1000),
                                                   [b"x"]))
        samples = wait_for(lambda: (lambda s: s if total(s, "respworkers_bad_messages_total") >= 1
                                    and total(s, "respworkers_jobs_refused_total") >= 1
                                    else None)(scrape(port)), 10, what="both to be counted")
        sock.close()
    finally:
        ctx.term()
    assert total(samples, "respworkers_bad_messages_total", socket="clients") == 1
    assert value(samples, "respworkers_jobs_refused_total") == 1
    assert value(samples, "respworkers_jobs_submitted_total") == 0


def test_a_taken_port_is_a_clear_error(cluster: Cluster) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = cluster.broker("--metrics", f"127.0.0.1:{port}", wait=False)
        assert proc.wait(20) == 2
    assert f"cannot serve metrics on 127.0.0.1:{port} ([broker] metrics)" in proc.output()
    assert not Path(cluster.journal).exists()  # a broker that could not start leaves nothing


def test_missing_prometheus_client_names_the_extra(cluster: Cluster, tmp_path: Path) -> None:
    """Run the broker where importing prometheus_client fails (a sitecustomize that blocks it)."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "prometheus_client" or name.startswith("prometheus_client."):
                    raise ImportError("No module named 'prometheus_client' (blocked by a test)")
                return None

        sys.meta_path.insert(0, Block())
    """))
    cluster.env["PYTHONPATH"] = f"{shim}:{cluster.env['PYTHONPATH']}"
    proc = cluster.broker("--metrics", f"127.0.0.1:{free_port()}", wait=False)
    assert proc.wait(20) == 2
    out = proc.output()
    assert "[broker] metrics needs the prometheus_client package" in out
    assert "pip install respworkers[metrics]" in out
    assert "Traceback" not in out
    assert not Path(cluster.journal).exists()
    # Without the key the same broker runs as ever: nothing imports the package.
    cluster.broker()
    assert cluster.snapshot()["broker"]["state"] == "running"


@pytest.mark.parametrize("text, message", [
    ("metrics = 9781", 'metrics: must be "HOST:PORT"'),
    ("metrics = '9781'", "'9781': must be \"HOST:PORT\""),
    ("metrics = 'http://127.0.0.1:9781'", 'must be "HOST:PORT"'),
    ("metrics = '127.0.0.1:99999'", "the port must be a number from 1 to 65535"),
    ("metrics = '127.0.0.1:0'", "the port must be a number from 1 to 65535"),
])
def test_bad_metrics_address_names_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(f"[broker]\n{text}\n", "conf.toml")
    assert str(err.value).startswith("conf.toml: [broker] metrics: ")
    assert message in str(err.value)


def test_good_metrics_addresses() -> None:
    assert Config().broker.metrics == ""
    for address in ("127.0.0.1:9781", "localhost:9781", "0.0.0.0:1", "[::1]:9781"):
        assert parse(f"[broker]\nmetrics = '{address}'\n", "c.toml").broker.metrics == address


def test_bad_metrics_flag_is_a_usage_error(cluster: Cluster) -> None:
    done = cluster.run("broker", "--metrics", "nonsense", "--journal", ":memory:", timeout=30)
    assert done.returncode == 2
    assert "--metrics" in done.stderr and "HOST:PORT" in done.stderr


def test_queue_labels_are_bounded() -> None:
    """A client inventing queue names cannot grow the series without end."""
    rec = Recorder()
    for i in range(MAX_QUEUE_LABELS + 50):
        rec.started(f"q{i}", 0.01)
        rec.answered(f"q{i}", 0.02)
        rec.finished(f"q{i}", DONE)
    assert len(rec.queues) == MAX_QUEUE_LABELS + 1
    other = rec.queues[OTHER_QUEUE]
    assert sum(other.wait.counts) == sum(other.run.counts) == other.done == 50
    assert rec.queues["q0"].wait.counts[3] == 1  # 0.01 s counts in le="0.01", the 4th bound
