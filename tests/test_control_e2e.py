"""Remote control end to end: a real `rw broker`, real `rw worker` pools, and the `rw drain`,
`rw pause` and `rw resume` commands over ipc://. The broker core's side of each is in
test_control.py.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from conftest import Cluster, alive, wait_for

pytestmark = pytest.mark.timeout(90)


def pid_of(result: bytes) -> int:
    return int(result.split(b":", 1)[0])


def config(cluster: Cluster) -> str:
    """A config file naming the cluster's endpoints, so rw commands need no flags."""
    path = cluster.root / "rw.toml"
    path.write_text(f'[client]\nbroker = "{cluster.clients}"\nstatus = "{cluster.status}"\n')
    return str(path)


def worker(cluster: Cluster, name: str) -> dict | None:
    return next((w for w in cluster.snapshot()["workers"] if w["name"] == name), None)


def test_drain_one_busy_child_of_a_pool_then_all_and_the_pool_exits_0(cluster: Cluster) -> None:
    cluster.broker()
    pool = cluster.pool(n=2)
    conf = config(cluster)
    release = cluster.root / "release"
    with cluster.client() as c:
        job = c.submit(f"wait:{release}", tries=1)
        busy = wait_for(lambda: [w for w in cluster.snapshot()["workers"] if w["job"] == job], 10,
                        what="a worker to run the job")[0]
        name, pid = busy["name"], busy["pid"]
        other = next(w["name"] for w in cluster.snapshot()["workers"] if w["name"] != name)

        out = cluster.run("drain", name, "-c", conf)
        assert out.returncode == 0, out.stderr
        assert f"{name}: draining; leaves once job {job} is done" in out.stdout
        row = worker(cluster, name)
        assert row is not None and (row["state"], row["job"]) == ("draining", job)
        assert worker(cluster, other)["state"] == "idle"  # type: ignore[index]

        release.touch()  # the job in hand finishes; its result is delivered first
        assert pid_of(c.result(job, timeout=15)) == pid
        wait_for(lambda: not alive(pid), 10, what="the drained child to exit")
        wait_for(lambda: worker(cluster, name) is None, 10, what="the drained worker to say BYE")
        time.sleep(1.0)  # a pool that restarted it would have done so by now
        assert pool.popen.poll() is None
        assert len(pool.children()) == 1
        assert [w["name"] for w in cluster.snapshot()["workers"]] == [other]
        assert "was drained; not replacing it" in pool.output()
        assert pid_of(c.result(c.submit("still here"), timeout=10)) != pid  # the other one works
        info = c.query(job)
        assert info is not None and (info["state"], info["attempt"]) == ("done", 1)

    out = cluster.run("drain", "--all", "-c", conf)
    assert out.returncode == 0, out.stderr
    assert f"{other}: draining; idle, leaves now" in out.stdout
    assert pool.wait(15) == 0
    snap = cluster.snapshot()
    assert snap["workers"] == []
    totals = snap["totals"]
    assert (totals["done"], totals["retried"], totals["failed"], totals["lost_workers"],
            totals["drained"]) == (2, 0, 0, 0, 2)


def test_drain_asks_for_names_and_says_which_are_unknown(cluster: Cluster) -> None:
    cluster.broker()
    conf = config(cluster)
    assert cluster.run("drain", "-c", conf).returncode == 2  # names, --host or --all
    assert cluster.run("drain", "--all", "a:1", "-c", conf).returncode == 2
    out = cluster.run("drain", "nobody:1", "--host", "nowhere", "-c", conf)
    assert out.returncode == 1
    assert "nobody:1: no such worker or host" in out.stderr
    assert "nowhere: no such worker or host" in out.stderr
    out = cluster.run("drain", "nobody:1", "--json", "-c", conf)
    assert json.loads(out.stdout) == {"asked": [], "unknown": ["nobody:1"]}


