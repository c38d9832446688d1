"""`rw` for the daily tools: job options from flags and job files, rw jobs, rw requeue,
rw purge, rw inspect's headline, and the warning for a queue nobody serves."""

from __future__ import annotations

import json

import pytest

from conftest import Cluster, wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(autouse=True)
def local_config(cluster: Cluster) -> None:
    """Every rw command finds the endpoints in ./respworkers.toml, as in a user's project."""
    (cluster.root / "respworkers.toml").write_text(
        f'[client]\nbroker = "{cluster.clients}"\nstatus = "{cluster.status}"\n'
        f'request_timeout = 3\n[worker]\nbroker = "{cluster.workers}"\n')


def lines_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_submit_options_from_flags_and_job_files_reach_the_broker(cluster: Cluster) -> None:
    cluster.broker()  # no worker yet: every job waits where the broker put it
    jobs = cluster.root / "jobs.json"
    jobs.write_text(json.dumps([
        {"payload": "a", "id": "file-opts", "priority": 9, "tenant": "acme", "expires": 600,
         "backoff": 2, "backoff_max": 30},
        {"payload": "b", "id": "file-eta", "eta": "2040-01-01T00:00:00Z"},
        {"payload": "c", "id": "flag-opts"},
    ]))
    sent = cluster.run("submit", str(jobs), "--no-wait", "--priority", "2", "--delay", "300",
                       "--tenant", "batch")
    assert sent.returncode == 0, sent.stderr
    # A queue no worker serves is named at once, on stderr.
    assert "no worker serves queue 'default' yet; waiting" in sent.stderr
    with cluster.client() as c:
        own = c.query("file-opts")
        assert own is not None
        # the job's own fields win; the flags fill in the rest (its --delay too)
        assert (own["priority"], own["tenant"], own["backoff"], own["backoff_max"]) == (9, "acme", 2, 30)
        assert own["state"] == "scheduled" and 250 < own["runs_in"] <= 300
        assert own["expires_at"] - own["created"] == pytest.approx(600, abs=1)
        eta = c.query("file-eta")
        assert eta is not None and eta["state"] == "scheduled"
        assert eta["runs_at"] == pytest.approx(2208988800, abs=1)  # its eta, not the --delay
        flags = c.query("flag-opts")
        assert flags is not None and (flags["priority"], flags["tenant"]) == (2, "batch")
    shown = cluster.run("inspect", "file-opts").stdout
    assert "scheduled: runs in" in shown and "tenant" in shown and "acme" in shown


@pytest.mark.parametrize("flags, message", [
    (("--priority", "10"), "10 is not in the range 0<=x<=9"),
    (("--delay", "-1"), "-1.0 is not in the range x>=0"),
    (("--eta", "tomorrow"), "--eta must be a time such as 2026-12-01T09:00:00Z"),
    (("--expires", "soon"), "--expires must be a time"),
    (("--tenant", "a b"), "--tenant: 'a b' is not 1..64 of [A-Za-z0-9._-]"),
    (("--delay", "5", "--eta", "2030-01-01T00:00:00Z"), "give --delay or --eta, not both"),
    (("--eta", "2099-01-01T00:00:00Z"), "--eta must be within 999999999 seconds (31 years)"),
    (("--backoff", "1e10"), "--backoff must be at most 999999999 seconds"),
])
def test_bad_option_flags_are_usage_errors_and_nothing_is_sent(cluster: Cluster, flags, message) -> None:
    r = cluster.run("submit", "-p", "x", *flags)  # no broker runs: nothing may be tried
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_bad_option_fields_in_a_job_file_name_the_line(cluster: Cluster) -> None:
    jobs = cluster.root / "jobs.jsonl"
    jobs.write_text('{"payload": "ok"}\n{"payload": "x", "priority": "high"}\n')
    r = cluster.run("submit", str(jobs))
    assert r.returncode == 2
    assert "line 2: field 'priority' must be a whole number from 0 to 9" in r.stderr, r.stderr
    assert "nothing was submitted" in r.stderr


