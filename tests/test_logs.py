"""Log output of real processes: JSON lines, a job followed by its id, text unchanged."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import Cluster, Proc, wait_for

pytestmark = pytest.mark.timeout(90)

REQUIRED = ("time", "level", "logger", "message", "pid")
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[\d+\] [\w.]+ (DEBUG|INFO|WARNING|ERROR) ")


def start(cluster: Cluster, *args: str, name: str) -> tuple[Proc, Path]:
    """``rw ARGS`` with stderr in a file of its own (the log), stdout in the Proc's log."""
    out = cluster.root / f"{name}.out"
    err = cluster.root / f"{name}.err"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        popen = subprocess.Popen([sys.executable, "-m", "respworkers", *args], cwd=cluster.root,
                                 env=cluster.env, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL)
    proc = Proc(popen, out)
    cluster.procs.append(proc)
    return proc, err


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the file as a JSON object with the required keys (else the test fails)."""
    records = []
    for line in path.read_text().splitlines():
        record = json.loads(line)  # a line that is not JSON fails here, showing it
        assert isinstance(record, dict), line
        for key in REQUIRED:
            assert key in record, (key, line)
        assert ISO_MS.match(record["time"]), line
        assert isinstance(record["pid"], int), line
        records.append(record)
    return records


def stop(proc: Proc) -> None:
    proc.children()
    proc.signal(signal.SIGTERM)
    proc.wait(20)


def test_json_logs_follow_a_job_by_id(cluster: Cluster) -> None:
    broker, broker_err = start(
        cluster, "broker", "--clients", cluster.clients, "--workers", cluster.workers,
        "--status", cluster.status, "--journal", cluster.journal, "--backoff", "0.2",
        "--log-format", "json", "--log-level", "debug", name="broker")
    wait_for(lambda: cluster.try_status() is not None, 15, what="the broker to answer")
    pool, pool_err = start(cluster, "worker", "jobs_fixtures:Tester", "--broker", cluster.workers,
                           "-n", "2", "--log-format", "json", name="pool")
    wait_for(lambda: len(cluster.workers_registered()) >= 2, 20, what="2 workers to register")
    marker = cluster.root / "raised"
    with cluster.client() as client:
        ok = client.submit(b"hello", id="job-ok")
        flaky = client.submit(f"raise-once:{marker}", id="job-flaky", priority=7)
        bad = client.submit(b"raise", id="job-bad", tries=1)
        outcomes = {o.id: o for o in client.results([ok, flaky, bad], timeout=30)}
    assert outcomes[flaky].status == "done" and outcomes[bad].status == "failed"
    stop(pool)
    stop(broker)

    records = json_lines(broker_err)
    assert any(r["message"].startswith("broker ") and "listening" in r["message"] for r in records)
    steps = [r for r in records if r.get("job") == flaky]
    assert [r["level"] for r in steps] == ["debug"] * len(steps)
    kinds = [r["message"].split()[2] for r in steps]
    assert kinds[:1] == ["accepted:"], steps
    accepted, first, retried, second, done = steps[:5]
    assert accepted["queue"] == "default" and accepted["options"] == {"priority": 7}
    assert "dispatched to worker" in first["message"] and first["attempt"] == 1 and first["worker"]
    assert "retried in" in retried["message"] and retried["attempt"] == 1
    assert retried["reason"] == "error" and "asked to raise once" in retried["error"]
    assert ISO_MS.match(retried["retry_at"]) and retried["worker"] == first["worker"]
    assert "dispatched to worker" in second["message"] and second["attempt"] == 2
    assert done["message"] == f"job {flaky} done (attempt 2)" and done["state"] == "done"
    assert done["worker"] == second["worker"] and len(steps) == 5
    failed = [r for r in records if r.get("job") == bad][-1]
    assert failed["state"] == "failed" and failed["reason"] == "error"
    assert "asked to raise" in failed["error"]
    assert [r.get("state") for r in records if r.get("job") == ok][-1] == "done"

    pool_records = json_lines(pool_err)
    assert any("serving default" in r["message"] for r in pool_records)  # the startup line
    raised = [r for r in pool_records if r.get("job") == flaky]
    assert raised and raised[0]["level"] == "warning" and raised[0]["attempt"] == 1
    assert raised[0]["reason"] == "error" and raised[0]["pid"] != pool.pid  # a child logged it
    assert "asked to raise once" in raised[0]["message"]


def test_spawned_workers_log_json_too(cluster: Cluster) -> None:
    """--reload starts children by spawn: they set up JSON logging themselves."""
    cluster.broker()
    pool, pool_err = start(cluster, "worker", "jobs_fixtures:Tester", "--broker", cluster.workers,
                           "--reload", "--log-format", "json", name="pool")
    wait_for(lambda: len(cluster.workers_registered()) >= 1, 30, what="a worker to register")
    with cluster.client() as client:
        job = client.submit(b"raise", id="job-spawned", tries=1)
        assert client.outcome(job, timeout=30).status == "failed"
    stop(pool)
    records = json_lines(pool_err)
    raised = [r for r in records if r.get("job") == job]
    assert raised and raised[0]["pid"] != pool.pid and raised[0]["worker"].endswith(
        f":{raised[0]['pid']}")


def test_text_is_the_default_and_quiet_about_jobs_at_info(cluster: Cluster) -> None:
    broker = cluster.broker()
    pool = cluster.pool()
    with cluster.client() as client:
        assert client.run(b"hello").endswith(b"hello")
    stop(pool)
    stop(broker)
    broker_lines = broker.output().splitlines()
    assert any(TEXT_LINE.match(line) and " broker " in line and " listening: clients " in line
               for line in broker_lines), broker_lines
    assert not any(" accepted: " in line or " dispatched " in line for line in broker_lines)
    assert any(TEXT_LINE.match(line) and "serving default, broker" in line
               for line in pool.output().splitlines())


def test_bad_log_format_is_a_usage_error(cluster: Cluster, tmp_path: Path) -> None:
    conf = tmp_path / "rw.toml"
    conf.write_text('[broker]\nlog_format = "xml"\n')
    done = cluster.run("broker", "-c", str(conf))
    assert done.returncode == 2
    assert f'{conf}: [broker] log_format: must be "text"' in done.stderr
    conf.write_text('[client]\nlog_format = "yaml"\n')
    done = cluster.run("status", "--once", "-c", str(conf))
    assert done.returncode == 2 and "[client] log_format: must be" in done.stderr
    done = cluster.run("worker", "jobs_fixtures:Tester", "--log-format", "xml")
    assert done.returncode == 2 and "--log-format" in done.stderr and "'xml'" in done.stderr
