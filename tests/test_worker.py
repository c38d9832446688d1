"""Worker processes and pools against real and fake brokers: answers kept until confirmed,
start-up failures, warm stops."""

from __future__ import annotations

import time

import pytest
import zmq

from respworkers import protocol

from conftest import Cluster, wait_for

pytestmark = pytest.mark.timeout(60)


class FakeBroker:
    """A real ROUTER on the workers endpoint, driven by the test."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)

    def recv(self, timeout: float = 10.0) -> tuple[bytes, object]:
        assert self.sock.poll(int(timeout * 1000)), "the worker said nothing"
        rid, *frames = self.sock.recv_multipart()
        return rid, protocol.decode_worker(frames)

    def recv_not_heartbeat(self, timeout: float = 10.0) -> tuple[bytes, object]:
        deadline = time.monotonic() + timeout
        while True:
            rid, msg = self.recv(max(0.01, deadline - time.monotonic()))
            if not isinstance(msg, protocol.Heartbeat):
                return rid, msg

    def send(self, rid: bytes, frames: list[bytes]) -> None:
        self.sock.send_multipart([rid, *frames])

    def close(self) -> None:
        self.sock.close()


def test_an_answer_is_kept_until_the_broker_confirms_it_not_just_until_it_speaks(
    cluster: Cluster,
) -> None:
    """A heartbeat the broker sent before the RESULT arrived does not confirm the RESULT: if the
    worker must reconnect, it sends the answer again (so the finished job is not run again)."""
    fake = FakeBroker(cluster.workers)
    conf = cluster.root / "w.toml"
    conf.write_text("[worker]\nheartbeat = 0.2\nliveness = 3\n")
    try:
        cluster.rw("worker", "jobs_fixtures:Tester", "--broker", cluster.workers, "-c", str(conf),
                   name="worker")
        rid, hello = fake.recv_not_heartbeat(20)
        assert isinstance(hello, protocol.Hello) and hello.job_id is None
        fake.send(rid, protocol.encode_welcome("fake", 0.2, 3))
        fake.send(rid, protocol.encode_job(b"j1", 1, 5.0, b"t0k", b"default", 5, 1, 0, [b"work"]))
        _, answer = fake.recv_not_heartbeat()
        assert isinstance(answer, protocol.WorkerResult) and answer.token == b"t0k"
        fake.send(rid, list(protocol.HEARTBEAT_FRAMES))  # not a confirmation
        # ... then silence: the worker reconnects and must bring its answer along
        rid2, again = fake.recv_not_heartbeat(10)
        assert rid2 != rid and isinstance(again, protocol.Hello)
        assert (again.job_id, again.attempt, again.token) == ("j1", 1, b"t0k")
        _, resent = fake.recv_not_heartbeat()
        assert isinstance(resent, protocol.WorkerResult) and resent.payload == answer.payload
        fake.send(rid2, protocol.encode_welcome("fake", 0.2, 3))
        fake.send(rid2, protocol.encode_ack(b"j1", 1))  # confirmed now: nothing more comes
        for _ in range(3):  # it keeps beating on this socket and sends the answer no more
            rid3, msg = fake.recv()
            assert rid3 == rid2 and isinstance(msg, protocol.Heartbeat)
    finally:
        fake.close()


def test_a_pool_whose_workers_cannot_start_gives_up_with_the_reason(cluster: Cluster) -> None:
    cluster.broker()
    pool = cluster.rw("worker", "jobs_fixtures:BadSetup", "--broker", cluster.workers, "-n", "5",
                      name="worker")
    assert pool.wait(30) == 2
    out = pool.output()
    assert "failed to start 5 times" in out
    assert "RuntimeError: the model file is missing" in out and "jobs_fixtures.py:" in out
    assert "in setup" in out
    assert "Process rw-worker" not in out  # tracebacks go through logging, not raw to stderr
    assert cluster.snapshot()["workers"] == []


def test_a_warm_stop_delivers_the_last_answer_and_leaves_no_ghost(cluster: Cluster) -> None:
    cluster.broker()
    pool = cluster.pool(n=1)
    with cluster.client() as c:
        job = c.submit("sleep:1")
        wait_for(lambda: cluster.snapshot()["workers"][0]["state"] == "busy", what="the job")
        pool.signal()
        assert c.result(job, timeout=15).endswith(b":sleep:1")
    assert pool.wait(15) == 0
    time.sleep(0.5)
    snap = cluster.snapshot()
    assert snap["workers"] == [] and snap["totals"]["lost_workers"] == 0
