"""The per-job features end to end: a real `rw broker`, real `rw worker` pools and the Python
Client over ipc://. Retry and Fail from a worker class, cancelling a running job, time limits,
progress, delays, expiry, priorities, tenant fair shares, the operators' requests, and a
kill -9 of the broker with scheduled, backing-off and requeued jobs pending.

Most tests share one broker and its pools (each test uses queues or ids of its own and leaves
every worker idle); those that replace processes or restart the broker have a cluster each.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from respworkers import Client

from conftest import Cluster, wait_for

pytestmark = pytest.mark.timeout(60)

TARGET = "jobs_fixtures:Features"
CONFIG = """
[broker]
backoff = 0
tenant_weights = { heavy = 3 }

[worker]
cancel_grace = 1
"""


def pid_of(result: bytes) -> int:
    return int(result.split(b":", 1)[0])


def runs(log: Path) -> list[tuple[str, int, float]]:
    """The lines a ``log:`` job wrote: (job id, attempt, when), in the order they ran."""
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        job_id, attempt, at = line.split()
        out.append((job_id, int(attempt), float(at)))
    return out


def serving(snap: dict, queue: str) -> list[dict]:
    return [w for w in snap["workers"] if queue in w["queues"]]


class Shared:
    """One broker with four pools: ``default`` (2 processes), ``solo`` (1: orders are exact),
    ``classy`` (1, a class with its own backoff) and ``cancel`` (1, may be replaced)."""

    def __init__(self, root: Path) -> None:
        self.cluster = Cluster(root)
        self.root = root
        self.conf = root / "features.toml"
        self.conf.write_text(CONFIG)
        conf = str(self.conf)
        self.broker = self.cluster.broker("-c", conf)
        self.main = self.cluster.pool(TARGET, 2, "-c", conf)
        self.solo = self.cluster.pool(TARGET, 1, "-q", "solo", "-c", conf)
        self.classy = self.cluster.pool("jobs_fixtures:FeaturesBackoff", 1, "-q", "classy", "-c", conf)
        self.cancel = self.cluster.pool(TARGET, 1, "-q", "cancel", "-c", conf)
        self._n = 0

    def path(self, name: str) -> Path:
        """A fresh file name in the cluster's folder."""
        self._n += 1
        return self.root / f"{self._n:03d}-{name}"

    def client(self) -> Client:
        return self.cluster.client()

    def idle(self, queue: str) -> bool:
        workers = serving(self.cluster.snapshot(), queue)
        return bool(workers) and all(w["state"] == "idle" for w in workers)


@pytest.fixture(scope="module")
def shared() -> Iterator[Shared]:
    root = Path(tempfile.mkdtemp(prefix="rwf-", dir="/tmp"))  # ipc paths must stay short
    s = Shared(root)
    try:
        yield s
    finally:
        s.cluster.cleanup()
        shutil.rmtree(root, ignore_errors=True)


# ================================================================================================
# Retry and Fail raised by a worker class
# ================================================================================================


def test_retry_after_from_the_worker_waits_that_long_and_uses_tries(shared: Shared) -> None:
    with shared.client() as c:
        started = time.monotonic()
        job = c.submit("retry:3:0.6")
        assert c.result(job, timeout=20).endswith(b":attempt 3")
        assert time.monotonic() - started >= 1.2  # twice 0.6 s, though the broker's backoff is 0
        info = c.query(job)
        assert info is not None and info["attempt"] == 3
        assert len(set(info["workers_tried"][:2])) == 2  # the retry went to the other worker
        # on the last try a Retry fails the job
        last = c.outcome(c.submit("retry:5:0.1", tries=2), timeout=20)
        assert (last.status, last.reason) == ("failed", "error")
        assert "Retry" in last.error and "not yet (attempt 2)" in last.error


def test_retry_without_a_delay_follows_the_worker_class_backoff(shared: Shared) -> None:
    with shared.client() as c:
        started = time.monotonic()
        assert c.result(c.submit("retry:3", queue="classy"), timeout=20).endswith(b":attempt 3")
        took = time.monotonic() - started
    assert 0.8 <= took < 10  # two retries, each 0.4..0.8 s (the class's backoff, jittered)


def test_fail_from_the_worker_ends_the_job_at_the_first_try(shared: Shared) -> None:
    with shared.client() as c:
        out = c.outcome(c.submit("fail", tries=5), timeout=10)
        assert (out.status, out.reason) == ("failed", "error")
        assert "Fail: bad payload" in out.error
        info = c.query(out.id)
        assert info is not None and (info["attempt"], info["tries"]) == (1, 5)


# ================================================================================================
# cancellation, time limits
# ================================================================================================


