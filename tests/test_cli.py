"""The `rw` command as users run it: real subprocesses, real exit codes, real output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import Cluster, wait_for

pytestmark = pytest.mark.timeout(60)


def test_submit_batch_json_and_exit_codes(cluster: Cluster) -> None:
    cluster.broker("--tries", "2")
    cluster.pool(n=2)
    jobs = cluster.root / "jobs.json"
    jobs.write_text(json.dumps([
        {"payload": "one", "id": "job-1"},
        {"payload": {"k": [1, 2]}, "id": "job-2"},
        {"payload": "raise", "id": "job-3", "tries": 1},
    ]))
    done = cluster.run("submit", str(jobs), "--broker", cluster.clients, "--json")
    assert done.returncode == 1, done.stderr  # one job failed
    lines = {line["id"]: line for line in map(json.loads, done.stdout.splitlines())}  # arrival order
    assert sorted(lines) == ["job-1", "job-2", "job-3"]
    assert lines["job-1"]["status"] == "done" and lines["job-1"]["result"].endswith(":one")
    assert lines["job-2"]["result"].endswith(':{"k": [1, 2]}')  # non-strings are sent as JSON text
    assert lines["job-3"]["status"] == "failed" and "ValueError" in lines["job-3"]["error"]

    ok = cluster.run("submit", "-", "--broker", cluster.clients,
                     input='{"payload": "a"}\n{"payload": "b", "timeout": 5}\n')
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("✓") == 2


def test_submit_and_result_print_each_outcome_as_it_arrives(cluster: Cluster) -> None:
    cluster.broker()
    cluster.pool(n=2)
    jobs = cluster.root / "jobs.json"
    jobs.write_text(json.dumps([{"payload": "sleep:60", "id": "slow"}, {"payload": "quick", "id": "fast"}]))
    sub = cluster.rw("submit", str(jobs), "--broker", cluster.clients, "--json", name="submit")
    wait_for(lambda: '"id": "fast"' in sub.output(), 20, what="the quick job's line")
    assert sub.popen.poll() is None and "slow" not in sub.output()
    res = cluster.rw("result", "slow", "fast", "--broker", cluster.clients, name="result")
    wait_for(lambda: "✓ fast" in res.output(), 20, what="the quick job's line from rw result")
    assert res.popen.poll() is None and "slow" not in res.output()
    cancel = cluster.run("cancel", "slow", "--broker", cluster.clients)
    assert cancel.returncode == 0, cancel.stderr
    assert sub.wait(20) == 1 and res.wait(20) == 1  # a job did not succeed
    lines = [json.loads(line) for line in sub.output().splitlines() if line.startswith("{")]
    assert [(line["id"], line["status"]) for line in lines] == [("fast", "done"), ("slow", "cancelled")]
    assert res.output().index("✓ fast") < res.output().index("✗ slow  cancelled")


def test_submit_into_a_closed_pipe_stops_quietly(cluster: Cluster) -> None:
    cluster.broker()
    cluster.pool(n=1)
    read, write = os.pipe()
    os.close(read)  # like `rw submit ... | head -0`: the reader is gone before the first line
    try:
        done = subprocess.run([sys.executable, "-m", "respworkers", "submit", "-p", "a", "-p", "b",
                               "--broker", cluster.clients], cwd=cluster.root, env=cluster.env,
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=30)
    finally:
        os.close(write)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_submit_prints_what_ended_and_what_runs_then_rerun_attaches(
    cluster: Cluster, signum: int
) -> None:
    cluster.broker()
    cluster.pool(n=2)
    jobs = cluster.root / "jobs.json"  # no ids: derived from the file's content
    jobs.write_text(json.dumps([{"payload": "a"}, {"payload": "b"}]
                               + [{"payload": "sleep:30"}] * 6))
    sub = cluster.rw("submit", str(jobs), "--broker", cluster.clients, "--json", name="submit")
    wait_for(lambda: len(json_lines(sub.output())) == 2, 20, what="the two quick results")
    sub.signal(signum)
    assert sub.wait(15) == 0
    lines = json_lines(sub.output())
    assert len(lines) == 8 and len({line["id"] for line in lines}) == 8
    assert [line["status"] for line in lines] == ["done"] * 2 + ["pending"] * 6
    assert "6 of 8 jobs had not ended" in sub.output() and "rw result ID" in sub.output()
    assert "run the same command again" in sub.output()
    first_ids = [line["id"] for line in lines]
    submitted = cluster.snapshot()["totals"]["submitted"]
    assert submitted == 8

    again = cluster.run("submit", str(jobs), "--broker", cluster.clients, "--json", "--no-wait")
    assert again.returncode == 0, again.stderr
    assert sorted(line["id"] for line in json_lines(again.stdout)) == sorted(first_ids)
    assert cluster.snapshot()["totals"]["submitted"] == submitted  # attached, nothing ran twice
    fresh = cluster.run("submit", str(jobs), "--broker", cluster.clients, "--json", "--no-wait",
                        "--new-ids")
    assert not {line["id"] for line in json_lines(fresh.stdout)} & set(first_ids)
    assert cluster.snapshot()["totals"]["submitted"] == submitted + 8


def test_submit_on_a_terminal_prints_lines_above_the_bar_and_ctrl_c_leaves_it_clean(
    cluster: Cluster,
) -> None:
    cluster.broker()
    cluster.pool(n=2)
    jobs = cluster.root / "jobs.json"
    jobs.write_text(json.dumps([{"payload": f"quick-{i}", "id": f"q{i}"} for i in range(12)]
                               + [{"payload": "sleep:30", "id": f"s{i}"} for i in range(3)]))
    term = cluster.rw_tty("submit", str(jobs), "--broker", cluster.clients, name="submit")
    wait_for(lambda: sum(row.startswith("✓ q") for row in term.lines()) == 12, 20,
             what="the quick jobs' lines")
    wait_for(lambda: "jobs" in term.text() and "12/15" in term.text(), 10, what="the progress bar")
    term.press(b"\x03")
    assert term.wait(15) == 0
    rows = term.lines()
    assert sum(row.startswith("✓ q") for row in rows) == 12, term.text()
    assert [row for row in rows if row.startswith("… ")] == [f"… s{i}  pending" for i in range(3)]
    assert "12/15" not in term.text() and "Traceback" not in term.output()  # the bar is gone


def test_interrupted_result_lists_the_jobs_still_running(cluster: Cluster) -> None:
    cluster.broker()
    cluster.pool(n=1)
    with cluster.client() as c:
        c.submit_many([{"payload": "x", "id": "quick"}, {"payload": "sleep:30", "id": "long"}])
        c.wait_confirmed(["quick", "long"], timeout=10)
    res = cluster.rw("result", "long", "quick", "--broker", cluster.clients, name="result")
    wait_for(lambda: "✓ quick" in res.output(), 20, what="the quick result")
    res.signal(signal.SIGINT)
    assert res.wait(15) == 0
    assert "… long  pending" in res.output() and "1 of 2 jobs had not ended" in res.output()


def test_submit_resubmitting_an_id_returns_the_same_result(cluster: Cluster) -> None:
    cluster.broker()
    cluster.pool(n=1)
    first = cluster.run("submit", "-p", "x", "--broker", cluster.clients, "--json")
    job_id = json.loads(first.stdout)["id"]
    again = cluster.run("submit", "-", "--broker", cluster.clients, "--json",
                        input=json.dumps({"id": job_id, "payload": "different"}))
    assert json.loads(again.stdout)["result"] == json.loads(first.stdout)["result"]
    assert cluster.snapshot()["totals"]["submitted"] == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ('[{"payload": "a"},\n {"payload": "b", "prio": 3}]', "line 2 (job 2): unknown field 'prio'"),
        ('{"payload": "a"}\n{"id": "x"}\n', "line 2: missing field 'payload'"),
        ('{"payload": "a"}\n{"payload": \n', "line 2: invalid JSON"),
        ('[{"payload": "a", "timeout": -1}]', "field 'timeout'"),
        ('[{"payload": "a", "id": "x"}, {"payload": "b", "id": "x"}]', "already used on line 1"),
        ("", "no jobs"),
    ],
)
def test_submit_rejects_bad_job_files_and_submits_nothing(
    cluster: Cluster, text: str, message: str
) -> None:
    cluster.broker()
    bad = cluster.run("submit", "-", "--broker", cluster.clients, input=text)
    assert bad.returncode == 2
    assert message in bad.stderr and "nothing was submitted" in bad.stderr
    assert cluster.snapshot()["totals"]["submitted"] == 0


def test_submit_without_broker_says_so(cluster: Cluster) -> None:
    conf = cluster.root / "c.toml"
    conf.write_text('[client]\nrequest_timeout = 0.5\n')
    r = cluster.run("submit", "-p", "x", "-c", str(conf), "--broker", cluster.clients, timeout=20)
    assert r.returncode == 3
    assert "no answer from the broker" in r.stderr


def test_status_once_json_and_unreachable(cluster: Cluster) -> None:
    cluster.broker()
    cluster.pool(n=2)
    raw = cluster.run("status", "--status", cluster.status, "--json")
    assert raw.returncode == 0
    snap = json.loads(raw.stdout)
    assert len(snap["workers"]) == 2
    assert {"id", "name", "host", "pid", "state", "job", "busy_for", "done", "failed",
            "last_seen"} <= set(snap["workers"][0])
    assert {"submitted", "done", "retried", "failed"} <= set(snap["totals"])
    assert snap["queues"]["default"]["workers"] == 2

    table = cluster.run("status", "--status", cluster.status, "--once")
    assert table.returncode == 0 and "workers" in table.stdout and "default" in table.stdout

    conf = cluster.root / "c.toml"
    conf.write_text('[client]\nrequest_timeout = 0.5\n')
    gone = cluster.run("status", "-c", str(conf), "--status", f"ipc://{cluster.root}/nobody",
                       "--once", timeout=15)
    assert gone.returncode == 3 and "no answer from the broker's status endpoint" in gone.stderr


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_live_status_stops_cleanly(cluster: Cluster, stop: str) -> None:
    cluster.broker()
    broker_id = cluster.snapshot()["broker"]["id"]  # only a real snapshot shows it
    live = cluster.rw_tty("status", "--status", cluster.status, name="status")
    wait_for(lambda: f"broker {broker_id}" in live.text(), 20, what="a snapshot on the screen")
    if stop == "ctrl-c":
        live.press(b"\x03")
    else:
        live.signal(signal.SIGTERM)
    assert live.wait(10) == 0
    rows = live.lines()
    assert sum(f"broker {broker_id}" in row for row in rows) == 1, live.text()  # redrawn in place
    assert sum(row.startswith("now: queued") for row in rows) == 1, live.text()
    assert "Traceback" not in live.output() and "Aborted" not in live.output()


def test_live_status_ctrl_c_while_the_broker_is_away_leaves_no_stray_lines(cluster: Cluster) -> None:
    conf = cluster.root / "c.toml"
    conf.write_text("[client]\nrequest_timeout = 0.3\n")
    # narrow: the message wraps and the panel spans the whole width, so the terminal's
    # echo of ^C after its last column would start a new line under the panel
    live = cluster.rw_tty("status", "-c", str(conf), "--status", f"ipc://{cluster.root}/nobody",
                          columns=60, name="status")
    wait_for(lambda: "retrying" in live.text(), 20, what="the unreachable panel")
    live.press(b"\x03")
    assert live.wait(10) == 0
    rows = [row for row in live.lines() if row]
    assert rows[0].startswith("╭") and sum(row.startswith("╭") for row in rows) == 1, live.text()
    assert sum(row.startswith("╰") for row in rows) == 1, live.text()


@pytest.mark.parametrize(
    "target, message",
    [
        ("no_such_module:X", "no module named 'no_such_module'"),
        ("jobs_fixtures:Missing", "has no attribute 'Missing'"),
        ("jobs_fixtures:NotAWorker", "not a subclass of respworkers.Worker"),
        ("jobs_fixtures:Lazy", "overrides neither process nor process_multipart"),
        ("jobs-fixtures", "expected MODULE:CLASS or MODULE"),
        ("jobs_fixtures", "is served by both"),  # every Worker class of the module
    ],
)
def test_bad_worker_target_fails_at_once(cluster: Cluster, target: str, message: str) -> None:
    r = cluster.run("worker", target, "--broker", cluster.workers, timeout=20)
    assert r.returncode == 2
    assert message in r.stderr


def test_bad_config_value_is_named(cluster: Cluster) -> None:
    conf = cluster.root / "bad.toml"
    conf.write_text("[broker]\ntries = 0\n")
    r = cluster.run("broker", "-c", str(conf))
    # a config file is not command-line usage: one line, no "Usage: ... Try 'rw broker --help'"
    assert r.returncode == 2 and r.stderr == f"rw: {conf}: [broker] tries: must be at least 1\n"
    conf.write_text("[broker]\ntimout = 3\n")
    r = cluster.run("broker", "-c", str(conf))
    assert r.returncode == 2 and "unknown key 'timout' (did you mean 'timeout'?)" in r.stderr
    assert "Usage:" not in r.stderr
    conf.write_text('[client]\nsecret_key = "nokey.key_secret"\nbroker_key = "broker.key"\n')
    r = cluster.run("submit", "-p", "x", "-c", str(conf))
    assert r.returncode == 2 and "Usage:" not in r.stderr
    assert r.stderr.startswith(f"rw: {conf}: [client] secret_key: no key file at "), r.stderr
    # a flag is usage: click's message, naming the option
    r = cluster.run("broker", "--timeout", "-1", "--clients", cluster.clients)
    assert r.returncode == 2 and "Usage: rw broker" in r.stderr
    assert "Invalid value for '--timeout': must be a number of seconds greater than 0" in r.stderr
    r = cluster.run("worker", "jobs_fixtures:Tester", "-q", "not ok")
    assert r.returncode == 2 and "Invalid value for '-q' / '--queue'" in r.stderr
    r = cluster.run("submit", "--no-such-option")
    assert r.returncode == 2 and "Usage: rw submit" in r.stderr and "No such option" in r.stderr


def test_bad_job_ids_are_usage_errors_not_a_silent_broker(cluster: Cluster) -> None:
    cluster.broker()
    for args in (["result", "ok-id", "bad id"], ["inspect", "a b"], ["cancel", "tab\there"]):
        r = cluster.run(*args, "--broker", cluster.clients, timeout=20)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("rw: bad job id: ") and "whitespace" in r.stderr, r.stderr
    r = cluster.run("inspect", "never-submitted", "--broker", cluster.clients, timeout=20)
    assert r.returncode == 1 and "does not know job 'never-submitted'" in r.stderr


def test_broker_reads_config_file_from_env_and_cwd(cluster: Cluster) -> None:
    conf = cluster.root / "respworkers.toml"  # found in the working directory
    conf.write_text(
        f'[broker]\nclients = "{cluster.clients}"\nworkers = "{cluster.workers}"\n'
        f'status = "{cluster.status}"\ntries = 7\njournal = "{cluster.journal}"\n'
        f'[client]\nbroker = "{cluster.clients}"\nstatus = "{cluster.status}"\n'
        f'[worker]\nbroker = "{cluster.workers}"\n'
    )
    cluster.rw("broker", name="broker")
    from conftest import wait_for

    snap = wait_for(cluster.try_status, 15, what="the broker configured from ./respworkers.toml")
    assert snap["broker"]["defaults"]["tries"] == 7
    cluster.rw("worker", "jobs_fixtures:Tester", name="worker")
    wait_for(lambda: cluster.workers_registered(), 15, what="the worker")
    r = cluster.run("submit", "-p", "hi")  # every endpoint from the file
    assert r.returncode == 0 and ":hi" in r.stdout


def test_inspect_and_cancel(cluster: Cluster) -> None:
    cluster.broker()  # no workers: jobs stay queued
    with cluster.client() as c:
        c.submit("x", id="waiting-job", queue="nobody")
        c.wait_confirmed(["waiting-job"], timeout=10)
    shown = cluster.run("inspect", "waiting-job", "--broker", cluster.clients, "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["state"] == "queued"
    gone = cluster.run("cancel", "waiting-job", "nope", "--broker", cluster.clients)
    assert "waiting-job: cancelled" in gone.stdout and "nope: unknown" in gone.stdout
    assert gone.returncode == 1
    table = cluster.run("inspect", "waiting-job", "--broker", cluster.clients)
    assert "cancelled" in table.stdout
    cluster.pool(n=1)
    with cluster.client() as c:
        assert c.outcome(c.submit("raise", id="bad-job", tries=1, timeout=90), timeout=10).status == "failed"
    shown = cluster.run("inspect", "bad-job", "--broker", cluster.clients).stdout
    assert "1 of 1" in shown and "1 min 30 s" in shown and "90.0" not in shown
    assert "['" not in shown and "None" not in shown
    last_error = shown[shown.index("last error:"):]
    assert "Traceback (most recent call last):" in last_error
    assert last_error.rstrip().endswith("ValueError: asked to raise")


def test_status_interval_must_be_at_least_a_tenth_of_a_second(cluster: Cluster) -> None:
    for bad in ("0", "-1", "0.05"):
        r = cluster.run("status", "--status", cluster.status, "--interval", bad, timeout=15)
        assert r.returncode == 2 and "--interval" in r.stderr and "0.1" in r.stderr, r.stderr


def test_keygen_creates_only_the_last_folder_level(cluster: Cluster) -> None:
    missing = cluster.root / "no-such-parent" / "keys"
    r = cluster.run("keygen", "app1", "-d", str(missing))
    assert r.returncode == 2
    assert f"its parent folder {missing.parent} does not exist" in r.stderr, r.stderr
    assert not missing.parent.exists()
    ok = cluster.run("keygen", "app1", "-d", str(cluster.root / "keys"))
    assert ok.returncode == 0, ok.stderr
    assert (cluster.root / "keys" / "app1.key").is_file()
    assert (cluster.root / "keys" / "app1.key_secret").stat().st_mode & 0o777 == 0o600


def test_a_second_broker_that_cannot_bind_leaves_no_journal_behind(cluster: Cluster) -> None:
    cluster.broker()
    other = cluster.root / "other.sqlite3"
    r = cluster.run("broker", "--clients", cluster.clients, "--workers", cluster.workers,
                    "--status", cluster.status, "--journal", str(other), timeout=30)
    assert r.returncode == 2 and "another process is listening there" in r.stderr
    assert not list(cluster.root.glob("other.sqlite3*"))
    sock = __import__("socket").socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:  # a port in use (tcp): the same, named by libzmq's error
        r = cluster.run("broker", "--clients", f"tcp://127.0.0.1:{sock.getsockname()[1]}",
                        "--workers", cluster.workers + "2", "--status", cluster.status + "2",
                        "--journal", str(other), timeout=30)
    finally:
        sock.close()
    assert r.returncode == 2 and "cannot bind the clients endpoint" in r.stderr
    assert not list(cluster.root.glob("other.sqlite3*"))


def test_no_wait_submit_leaves_no_waiting_client_behind(cluster: Cluster) -> None:
    cluster.broker()
    r = cluster.run("submit", "-p", "x", "--queue", "nobody", "--no-wait", "--broker", cluster.clients)
    assert r.returncode == 0
    job_id = r.stdout.strip()
    info = cluster.run("inspect", job_id, "--json", "--broker", cluster.clients)
    assert json.loads(info.stdout)["waiting_clients"] == 0
