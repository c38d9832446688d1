"""End to end: a real broker, real worker pools and real clients over ipc://."""

from __future__ import annotations

import os
import signal

import pytest
import zmq

from conftest import Cluster, alive, wait_for

pytestmark = pytest.mark.timeout(60)


def pid_of(result: bytes) -> int:
    return int(result.split(b":", 1)[0])


def test_busy_worker_never_gets_a_second_job(cluster: Cluster) -> None:
    cluster.broker()
    cluster.pool(n=2)
    with cluster.client() as c:
        long_id = c.submit("sleep:2")
        wait_for(lambda: any(w["state"] == "busy" for w in cluster.snapshot()["workers"]),
                 what="the long job to start")
        short = [c.submit(f"short-{i}") for i in range(20)]
        shorts = {r.id: r for r in c.results(short, timeout=20)}
        # every short job ran, on the idle worker, while the long one was still running
        assert cluster.snapshot()["totals"]["done"] == 20
        long_pid = pid_of(c.result(long_id, timeout=10))
    short_pids = {pid_of(r.payload) for r in shorts.values()}
    assert len(short_pids) == 1 and long_pid not in short_pids


def test_time_limit_redispatches_and_late_answer_counts_once(cluster: Cluster) -> None:
    cluster.broker()
    cluster.pool("jobs_fixtures:Stubborn", n=2)
    with cluster.client() as c:
        job = c.submit("sleep:1.5", timeout=0.5, tries=3)
        result = c.result(job, timeout=15)
        info = c.query(job)
        assert info is not None
        assert info["state"] == "done"
        assert info["attempt"] >= 2, info  # re-dispatched after 0.5s
        assert len(set(info["workers_tried"][:2])) == 2, info  # to the other worker
        # the first worker's late answer was the one taken; the second attempt is told to stop
        wait_for(lambda: cluster.snapshot()["totals"]["abandoned"] >= 1, 10,
                 what="the second attempt to be abandoned")
        snap = cluster.snapshot()
        assert snap["totals"]["late"] >= 1
        assert snap["totals"]["done"] == 1
        assert result.endswith(b":sleep:1.5")
        # no second result ever reaches the client
        assert list(c.results([], timeout=0.5)) == []


def test_job_fails_clearly_after_its_tries(cluster: Cluster) -> None:
    cluster.broker("--tries", "5")
    cluster.pool(n=2)
    with cluster.client() as c:
        slow = c.submit("sleep:30", timeout=0.3, tries=2)
        outcome = c.outcome(slow, timeout=15)
        assert outcome.status == "failed"
        assert outcome.reason == "timeout"
        assert "attempt 2 of 2" in outcome.error
        info = c.query(slow)
        assert info is not None and info["attempt"] == 2 and info["state"] == "failed"


def test_worker_exception_is_retried_then_reported(cluster: Cluster) -> None:
    cluster.broker("--timeout", "30")
    cluster.pool(n=2)
    with cluster.client() as c:
        bad = c.submit("raise", tries=3)
        outcome = c.outcome(bad, timeout=10)  # far below the 30s time limit: no waiting
        assert outcome.status == "failed" and outcome.reason == "error"
        assert "ValueError: asked to raise" in outcome.error
        assert "respworkers/worker" not in outcome.error  # only the user's frames
    snap = cluster.snapshot()
    assert sum(w["failed"] for w in snap["workers"]) == 3
    assert snap["totals"]["retried"] == 2
    assert snap["recent_failures"][-1]["id"] == bad


def test_plain_req_socket_is_a_client(cluster: Cluster) -> None:
    cluster.broker("--tries", "1")
    cluster.pool(n=1)
    ctx = zmq.Context.instance()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, 10_000)
    req.connect(cluster.clients)
    try:
        req.send(b"hello")
        reply = req.recv_multipart()
        assert len(reply) == 1 and reply[0].endswith(b":hello")
        req.send(b"raise")
        assert req.recv_multipart() == [b""]  # failed after all its tries
    finally:
        req.close()


def test_multipart_jobs_and_queues(cluster: Cluster) -> None:
    cluster.broker()
    with cluster.client() as c:
        job = c.submit([b"ab", b"cd"], queue="frames")
        # nobody serves "frames" yet: the job waits, visibly
        wait_for(lambda: cluster.snapshot()["queues"].get("frames", {}).get("queued") == 1,
                 what="the job to wait in its queue")
        cluster.pool("jobs_fixtures:Frames", 1)
        outcome = c.outcome(job, timeout=10)
        assert outcome.frames == [b"dc", b"ba"]