def test_cancelling_a_running_job_stops_it_and_keeps_the_process(shared: Shared) -> None:
    first = set(shared.cancel.children())
    failed = shared.cluster.snapshot()["totals"]["failed"]
    with shared.client() as c:
        before = pid_of(c.run("before", queue="cancel", timeout=10))
        job = c.submit("sleep:60", queue="cancel")
        wait_for(lambda: c.query(job)["state"] == "running", 10, what="the job to start")
        assert c.cancel(job)["state"] == "cancelled"
        assert c.outcome(job, timeout=5).status == "cancelled"
        wait_for(lambda: shared.idle("cancel"), 5, what="the worker to stop the job")
        after = pid_of(c.run("after", queue="cancel", timeout=10))
    assert after == before and set(shared.cancel.children()) == first  # not replaced
    snap = shared.cluster.snapshot()
    assert snap["totals"]["failed"] == failed  # the stopped attempt is no failure
    assert [w["failed"] for w in serving(snap, "cancel")] == [0]
    assert "stopped (the job was cancelled)" in shared.cancel.output()


def test_a_job_ignoring_cancelled_past_the_grace_gets_its_process_replaced(shared: Shared) -> None:
    first = set(shared.cancel.children())
    with shared.client() as c:
        job = c.submit("stubborn:40", queue="cancel")  # its time limit is the broker's 60 s
        wait_for(lambda: c.query(job)["state"] == "running", 10, what="the job to start")
        cancelled = time.monotonic()
        c.cancel(job)
        assert c.outcome(job, timeout=5).status == "cancelled"
        # cancel_grace = 1: the process exits a second later and its pool starts another
        wait_for(lambda: set(shared.cancel.children()) - first, 10, what="a new worker process")
        assert time.monotonic() - cancelled < 8  # the grace, not the hard time limit (125 s)
        assert pid_of(c.run("after", queue="cancel", timeout=15)) not in first
    assert "still running 1s after it was told to stop" in shared.cancel.output()


def test_a_job_failing_after_timeouts_leaves_no_worker_busy(shared: Shared) -> None:
    with shared.client() as c:
        job = c.submit("sleep:30", timeout=1.0, tries=2)
        out = c.outcome(job, timeout=20)
        assert out.status == "failed"
        assert "no answer within 1s" in out.error or "TimeLimit" in out.error
        info = c.query(job)
        assert info is not None and info["attempt"] == 2 and len(set(info["workers_tried"])) == 2
        # both attempts stop (TimeLimit, then ABANDON): every worker is idle again at once
        wait_for(lambda: shared.idle("default"), 1.5, interval=0.02,
                 what="all workers of the queue to be idle")


def test_time_limit_is_raised_in_the_job(shared: Shared) -> None:
    with shared.client() as c:
        started = time.monotonic()
        job = c.submit("sleep:30", timeout=1.0, tries=2, backoff=30)  # its retry waits long
        info = wait_for(lambda: (i := c.query(job)) and "TimeLimit" in (i["error"] or "") and i,
                        10, what="the attempt's TimeLimit error")
        assert time.monotonic() - started < 8  # at the 1 s limit, not at the 30 s sleep's end
        assert info["state"] == "scheduled" and info["attempt"] == 1
        assert "reached its time limit of 1s" in info["error"]
        wait_for(lambda: shared.idle("default"), 5, what="the worker to be free")
        c.cancel(job)


# ================================================================================================
# progress
# ================================================================================================


def test_progress_reaches_watch_and_query(shared: Shared) -> None:
    marker = shared.path("go")
    with shared.client() as c:
        job = c.submit(f"progress:{marker}")
        seen = []
        for report in c.watch(job, timeout=20):
            seen.append(report)
            if report.get("fraction") == 0.5:
                info = c.query(job)
                assert info is not None and info["progress"]["message"] == "half"
                assert info["progress"]["meta"] == {"step": 2} and info["progress"]["attempt"] == 1
                worker = next(w for w in shared.cluster.snapshot()["workers"] if w["job"] == job)
                assert worker["progress"]["fraction"] == 0.5
                with shared.client() as late:  # a new watcher hears the latest at once
                    assert next(late.watch(job, timeout=5))["fraction"] == 0.5
                marker.touch()
        assert c.outcome(job, timeout=5).ok
    fractions = [r.get("fraction") for r in seen]
    assert fractions == sorted(fractions) and 0.5 in fractions and fractions[-1] == 1.0
    assert seen[-1]["message"] == "all"


# ================================================================================================
# delay, expiry
# ================================================================================================


def test_a_delayed_job_waits_scheduled_then_runs(shared: Shared) -> None:
    with shared.client() as c:
        started = time.monotonic()
        job = c.submit("later", delay=1.5)
        eta_job = c.submit("at", eta=time.time() + 1.5)
        info = c.query(job)
        assert info is not None and info["state"] == "scheduled" and 1.0 < info["runs_in"] <= 1.5
        assert shared.cluster.snapshot()["scheduled"] >= 2
        assert c.result(job, timeout=10).endswith(b":later")
        assert c.result(eta_job, timeout=10).endswith(b":at")
        assert time.monotonic() - started >= 1.4
        assert c.query(job)["attempt"] == 1


