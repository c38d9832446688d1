"""Prefetch (README: Prefetch): a worker that holds several jobs. The wire format, the
credits and their fairness, time limits that start at the head, cancels, drains and a
kill -9 of a worker holding jobs. Real brokers, worker processes and sockets."""

from __future__ import annotations

import io
import os
import signal
import time
from typing import Any

import pytest
import zmq
from rich.console import Console

from respworkers import protocol
from respworkers.errors import ProtocolError
from respworkers.status import render

from conftest import Cluster, alive, wait_for

pytestmark = pytest.mark.timeout(120)


# ================================================================================ wire format
def _job(job_id: bytes, n: int = 1) -> list[bytes]:
    return protocol.encode_job(job_id, n, 5.0, b"t" * 32, b"default", 5, 3, 1.5,
                               [b"a", b"b"] if job_id.endswith(b"2") else [b"x"])


def test_jobs_and_results_round_trip() -> None:
    frames = protocol.encode_jobs(7, [_job(b"j1"), _job(b"j2", 2)])
    assert frames[0] == b"RWW3 JOBS 7 2 3"
    msg = protocol.decode_broker(frames)
    assert isinstance(msg, protocol.Dispatches) and msg.answered == 7
    assert [(d.job_id, d.attempt, d.payload) for d in msg.jobs] == [
        ("j1", 1, [b"x"]), ("j2", 2, [b"a", b"b"])]
    answers = protocol.encode_worker_answers([
        protocol.encode_worker_result("j1", 1, b"t" * 32, True, [b"r1", b"r2"]),
        protocol.encode_worker_error("j2", 2, b"u" * 32, False, "boom", "fail"),
    ])
    assert answers[0] == b"RWW3 RESULTS 3 2"
    got = protocol.decode_worker(answers)
    assert isinstance(got, protocol.Answers)
    first, second = got.answers
    assert isinstance(first, protocol.WorkerResult) and first.payload == [b"r1", b"r2"]
    assert isinstance(second, protocol.WorkerError) and second.then == "fail" and not second.ready
    # One answer travels as itself: RESULTS is only for two or more.
    one = protocol.encode_worker_result("j1", 1, b"t" * 32, True, [b"r"])
    assert protocol.encode_worker_answers([one]) == one


def test_hello_announces_prefetch_and_bad_values_are_refused() -> None:
    hello = protocol.decode_worker(protocol.encode_hello(["default"], {"prefetch": 8}))
    assert isinstance(hello, protocol.Hello) and hello.prefetch == 8
    plain = protocol.decode_worker(protocol.encode_hello(["default"], {}))
    assert isinstance(plain, protocol.Hello) and plain.prefetch == 1
    for bad in (0, -1, 1001, 2.5, "4", True):
        with pytest.raises(ProtocolError, match="bad prefetch"):
            protocol.decode_worker(protocol.encode_hello(["default"], {"prefetch": bad}))