def test_jobs_requeue_and_purge(cluster: Cluster) -> None:
    cluster.broker("--backoff", "0")
    cluster.pool(n=1)
    fail = cluster.run("submit", "-p", "raise", "-p", "fine", "--tries", "1", "--json")
    assert fail.returncode == 1
    failed_id = next(line["id"] for line in lines_of(fail.stdout) if line["status"] == "failed")
    with cluster.client() as c:
        for i in range(3):
            c.submit("x", id=f"idle-{i}", queue="nobody")
        c.wait_confirmed([f"idle-{i}" for i in range(3)], timeout=10)

    listed = cluster.run("jobs", "--json")
    assert listed.returncode == 0
    rows = lines_of(listed.stdout)
    assert [r["id"] for r in rows[:3]] == ["idle-2", "idle-1", "idle-0"]  # newest first
    failed = [r for r in rows if r["id"] == failed_id]
    assert failed and failed[0]["state"] == "failed" and "ValueError" in failed[0]["error"]
    only = lines_of(cluster.run("jobs", "--state", "queued", "--queue", "nobody", "--limit", "2",
                                "--json").stdout)
    assert [r["id"] for r in only] == ["idle-2", "idle-1"]
    table = cluster.run("jobs", "--state", "failed").stdout  # a pipe: whole ids, one line each
    assert table.splitlines()[0].split() == ["id", "queue", "state", "tries", "age", "error"]
    assert any(line.startswith(failed_id) and "1/1" in line for line in table.splitlines())

    again = cluster.run("requeue", "--failed")
    assert again.returncode == 0 and "requeued 1 job" in again.stdout, again.stderr
    with cluster.client() as c:
        info = wait_for(lambda: (i := c.query(failed_id)) and i["state"] == "failed" and i, 15,
                        what="the requeued job to fail again")
        assert len(info["history"]) == 1 and info["history"][0]["state"] == "failed"
    shown = cluster.run("inspect", failed_id).stdout
    assert "run 1: failed after 1 attempt(s)" in shown
    unknown = cluster.run("requeue", "no-such-job", "idle-0")
    assert unknown.returncode == 1
    assert "no-such-job: unknown" in unknown.stderr and "idle-0: not requeued (queued)" in unknown.stderr
    assert cluster.run("requeue").returncode == 2  # ids or --failed: one is needed

    refused = cluster.run("purge", "nobody")  # not a terminal and no --yes
    assert refused.returncode == 2 and "--yes" in refused.stderr
    purged = cluster.run("purge", "nobody", "--yes")
    assert purged.returncode == 0 and "cancelled 3 jobs waiting in queue 'nobody'" in purged.stdout
    assert lines_of(cluster.run("jobs", "--queue", "nobody", "--state", "queued", "--json").stdout) == []


def test_inspect_says_when_a_retry_runs(cluster: Cluster) -> None:
    cluster.broker("--backoff", "60")
    cluster.pool(n=1)
    with cluster.client() as c:
        job = c.submit("raise", tries=3)
        wait_for(lambda: (c.query(job) or {}).get("state") == "scheduled", 15,
                 what="the job to wait for its retry")
    shown = cluster.run("inspect", job).stdout
    assert f"job {job}: retry 2 of 3 in" in shown, shown
    listed = cluster.run("status", "--once").stdout
    assert "scheduled 1" in listed and "oldest waits" in listed


def test_a_single_jobs_progress_shows_on_a_terminal(cluster: Cluster) -> None:
    cluster.broker()
    cluster.pool("jobs_fixtures:Tester", 1)
    term = cluster.rw_tty("submit", "-p", "progress:5:0.4")
    seen = wait_for(lambda: "step 3 of 5" in term.text() and term.text(), 20,
                    what="the job's progress on the terminal")
    assert "━" in seen  # the bar, filled to the reported fraction
    assert term.wait(20) == 0
    assert ":progress:5:0.4" in term.text() and "step" not in term.text()  # the bar is gone