def test_an_expired_job_is_reported_expired_and_a_running_one_never_expires(shared: Shared) -> None:
    with shared.client() as c:
        job = c.submit("never", queue="nobody-serves-this", expires=0.5)
        out = c.outcome(job, timeout=10)
        assert out.status == "expired"
        assert c.query(job)["state"] == "expired"
        running = c.submit("sleep:1.5", expires=0.5)
        assert c.result(running, timeout=10).endswith(b":sleep:1.5")


# ================================================================================================
# priorities and fair share (one worker: the order it runs jobs in is exact)
# ================================================================================================


def blocked(shared: Shared, c: Client) -> Path:
    """Hold the solo worker with a job until the returned marker exists."""
    marker = shared.path("release")
    job = c.submit(f"wait:{marker}", queue="solo")
    wait_for(lambda: c.query(job)["state"] == "running", 10, what="the blocking job to start")
    return marker


def test_priorities_with_a_real_worker(shared: Shared) -> None:
    log = shared.path("prio.log")
    prios = [3, 9, 5, 0, 5, 7, 9, 1, 5, 8]
    with shared.client() as c:
        release = blocked(shared, c)
        ids = c.submit_many([{"payload": f"log:{log}|", "queue": "solo", "priority": prio,
                              "id": f"prio-{i}"} for i, prio in enumerate(prios)])
        c.wait_confirmed(ids, timeout=10)
        release.touch()
        assert all(r.ok for r in c.results(ids, timeout=20))
    expected = [f"prio-{i}" for _, i in sorted((-prio, i) for i, prio in enumerate(prios))]
    assert [job_id for job_id, _, _ in runs(log)] == expected


def test_tenant_fair_share_with_a_real_worker(shared: Shared) -> None:
    log = shared.path("fair.log")
    with shared.client() as c:
        release = blocked(shared, c)
        many = c.submit_many([{"payload": f"log:{log}|", "queue": "solo", "tenant": "bulk",
                               "id": f"bulk-{i}"} for i in range(200)])
        few = c.submit_many([{"payload": f"log:{log}|", "queue": "solo", "tenant": "small",
                              "id": f"small-{i}"} for i in range(5)])
        c.wait_confirmed(many + few, timeout=10)
        release.touch()
        assert all(r.ok for r in c.results(many + few, timeout=40))
    order = [job_id for job_id, _, _ in runs(log)]
    assert len(order) == 205
    last_small = max(order.index(j) for j in few)
    assert last_small < 12, order[:20]  # not behind the 200: they take turns
    assert [j for j in order if j.startswith("bulk")] == many  # FIFO within a tenant


def test_tenant_weights_with_a_real_worker(shared: Shared) -> None:
    log = shared.path("weights.log")
    with shared.client() as c:
        release = blocked(shared, c)
        heavy = c.submit_many([{"payload": f"log:{log}|", "queue": "solo", "tenant": "heavy",
                                "id": f"heavy-{i}"} for i in range(40)])
        light = c.submit_many([{"payload": f"log:{log}|", "queue": "solo", "tenant": "light",
                                "id": f"light-{i}"} for i in range(40)])
        c.wait_confirmed(heavy + light, timeout=10)
        release.touch()
        assert all(r.ok for r in c.results(heavy + light, timeout=40))
    first = [job_id for job_id, _, _ in runs(log)][:40]
    assert sum(j.startswith("heavy") for j in first) == 30  # weight 3 to 1
    assert first[:4] == ["heavy-0", "heavy-1", "heavy-2", "light-0"]


# ================================================================================================
# the operators' requests: list, requeue, purge
# ================================================================================================


def test_jobs_and_requeue_through_the_client(shared: Shared) -> None:
    marker = shared.path("once")
    with shared.client() as c:
        bad = c.submit(f"raise-once:{marker}", tries=1, queue="default")
        assert c.outcome(bad, timeout=10).status == "failed"
        good = c.submit("fine")
        assert c.result(good, timeout=10).endswith(b":fine")
        failed = c.jobs(state="failed")
        row = next(j for j in failed if j["id"] == bad)
        assert row["error"].startswith("ValueError: first time") and row["attempt"] == 1
        assert all(j["state"] == "failed" for j in failed)
        listed = [j["id"] for j in c.jobs(queue="default", limit=1000)]
        assert listed.index(good) < listed.index(bad)  # newest first
        assert len(c.jobs(limit=1)) == 1
        with pytest.raises(ValueError, match="state must be one of"):
            c.jobs(state="bogus")

        report = c.requeue([bad, good, "no-such-job"])
        assert report == {"requeued": [bad], "unknown": ["no-such-job"], "skipped": {good: "done"}}
        assert c.result(bad, timeout=10).endswith(b":second time")  # fresh tries: it ran again
        info = c.query(bad)
        assert info is not None and info["attempt"] == 1 and info["state"] == "done"
        assert [(e["state"], e["attempts"]) for e in info["history"]] == [("failed", 1)]
        assert "ValueError: first time" in info["history"][0]["error"]