@pytest.mark.parametrize("frames, reason", [
    ([b"RWW3 JOBS 0 2", *_job(b"j1")[:1]], "counts add up"),  # a frame short
    ([b"RWW3 JOBS 0 2 2", *_job(b"j1")], "counts add up"),  # a job short
    ([b"RWW3 JOBS 0 1", b"x"], "frame count"),  # a JOB has >= 2 frames
    ([b"RWW3 JOBS 0", b"x"], "bad JOBS"),  # no counts
    ([b"RWW3 JOBS x 2", *_job(b"j1")], "answered"),
    ([b"RWW3 JOBS 0 2", b"RWW3 ABANDON j1 1 done", b"x"], "only JOB"),
    ([b"RWW3 JOBS 0 2", b"RWW3 JOB j1 1", b"x"], "bad JOB"),  # the inner JOB is checked too
    ([b"RWW3 JOBS 0 " + b" ".join([b"2"] * 1001), *(_job(b"j1") * 1001)], "1..1000"),
])
def test_malformed_jobs_are_refused(frames: list[bytes], reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        protocol.decode_broker(frames)


_R = protocol.encode_worker_result("j1", 1, b"t" * 32, True, [b"r"])


@pytest.mark.parametrize("frames, reason", [
    ([b"RWW3 RESULTS 2 2", *_R], "counts add up"),
    ([b"RWW3 RESULTS 2 1", *_R, b"x"], "frame count"),
    ([b"RWW3 RESULTS", *_R], "1..1000"),
    ([b"RWW3 RESULTS 2 1", *_R, *protocol.HEARTBEAT_FRAMES], "frame count"),
    ([b"RWW3 RESULTS 2 2", *_R, b"RWW3 RETURN j1 1 tok", b"x"], "only RESULT and ERROR"),
    ([b"RWW3 RESULTS 2 2", *_R, b"RWW3 RESULT j1 1", b"x"], "bad RESULT"),
])
def test_malformed_results_are_refused(frames: list[bytes], reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        protocol.decode_worker(frames)


# ================================================================================ a raw worker
class RawWorker:
    """A prefetching worker speaking RWW3 itself, driven step by step by the test."""

    def __init__(self, endpoint: str, prefetch: int, name: str = "raw") -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.sock.send_multipart(protocol.encode_hello(
            ["default"], {"name": name, "prefetch": prefetch, "heartbeat": 1.0}))
        self.next_beat = 0.0

    def recv(self, timeout: float = 10.0) -> Any:
        """The next message that is not WELCOME or a heartbeat (we beat back)."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if now >= self.next_beat:
                self.sock.send_multipart(protocol.HEARTBEAT_FRAMES)
                self.next_beat = now + 0.5
            assert now < deadline, "the broker sent nothing"
            if self.sock.poll(100):
                msg = protocol.decode_broker(self.sock.recv_multipart())
                if not isinstance(msg, (protocol.Welcome, protocol.Heartbeat)):
                    return msg

    def idle(self, seconds: float) -> None:
        """Stay alive (heartbeats) for a while without reading."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.sock.send_multipart(protocol.HEARTBEAT_FRAMES)
            time.sleep(min(0.25, max(0.0, end - time.monotonic())))

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def close(self) -> None:
        self.sock.close()


def result(d: protocol.Dispatch, ready: bool = True) -> list[bytes]:
    return protocol.encode_worker_result(d.job_id, d.attempt, d.token, ready, [b"raw:" + d.payload[0]])


def test_a_prefetching_worker_gets_several_jobs_in_one_message_and_answers_in_one(
    cluster: Cluster,
) -> None:
    cluster.broker()
    with cluster.client() as c:
        ids = c.submit_many([f"p{i}" for i in range(6)])
        c.wait_confirmed(ids, timeout=10)
        raw = RawWorker(cluster.workers, prefetch=4)
        try:
            msg = raw.recv()
            assert isinstance(msg, protocol.Dispatches)
            assert [d.job_id for d in msg.jobs] == ids[:4] and msg.answered == 0
            snap = cluster.snapshot()
            row = snap["workers"][0]
            assert row["prefetch"] == 4 and row["held"] == 3 and row["job"] == ids[0]
            console = Console(file=io.StringIO(), width=140, color_system=None)
            console.print(render(snap, 140, None))
            view = console.file.getvalue()  # type: ignore[attr-defined]
            assert " held " in view and " 3/3 " in view, view  # rw status shows what it holds
            raw.send(protocol.encode_worker_answers([result(d) for d in msg.jobs]))
            more = raw.recv()  # the refill confirms the 4 answers
            assert isinstance(more, protocol.Dispatches) and more.answered == 4
            assert [d.job_id for d in more.jobs] == ids[4:]
            raw.send(protocol.encode_worker_answers([result(d) for d in more.jobs]))
            ack = raw.recv()
            assert isinstance(ack, protocol.Ack) and ack.job_id == ids[5]
            assert [c.result(i, timeout=10) for i in ids] == [b"raw:p%d" % i for i in range(6)]
        finally:
            raw.close()
    snap = cluster.snapshot()
    assert snap["totals"]["done"] == 6 and not snap["bad_messages"]


def test_bad_prefetch_and_malformed_results_are_counted(cluster: Cluster) -> None:
    cluster.broker()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.workers)
    try:
        sock.send_multipart(protocol.encode_hello(["default"], {"prefetch": 5000}))
        assert sock.poll(5000)
        line, reason = sock.recv_multipart()
        assert line == b"RWW3 DISCONNECT" and b"HELLO refused" in reason and b"5000" in reason
        sock.send_multipart(protocol.encode_hello(["default"], {"prefetch": 2}))
        sock.send_multipart([b"RWW3 RESULTS 2 2", *_R])  # the counts lie
    finally:
        sock.close()
    bad = wait_for(lambda: (b := cluster.snapshot()["bad_messages"]) and len(b) >= 2 and b, 10)
    assert any("bad prefetch" in k for k in bad), bad
    assert any("bad RESULTS" in k for k in bad), bad


def test_a_held_jobs_time_limit_starts_when_it_becomes_the_head(cluster: Cluster) -> None:
    cluster.broker()
    with cluster.client() as c:
        ids = c.submit_many([{"payload": f"t{i}", "timeout": 1.0} for i in range(2)])
        c.wait_confirmed(ids, timeout=10)
        raw = RawWorker(cluster.workers, prefetch=2)
        try:
            msg = raw.recv()
            assert isinstance(msg, protocol.Dispatches) and len(msg.jobs) == 2
            first, second = msg.jobs
            raw.idle(0.7)
            raw.send(result(first))  # the second one starts now: 1 s from here
            raw.idle(0.7)  # 1.4 s after it was sent: past its limit if it had run from then
            raw.send(result(second))
            assert c.result(ids[1], timeout=10) == b"raw:t1"
            info = c.query(ids[1])
            assert info is not None and info["attempt"] == 1 and info["state"] == "done"
        finally:
            raw.close()
    assert cluster.snapshot()["totals"]["retried"] == 0


def test_the_head_still_times_out(cluster: Cluster) -> None:
    cluster.broker()
    with cluster.client() as c:
        ids = c.submit_many([{"payload": f"t{i}", "timeout": 0.5, "tries": 1} for i in range(2)])
        c.wait_confirmed(ids, timeout=10)
        raw = RawWorker(cluster.workers, prefetch=2)
        try:
            msg = raw.recv()
            assert isinstance(msg, protocol.Dispatches) and len(msg.jobs) == 2
            raw.idle(1.5)
            info = c.query(ids[0])
            assert info is not None and info["state"] == "failed" and info["reason"] == "timeout"
            held = c.query(ids[1])
            assert held is not None and held["state"] == "running"  # its limit has not started
        finally:
            raw.close()


def test_cancelling_a_held_job_drops_it_uncharged(cluster: Cluster) -> None:
    cluster.broker()
    with cluster.client() as c:
        ids = c.submit_many(["c0", "c1", "c2"])
        c.wait_confirmed(ids, timeout=10)
        raw = RawWorker(cluster.workers, prefetch=3)
        try:
            msg = raw.recv()
            assert isinstance(msg, protocol.Dispatches) and len(msg.jobs) == 3
            info = c.cancel(ids[2])
            assert info is not None and info["state"] == "cancelled" and info["attempt"] == 0
            abandon = raw.recv()
            assert isinstance(abandon, protocol.Abandon) and abandon.job_id == ids[2]
            third = msg.jobs[2]
            raw.send(protocol.encode_worker_error(third.job_id, third.attempt, third.token, True,
                                                  "the job was cancelled", "abandoned"))
            raw.send(protocol.encode_worker_answers([result(d) for d in msg.jobs[:2]]))
            assert c.result(ids[0], timeout=10) == b"raw:c0"
            assert c.result(ids[1], timeout=10) == b"raw:c1"
            row = wait_for(lambda: (r := cluster.snapshot()["workers"][0])["state"] == "idle" and r,
                           10, what="the worker to hold nothing")
            assert row["held"] == 0
        finally:
            raw.close()
    snap = cluster.snapshot()
    assert not snap["bad_messages"] and snap["totals"]["cancelled"] == 1


def test_a_lost_raw_worker_gives_back_held_jobs_in_order_and_a_late_answer_is_stale(
    cluster: Cluster,
) -> None:
    cluster.broker("--backoff", "0")  # the charged one is retried at once, first in line
    with cluster.client() as c:
        ids = c.submit_many([f"o{i}" for i in range(4)])
        c.wait_confirmed(ids, timeout=10)
        raw = RawWorker(cluster.workers, prefetch=4, name="doomed")
        msg = raw.recv()
        assert isinstance(msg, protocol.Dispatches) and len(msg.jobs) == 4
        # Silent for 3 heartbeats: dropped. Then its late answer for a held job changes nothing.
        wait_for(lambda: not cluster.snapshot()["workers"], 15, what="the worker to be dropped")
        infos = [c.query(i) for i in ids]
        assert [i["state"] for i in infos] == ["queued"] * 4  # type: ignore[index]
        assert [i["attempt"] for i in infos] == [1, 0, 0, 0]  # type: ignore[index]
        raw.send(result(msg.jobs[1]))  # too late: its attempt was withdrawn
        raw.close()
        second = RawWorker(cluster.workers, prefetch=4, name="second")
        try:
            again = second.recv()
            assert isinstance(again, protocol.Dispatches)
            assert [d.job_id for d in again.jobs] == ids  # their order kept
            second.send(protocol.encode_worker_answers([result(d) for d in again.jobs]))
            assert [c.result(i, timeout=10) for i in ids] == [b"raw:o%d" % i for i in range(4)]
            assert [c.query(i)["attempt"] for i in ids] == [2, 1, 1, 1]  # type: ignore[index]
        finally:
            second.close()
    assert cluster.snapshot()["totals"]["done"] == 4


# ================================================================================ real workers
def _pool_child(cluster: Cluster, pool: Any) -> int:
    kids = wait_for(lambda: pool.children(), 10, what="the pool's child")
    return int(kids[0])


def _holding(cluster: Cluster, c: Any, seconds: float, rest: list[str],
             worker: str = "jobs_fixtures:Holder") -> tuple[list[str], Any, dict[str, Any]]:
    """A job that runs ``seconds`` and the jobs ``rest``, all sent to one prefetching
    worker (prefetch 4) before it starts: (their ids, its pool, its status row once the
    first has started, the rest held behind it)."""
    marker = cluster.root / "started"
    ids = c.submit_many([f"started:{marker}:{seconds}", *rest])
    c.wait_confirmed(ids, timeout=10)
    pool = cluster.pool(worker, 1, "--prefetch", "4")
    wait_for(marker.exists, 15, what="the first job to start")
    return ids, pool, cluster.snapshot()["workers"][0]


def test_kill_9_of_a_worker_holding_jobs_loses_none_and_charges_only_the_started_one(
    cluster: Cluster,
) -> None:
    cluster.broker()
    with cluster.client() as c:
        ids, pool, row = _holding(cluster, c, 3, ["k1", "k2", "k3"])
        assert row["job"] == ids[0] and row["held"] == 3 and row["prefetch"] == 4
        victim = _pool_child(cluster, pool)
        os.kill(victim, signal.SIGKILL)
        outcomes = [c.result(i, timeout=30) for i in ids]
        assert all(not o.startswith(b"%d:" % victim) for o in outcomes)  # all run elsewhere
        infos = [c.query(i) for i in ids]
    assert [i["attempt"] for i in infos] == [2, 1, 1, 1]  # type: ignore[index]
    assert [len(i["workers_tried"]) for i in infos] == [2, 1, 1, 1]  # type: ignore[index]
    totals = cluster.snapshot()["totals"]
    assert totals["done"] == 4 and totals["retried"] == 1 and totals["failed"] == 0
    assert not alive(victim)


def test_a_drained_prefetching_worker_finishes_its_job_and_returns_the_rest(
    cluster: Cluster,
) -> None:
    cluster.broker()
    with cluster.client() as c:
        ids, _, row = _holding(cluster, c, 1.5, ["d1", "d2", "d3"])
        assert row["held"] == 3
        asked = c.drain(everyone=True)
        assert [a["job"] for a in asked["asked"]] == [ids[0]]
        head = c.result(ids[0], timeout=15)
        wait_for(lambda: all(c.query(i)["state"] == "queued" for i in ids[1:]), 10,  # type: ignore[index]
                 what="the held jobs to be back in the queue")
        assert [c.query(i)["attempt"] for i in ids[1:]] == [0, 0, 0]  # type: ignore[index]
        cluster.pool("jobs_fixtures:Tester", 1)
        rest = [c.result(i, timeout=15) for i in ids[1:]]
    drained_pid = head.split(b":")[0]
    assert all(not r.startswith(drained_pid + b":") for r in rest)
    totals = cluster.snapshot()["totals"]
    assert totals["done"] == 4 and totals["retried"] == 0


def test_other_workers_take_the_rest_while_one_runs_a_long_job(cluster: Cluster) -> None:
    cluster.broker()
    cluster.pool("jobs_fixtures:Tester", 2, "--prefetch", "4")
    with cluster.client() as c:
        long_job = c.submit("sleep:3")
        time.sleep(0.2)  # it is running on one worker
        started = time.monotonic()
        shorts = c.submit_many([f"s{i}" for i in range(12)])
        outs = [c.result(i, timeout=10) for i in shorts]
        took = time.monotonic() - started
        long_out = c.result(long_job, timeout=10)
    assert took < 2.0, f"short jobs waited behind the long one ({took:.2f}s)"
    long_pid = long_out.split(b":")[0]
    assert all(not o.startswith(long_pid + b":") for o in outs)


def test_jobs_held_behind_a_long_one_are_given_back_for_others(cluster: Cluster) -> None:
    cluster.broker()
    with cluster.client() as c:
        ids, _, _ = _holding(cluster, c, 4, ["g1", "g2", "g3"], "jobs_fixtures:Tester")  # patience 0.02 s
        wait_for(lambda: [c.query(i)["state"] for i in ids[1:]] == ["queued"] * 3, 5,  # type: ignore[index]
                 what="the held jobs to be given back")
        cluster.pool("jobs_fixtures:Tester", 1)
        rest = [c.result(i, timeout=15) for i in ids[1:]]
        head = c.query(ids[0])
        assert head is not None and head["state"] == "running", "they waited for the long one"
        long_out = c.result(ids[0], timeout=15)
        infos = [c.query(i) for i in ids[1:]]
    long_pid = long_out.split(b":")[0]
    assert all(not r.startswith(long_pid + b":") for r in rest)
    assert [i["attempt"] for i in infos] == [1, 1, 1]  # type: ignore[index]
    snap = cluster.snapshot()
    assert snap["totals"]["retried"] == 0 and not snap["bad_messages"]


def test_rw_worker_prefetch_end_to_end_and_validation(cluster: Cluster) -> None:
    cluster.broker()
    cluster.pool("jobs_fixtures:Tester", 2, "--prefetch", "8")
    rows = cluster.snapshot()["workers"]
    assert [r["prefetch"] for r in rows] == [8, 8]
    with cluster.client() as c:
        ids = c.submit_many([f"e{i}" for i in range(300)])
        outs = [c.result(i, timeout=30) for i in ids]
    assert [o.split(b":", 1)[1] for o in outs] == [b"e%d" % i for i in range(300)]
    snap = cluster.snapshot()
    assert snap["totals"]["done"] == 300 and not snap["bad_messages"]
    bad = cluster.run("worker", "jobs_fixtures:Tester", "--broker", cluster.workers,
                      "--prefetch", "0")
    assert bad.returncode == 2 and "--prefetch" in bad.stderr and "0" in bad.stderr
    conf = cluster.root / "w.toml"
    conf.write_text("[worker]\nprefetch = 5000\n")
    bad = cluster.run("worker", "jobs_fixtures:Tester", "--broker", cluster.workers, "-c", str(conf))
    assert bad.returncode != 0 and "[worker] prefetch: 5000 is not from 1 to 1000" in bad.stderr


def test_a_class_with_a_bad_prefetch_is_named(cluster: Cluster) -> None:
    bad = cluster.run("worker", "jobs_fixtures:BadPrefetch", "--broker", cluster.workers)
    assert bad.returncode != 0 and "BadPrefetch.prefetch = 0" in bad.stderr


def test_a_held_job_cancelled_at_a_real_worker_never_runs(cluster: Cluster) -> None:
    cluster.broker()
    ran = cluster.root / "ran"
    with cluster.client() as c:
        ids, _, _ = _holding(cluster, c, 1.5, [f"started:{ran}:0", "x2"])
        info = c.cancel(ids[1])
        assert info is not None and info["state"] == "cancelled" and info["attempt"] == 0
        c.result(ids[0], timeout=15)
        c.result(ids[2], timeout=15)
    assert not ran.exists()
    snap = cluster.snapshot()
    assert not snap["bad_messages"] and snap["totals"]["done"] == 2