def test_submit_many_batches_jobs_and_each_result_comes_back_once(cluster: Cluster) -> None:
    cluster.broker()
    cluster.pool(n=2)
    with cluster.client() as c:
        n = 1500  # more than one SUBMITS can carry
        ids = c.submit_many([f"job-{i}" for i in range(n)]
                            + [{"payload": "raise", "id": "bad", "tries": 1},
                               {"payload": b"custom", "id": "mine", "queue": "default"}])
        assert ids[-2:] == ["bad", "mine"] and len(set(ids)) == n + 2
        got = {r.id: r for r in c.results(ids, timeout=60)}
        assert len(got) == n + 2
        assert all(got[ids[i]].payload.endswith(f":job-{i}".encode()) for i in range(n))
        assert got["bad"].status == "failed" and got["mine"].payload.endswith(b":custom")
        assert [r.split(b":", 1)[1] for r in c.map(["x", "y"])] == [b"x", b"y"]  # input order
    snap = cluster.snapshot()
    assert snap["totals"]["submitted"] == n + 4 and snap["totals"]["done"] == n + 3


def test_killed_child_is_restarted_and_its_job_rerun(cluster: Cluster) -> None:
    cluster.broker("--timeout", "60")
    pool = cluster.pool(n=2)
    with cluster.client() as c:
        job = c.submit("sleep:1.5")
        busy = wait_for(lambda: [w for w in cluster.snapshot()["workers"] if w["state"] == "busy"],
                        what="the job to start")
        victim = busy[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        result = c.result(job, timeout=20)  # well before the 60s time limit
        assert pid_of(result) != victim
        info = c.query(job)
        assert info is not None and info["attempt"] == 2
    wait_for(lambda: len(pool.children()) == 2 and victim not in pool.children(), 10,
             what="the pool to restart the child")
    wait_for(lambda: len(cluster.snapshot()["workers"]) == 2, 10, what="two workers again")


def test_poison_job_ends_failed_instead_of_killing_workers_forever(cluster: Cluster) -> None:
    cluster.broker("--timeout", "60")
    cluster.pool(n=2)
    with cluster.client() as c:
        outcome = c.outcome(c.submit("crash", tries=2), timeout=30)
        assert outcome.status == "failed" and outcome.reason == "worker-lost"


def test_broker_stops_on_sigterm_with_exit_0(cluster: Cluster) -> None:
    broker = cluster.broker()
    broker.signal(signal.SIGTERM)
    assert broker.wait(10) == 0
    assert "broker stopped" in broker.output()


def test_pool_stops_warmly_on_sigterm(cluster: Cluster) -> None:
    cluster.broker()
    pool = cluster.pool(n=1)
    marker = cluster.root / "started"
    with cluster.client() as c:
        job = c.submit(f"started:{marker}:1.5")
        wait_for(marker.exists, what="the job to start")  # in hand, not just dispatched
        pool.signal(signal.SIGTERM)
        result = c.result(job, timeout=10)  # the job in hand finishes and is delivered
        assert result.endswith(b":1.5")
    assert pool.wait(10) == 0
    assert not any(alive(p) for p in pool.known_children)
    wait_for(lambda: cluster.snapshot()["workers"] == [], 5, what="the worker to say goodbye")
    assert cluster.snapshot()["totals"]["retried"] == 0


def test_second_signal_gives_the_job_back_without_counting_a_try(cluster: Cluster) -> None:
    cluster.broker()
    pool = cluster.pool(n=1)
    with cluster.client() as c:
        marker = cluster.root / "started"
        job = c.submit(f"started:{marker}:30", tries=1)
        wait_for(marker.exists, what="the job to start")
        pool.signal(signal.SIGTERM)
        # Signals sent together are merged by the kernel and by Python: send the second
        # once the pool has handled the first.
        wait_for(lambda: "stopping: each worker finishes its job" in pool.output(), 10,
                 what="the pool to take the first signal")
        pool.signal(signal.SIGTERM)
        assert pool.wait(10) == 0
        info = wait_for(lambda: (i := c.query(job)) and i["state"] == "queued" and i, 5,
                        what="the job to be queued again")
        assert info["attempt"] == 0  # tries=1 and still not failed: the attempt did not count
        c.cancel(job)


def proc_state(pid: int) -> str:
    """The process's state letter from /proc (T: stopped). SIGSTOP takes effect
    asynchronously: a SIGTERM sent before it has would still be handled first."""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


def pending_signals(pid: int) -> set[int]:
    """Signals waiting for the process (its own and its threads'), from /proc."""
    mask = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("SigPnd:", "ShdPnd:")):
                mask |= int(line.split()[1], 16)
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