def test_purge_through_the_client(shared: Shared) -> None:
    with shared.client() as c:
        queued = c.submit_many([{"payload": "x", "queue": "purge-me"} for _ in range(30)])
        later = c.submit_many([{"payload": "x", "queue": "purge-me", "delay": 60} for _ in range(5)])
        c.wait_confirmed(queued + later, timeout=10)
        assert c.purge("purge-me") == 35
        outcomes = {r.id: r.status for r in c.results(queued + later, timeout=10)}
        assert set(outcomes.values()) == {"cancelled"} and len(outcomes) == 35
        listed = c.jobs(queue="purge-me", limit=1000)
        assert len(listed) == 35 and {j["state"] for j in listed} == {"cancelled"}
        assert c.purge("purge-me") == 0
    snap = shared.cluster.snapshot()
    assert "purge-me" not in snap["queues"] or snap["queues"]["purge-me"]["queued"] == 0


# ================================================================================================
# a broker kill -9 with scheduled, backing-off and requeued jobs pending
# ================================================================================================


def test_broker_kill9_keeps_scheduled_backoff_and_requeued_jobs(cluster: Cluster) -> None:
    conf = cluster.root / "conf.toml"
    conf.write_text(CONFIG)
    log = cluster.root / "runs.log"
    broker = cluster.broker("-c", str(conf))
    cluster.pool(TARGET, 2, "-c", str(conf))
    rq_pool = cluster.pool(TARGET, 1, "-q", "rq", "-c", str(conf))
    with cluster.client() as c:
        # requeued: it fails once, its queue's only worker leaves, it is requeued: it waits
        rq = c.submit(f"log:{log}|raise-once:{cluster.root}/rq-once", queue="rq", tries=1,
                      id="requeued")
        assert c.outcome(rq, timeout=10).status == "failed"
        rq_pool.signal(signal.SIGTERM)
        assert rq_pool.wait(15) == 0
        wait_for(lambda: not serving(cluster.snapshot(), "rq"), 10, what="the rq worker to leave")
        assert c.requeue([rq])["requeued"] == [rq]
        # backing off: its first attempt failed, the retry waits 5..10 s
        bo = c.submit(f"log:{log}|raise-once:{cluster.root}/bo-once", id="backoff", tries=2,
                      backoff=10, backoff_max=10)
        info = wait_for(lambda: (i := c.query(bo)) and i["state"] == "scheduled" and i, 10,
                        what="the retry to be scheduled")
        bo_at = info["runs_at"]
        # scheduled: a delay
        sched = c.submit(f"log:{log}|", id="scheduled", delay=8)
        sched_at = c.query(sched)["runs_at"]
        assert c.query(rq)["state"] == "queued"
        sentinel = c.submit("x", queue="nobody", id="sentinel")
        c.wait_confirmed([sched, sentinel], timeout=10)  # committed in order: all before it too
    broker.signal(signal.SIGKILL)
    broker.wait(5)
    cluster.broker("-c", str(conf))
    with cluster.client() as c:
        info = c.query(bo)
        assert info is not None and info["state"] == "scheduled" and info["attempt"] == 1
        assert info["runs_at"] == pytest.approx(bo_at, abs=0.01)
        info = c.query(sched)
        assert info is not None and info["state"] == "scheduled"
        assert info["runs_at"] == pytest.approx(sched_at, abs=0.01)
        info = c.query(rq)
        assert info is not None and info["state"] == "queued" and len(info["history"]) == 1
        cluster.pool(TARGET, 1, "-q", "rq", "-c", str(conf))
        outcomes = {r.id: r for r in c.results([rq, bo, sched], timeout=30)}
        assert all(r.ok for r in outcomes.values()), outcomes
        assert [c.query(j)["attempt"] for j in (rq, bo, sched)] == [1, 2, 1]
        c.cancel(sentinel)
    ran = runs(log)
    counts = {j: sum(1 for r in ran if r[0] == j) for j in (rq, bo, sched)}
    assert counts == {rq: 2, bo: 2, sched: 1}  # once before the crash where due, once after
    assert [a for j, a, _ in ran if j == bo] == [1, 2]
    assert next(t for j, a, t in ran if j == bo and a == 2) >= bo_at - 0.05  # not before its time
    assert next(t for j, _, t in ran if j == sched) >= sched_at - 0.05
    assert cluster.snapshot()["totals"]["duplicates"] == 0
