"""Pools as operators run them: recycling, autoscaling, several classes in one pool, hooks,
--reload. Real broker and worker processes; every test counts its jobs (none lost, none
charged a try) from the broker's own records."""

from __future__ import annotations

import os
import signal
import textwrap
import time
from typing import Any

import pytest

from conftest import Cluster, wait_for

pytestmark = pytest.mark.timeout(120)


def pid_of(frames: bytes) -> int:
    return int(frames.split(b":", 1)[0])


def one_attempt_each(c: Any, ids: list[str]) -> None:
    """Every job done at its first attempt: nothing was lost or charged a try."""
    infos = [c.query(i) for i in ids]
    assert all(i is not None and i["state"] == "done" for i in infos), infos
    assert [i["attempt"] for i in infos] == [1] * len(ids), [i["attempt"] for i in infos]


# ====================================================================== recycling
def test_max_jobs_per_child_replaces_processes_without_losing_or_charging(cluster: Cluster) -> None:
    cluster.broker()
    pool = cluster.pool("jobs_fixtures:Tester", 2, "--max-jobs-per-child", "5")
    with cluster.client() as c:
        ids = c.submit_many([b"sleep:0.01"] * 40)
        results = {r.id: r for r in c.results(ids, timeout=60)}
        assert all(r.ok for r in results.values())
        one_attempt_each(c, ids)
    pids = [pid_of(r.frames[0]) for r in results.values()]  # type: ignore[index]
    per_pid = {p: pids.count(p) for p in set(pids)}
    assert max(per_pid.values()) <= 5 and len(per_pid) >= 8, per_pid
    totals = cluster.snapshot()["totals"]
    assert (totals["retried"], totals["lost_workers"], totals["failed"]) == (0, 0, 0), totals
    wait_for(lambda: len(cluster.workers_registered()) == 2, 15, what="two workers again")
    assert "recycled; starting a fresh one" in pool.output()
    pool.signal(signal.SIGTERM)
    assert pool.wait(15) == 0


def test_max_memory_per_child_replaces_a_process_after_the_job_that_grew_it(
        cluster: Cluster) -> None:
    cluster.broker()
    pool = cluster.pool("pool_fixtures:Grower", 1, "--max-memory-per-child", "150")
    with cluster.client() as c:
        first = pid_of(c.run(b"x", queue="grow") + b":")
        again = pid_of(c.run(b"grow:40", queue="grow") + b":")  # still under the limit
        grown = pid_of(c.run(b"grow:200", queue="grow") + b":")  # answered, then recycled
        after = pid_of(c.run(b"x", queue="grow") + b":")
        assert first == again == grown != after
    totals = cluster.snapshot()["totals"]
    assert (totals["retried"], totals["lost_workers"]) == (0, 0), totals
    assert "over max_memory_per_child 150 MB" in pool.output()


# ====================================================================== autoscaling
def test_autoscale_grows_to_max_under_a_burst_and_shrinks_back(cluster: Cluster) -> None:
    cluster.broker()
    pool = cluster.rw("worker", "jobs_fixtures:Tester", "--broker", cluster.workers, "-n", "2:8",
                      "--scale-down-after", "1.5", name="autoscale")
    wait_for(lambda: len(cluster.workers_registered()) == 2, 20, what="the pool's first 2")
    sizes: list[int] = []
    with cluster.client() as c:
        ids = c.submit_many([b"sleep:0.2"] * 240)
        deadline = time.monotonic() + 60
        pending = set(ids)
        while pending and time.monotonic() < deadline:
            try:
                for r in c.results(list(pending), timeout=0.5):
                    assert r.ok, r
                    pending.discard(r.id)
            except TimeoutError:  # the half second is up: look at the pool's size
                pass
            sizes.append(len(cluster.workers_registered()))
        assert not pending
        one_attempt_each(c, ids)
    print(f"\n[autoscale] workers registered, sampled every ~0.5 s: {sizes}")
    assert max(sizes) == 8, sizes
    wait_for(lambda: len(cluster.workers_registered()) == 2, 30, what="the pool to shrink to 2")
    totals = cluster.snapshot()["totals"]
    assert (totals["done"], totals["retried"], totals["lost_workers"]) == (240, 0, 0), totals
    out = pool.output()
    assert "busy: starting" in out and "retiring it" in out
    pool.signal(signal.SIGTERM)
    assert pool.wait(15) == 0


def test_pool_size_is_checked(cluster: Cluster) -> None:
    for bad in ("0", "5:2", "two", "2:"):
        r = cluster.run("worker", "jobs_fixtures:Tester", "--broker", cluster.workers, "-n", bad)
        assert r.returncode == 2 and "-n" in r.stderr, (bad, r.stderr)