@pytest.mark.timeout(60)
def test_a_second_signal_forces_the_stop_even_if_the_child_did_not_run_in_between(
    cluster: Cluster,
) -> None:
    cluster.broker()
    pool = cluster.pool(n=1)
    child = pool.children()[0]
    with cluster.client() as c:
        marker = cluster.root / "started"
        job = c.submit(f"started:{marker}:30", tries=1)
        wait_for(marker.exists, what="the job to start")
        # The child does not run while the pool forwards both signals (as on a busy machine;
        # SIGSTOP makes it certain), so both are pending in it at once.
        os.kill(child, signal.SIGSTOP)
        wait_for(lambda: proc_state(child) == "T", 5, what="the child to be stopped")
        try:
            pool.signal(signal.SIGTERM)
            wait_for(lambda: "stopping: each worker finishes its job" in pool.output(), 10,
                     what="the pool to take the first signal")
            pool.signal(signal.SIGTERM)
            wait_for(lambda: "forcing" in pool.output(), 10, what="the pool to take the second")
            # It logs before it forwards: wait until both signals are pending in the child.
            wait_for(lambda: pending_signals(child) >= {signal.SIGTERM, signal.SIGINT}, 5,
                     what="both signals to be pending in the stopped child")
        finally:
            os.kill(child, signal.SIGCONT)
        assert pool.wait(10) == 0  # forced: the job is handed back at once, not in 30 s
        info = wait_for(lambda: (i := c.query(job)) and i["state"] == "queued" and i, 5,
                        what="the job to be queued again")
        assert info["attempt"] == 0
        c.cancel(job)


def test_second_signal_gives_back_a_job_stuck_in_one_long_c_call(cluster: Cluster) -> None:
    # The job runs in the main thread, where Python runs signal handlers, but only between
    # bytecodes: during one long C call (numpy, torch, hashing) the handler waits for it.
    # The watchman must still see the second signal and give the job back at once.
    cluster.broker()
    pool = cluster.pool(n=1)
    with cluster.client() as c:
        marker = cluster.root / "started"
        job = c.submit(f"cpu:{marker}:100000000", tries=1, timeout=300)  # about a minute
        wait_for(marker.exists, what="the job to start")
        pool.signal(signal.SIGTERM)
        wait_for(lambda: "stopping: each worker finishes its job" in pool.output(), 10,
                 what="the pool to take the first signal")
        pool.signal(signal.SIGTERM)
        assert pool.wait(10) == 0
        info = wait_for(lambda: (i := c.query(job)) and i["state"] == "queued" and i, 5,
                        what="the job to be queued again")
        assert info["attempt"] == 0
        c.cancel(job)


def test_a_long_job_keeps_its_worker_alive_and_registered(cluster: Cluster) -> None:
    # The job runs in the worker's main thread; its watchman keeps beating meanwhile.
    conf = cluster.root / "fast-beats.toml"
    conf.write_text("[broker]\nheartbeat = 0.2\nliveness = 3\n[worker]\nheartbeat = 0.2\n")
    cluster.broker("-c", str(conf))
    cluster.pool("jobs_fixtures:Tester", 1, "-c", str(conf))
    with cluster.client() as c:
        job = c.submit("sleep:2.5")  # > 4x the 0.6 s after which a silent worker is dropped
        assert c.result(job, timeout=15).endswith(b":sleep:2.5")
        info = c.query(job)
        assert info is not None and info["attempt"] == 1
    snap = cluster.snapshot()
    assert snap["totals"]["lost_workers"] == 0 and snap["totals"]["retried"] == 0
    assert len(snap["workers"]) == 1


def test_a_hung_job_does_not_hold_its_worker_forever(cluster: Cluster) -> None:
    cluster.broker()
    pool = cluster.pool(n=1)
    first = set(pool.children())
    with cluster.client() as c:
        # it ignores TimeLimit and Cancelled, so only the hard limit ends it
        hung = c.outcome(c.submit("stubborn:60", timeout=0.5, tries=1), timeout=10)
        assert hung.status == "failed" and hung.reason == "timeout"
        # at 2 x 0.5s + 5s the process gives up and the pool replaces it
        assert c.run("after", timeout=20).endswith(b":after")
    assert set(pool.children()) != first
    assert "still running at twice its time limit" in pool.output()