def test_pause_and_resume_from_the_cli_keep_and_count_jobs_across_a_restart(cluster: Cluster) -> None:
    broker = cluster.broker()
    cluster.pool("jobs_fixtures:Tester", 1, "-q", "q", "-q", "other")
    conf = config(cluster)
    assert cluster.run("pause", "bad/name", "-c", conf).returncode == 2

    out = cluster.run("pause", "q", "-c", conf)
    assert out.returncode == 0 and "paused queue 'q': 0 jobs queued stay queued" in out.stdout
    again = cluster.run("pause", "q", "-c", conf)
    assert "queue 'q' was paused already (0 jobs queued)" in again.stdout
    with cluster.client() as c:
        ids = [c.submit(f"job {i}", id=f"p{i}", queue="q") for i in range(3)]
        c.wait_confirmed(ids, timeout=10)
        assert c.result(c.submit("elsewhere", queue="other"), timeout=10).endswith(b"elsewhere")
    submitted = cluster.run("submit", "-p", "one more", "--queue", "q", "--no-wait", "-c", conf)
    assert submitted.returncode == 0
    assert "queue 'q' is paused: its jobs wait until `rw resume q`" in submitted.stderr

    snap = json.loads(cluster.run("status", "--json", "-c", conf).stdout)
    assert snap["paused"] == ["q"]
    row = snap["queues"]["q"]
    assert (row["paused"], row["queued"], row["running"], row["idle"]) == (True, 4, 0, 1)
    assert snap["queues"]["other"]["paused"] is False
    shown = cluster.run("status", "--once", "-c", conf).stdout
    assert "q paused" in shown and "paused queues (nothing dispatched, jobs kept): q" in shown

    broker.signal(signal.SIGTERM)  # the pause is in the journal: a new broker keeps it
    assert broker.wait(10) == 0
    cluster.broker()
    wait_for(lambda: [w["state"] for w in cluster.workers_registered()] == ["idle"], 20,
             what="the worker to register again")
    snap = cluster.snapshot()
    assert snap["paused"] == ["q"] and snap["queues"]["q"]["queued"] == 4

    out = cluster.run("resume", "q", "-c", conf)
    assert out.returncode == 0
    assert "resumed queue 'q': 1 job sent to idle workers, 3 still queued" in out.stdout
    with cluster.client() as c:
        for i in range(3):
            assert c.result(f"p{i}", timeout=15).endswith(f"job {i}".encode())
    wait_for(lambda: cluster.snapshot()["totals"]["done"] == 4, 10, what="every job to run")
    snap = cluster.snapshot()
    assert snap["paused"] == [] and not snap["queues"].get("q", {}).get("paused")
    out = cluster.run("resume", "q", "-c", conf)
    assert "queue 'q' was not paused: 0 jobs sent to idle workers, 0 still queued" in out.stdout


def test_a_drained_child_still_stops_warmly_when_its_pool_is_stopped(cluster: Cluster) -> None:
    cluster.broker()
    pool = cluster.pool(n=1)
    conf = config(cluster)
    release = cluster.root / "release"
    with cluster.client() as c:
        job = c.submit(f"wait:{release}", tries=1)
        busy = wait_for(lambda: [w for w in cluster.snapshot()["workers"] if w["job"] == job], 10,
                        what="the worker to run the job")[0]
        assert cluster.run("drain", busy["name"], "-c", conf).returncode == 0
        wait_for(lambda: "asked this worker to drain" in pool.output(), 10,
                 what="the worker to read the DRAIN")
        pool.signal(signal.SIGTERM)  # the pool forwards it: with the drain, still one warm stop
        wait_for(lambda: "stopping: each worker finishes" in pool.output(), 10,
                 what="the pool to take the signal")
        time.sleep(0.5)  # a forced stop would have handed the job back by now
        info = c.query(job)
        assert info is not None and info["state"] == "running"
        release.touch()
        assert pid_of(c.result(job, timeout=15)) == busy["pid"]
    assert pool.wait(15) == 0
    totals = cluster.snapshot()["totals"]
    assert (totals["done"], totals["retried"], totals["lost_workers"]) == (1, 0, 0)