# ====================================================================== several classes, hooks
def test_a_module_target_serves_every_class_by_queue_with_their_own_settings(
        cluster: Cluster) -> None:
    cluster.broker()
    cluster.env["HOOK_LOG"] = str(cluster.root / "hooks.log")
    pool = cluster.pool("pool_fixtures", 1)
    (row,) = cluster.workers_registered()
    assert set(row["queues"]) == {"upper", "lower", "grow", "hooked"}
    with cluster.client() as c:
        up = c.run(b"Mixed", queue="upper")
        low = c.run(b"Mixed", queue="lower")
        assert up.endswith(b":MIXED") and low.endswith(b":mixed") and pid_of(up) == pid_of(low)
        job = c.submit(b"retry-once", queue="lower")  # Lower's own backoff: about 0.25 s
        assert c.outcome(job, timeout=10).ok
        info = c.query(job)
        assert info is not None and info["attempt"] == 2
    pool.signal(signal.SIGTERM)
    assert pool.wait(15) == 0


def test_several_targets_and_their_queues(cluster: Cluster) -> None:
    cluster.broker()
    cluster.pool("pool_fixtures:Upper", 1, "pool_fixtures:Lower")  # two targets, one pool
    with cluster.client() as c:
        assert c.run(b"a", queue="upper").endswith(b":A")
        assert c.run(b"B", queue="lower").endswith(b":b")
    r = cluster.run("worker", "pool_fixtures:Upper", "pool_fixtures:Lower", "-q", "upper",
                    "--broker", cluster.workers)
    assert r.returncode == 2 and "applies to one worker class" in r.stderr


def test_hooks_see_every_attempt_and_a_broken_hook_changes_nothing(cluster: Cluster) -> None:
    cluster.broker()
    log = cluster.root / "hooks.log"
    cluster.env["HOOK_LOG"] = str(log)
    pool = cluster.pool("pool_fixtures:Hooked", 1)
    with cluster.client() as c:
        assert c.outcome(c.submit(b"ok", queue="hooked", id="ok-1"), timeout=10).ok
        assert c.outcome(c.submit(b"retry", queue="hooked", id="retry-1"), timeout=10).ok
        failed = c.outcome(c.submit(b"raise", queue="hooked", id="raise-1", tries=1), timeout=10)
        assert failed.status == "failed" and "bad luck" in (failed.error or "")
        assert c.outcome(c.submit(b"fail", queue="hooked", id="fail-1"), timeout=10).status == "failed"
        assert c.outcome(c.submit(b"ok", queue="hooked", id="hook-raises-1"), timeout=10).ok
    pool.signal(signal.SIGTERM)
    assert pool.wait(15) == 0
    lines = log.read_text().splitlines()
    assert lines[:3] == ["before ok-1 1 hooked", "after ok-1 done True",
                         "before retry-1 1 hooked"]
    assert "failure retry-1 Retry" in lines and "after retry-1 retry True" in lines
    assert "after retry-1 done True" in lines
    assert "failure raise-1 ValueError" in lines and "after raise-1 error True" in lines
    assert "failure fail-1 Fail" in lines and "after fail-1 fail True" in lines
    assert "after hook-raises-1 done True" in lines
    assert lines[-1].startswith("teardown ")
    assert "after_job hook of Hooked raised" in pool.output()


# ====================================================================== reload
WORKER_V = '''
import os
from respworkers import Worker

class W(Worker):
    def process(self, payload: bytes) -> bytes:
        return b"%d:{version}" % os.getpid()
'''


def test_reload_restarts_the_processes_when_the_code_changes(cluster: Cluster) -> None:
    cluster.broker()
    code = cluster.root / "mymod.py"
    code.write_text(textwrap.dedent(WORKER_V.format(version="v1")))
    pool = cluster.pool("mymod:W", 2, "--reload")
    with cluster.client() as c:
        first = c.run(b"x")
        assert first.endswith(b":v1")
        busy = c.submit(b"x")  # a job in hand during the change finishes
        code.write_text(textwrap.dedent(WORKER_V.format(version="v2")))
        os.utime(code, (time.time() + 5, time.time() + 5))  # a new mtime even within a second
        assert c.outcome(busy, timeout=10).ok
        wait_for(lambda: c.run(b"x").endswith(b":v2"), 30, interval=0.3,
                 what="the new code to answer")
        code.write_text("this is not python\n")  # broken while editing: the pool waits
        os.utime(code, (time.time() + 10, time.time() + 10))
        wait_for(lambda: "waiting for a change" in pool.output(), 30, what="the failed start")
        assert pool.popen.poll() is None
        code.write_text(textwrap.dedent(WORKER_V.format(version="v3")))
        os.utime(code, (time.time() + 15, time.time() + 15))
        wait_for(lambda: c.run(b"x").endswith(b":v3"), 30, interval=0.3,
                 what="the fixed code to answer")
    pool.signal(signal.SIGTERM)
    assert pool.wait(15) == 0
