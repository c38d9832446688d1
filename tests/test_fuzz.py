"""Garbage on every socket: random and mutated multipart messages, then real work must still flow."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from respworkers import protocol
from respworkers.errors import ProtocolError

from conftest import Cluster, wait_for

pytestmark = pytest.mark.timeout(300)

VALID = {
    "clients": [
        protocol.encode_submit("fz-1", "default", protocol.Options(1.0, 2), [b"hello"]),
        protocol.encode_job_ref(protocol.WAIT, "fz-1"),
        protocol.encode_job_ref(protocol.QUERY, "fz-1"),
        protocol.encode_job_ref(protocol.CANCEL, "fz-1"),
        protocol.encode_ping(),
        protocol.encode_submits([
            protocol.encode_submit("fz-2", "fuzz-q", protocol.Options(None, 1), [b"a"]),
            protocol.encode_submit("fz-3", "default", protocol.Options(2.0, None), [b"b", b"c"])]),
        [b"", b"plain payload"],
        [b"", b"plain", b"", b"three frames"],
    ],
    "workers": [
        protocol.encode_hello(["fuzz-only"], {"name": "fuzz", "heartbeat": 0.1}),
        protocol.encode_hello(["fuzz-only", "fuzz-2"], {"name": "fuzz", "heartbeat": 0.1}, "fz-1", 1,
                              b"0123456789abcdef0123456789abcdef"),
        protocol.encode_worker_result("fz-1", 1, b"0123456789abcdef0123456789abcdef", True, [b"r"]),
        protocol.encode_worker_error("fz-1", 1, b"0123456789abcdef0123456789abcdef", True, "boom"),
        protocol.encode_return("fz-1", 1, b"0123456789abcdef0123456789abcdef"),
        protocol.encode_vacate("fuzz:1:0:0123"),
        list(protocol.HEARTBEAT_FRAMES),
        list(protocol.BYE_FRAMES),
    ],
    "status": [protocol.encode_status_request()],
}

frames_st = st.lists(st.binary(max_size=40), min_size=0, max_size=10)


_ODD_WORDS = [b"", b"0", b"1", b"-1", b"x" * 201, b"a\x00b", b"a\tb", b"\xff", b"a,,b", b"RWC1",
              b"RWW1", b"RWC2", b"RWW2", b"RWW3", b"SUBMIT", b"RESULT", b"HELLO", b"999999999999999"]


@st.composite
def mutated_line(draw: st.DrawFn, line: bytes) -> bytes:
    """A command line with one word dropped, replaced, duplicated or swapped, or a space doubled."""
    words = line.split(b" ")
    how = draw(st.sampled_from(["drop", "replace", "dup", "swap", "append", "space", "tab"]))
    i = draw(st.integers(0, len(words) - 1))
    if how == "drop":
        del words[i]
    elif how == "replace":
        words[i] = draw(st.one_of(st.sampled_from(_ODD_WORDS), st.binary(max_size=12)))
    elif how == "dup":
        words.insert(i, words[i])
    elif how == "swap":
        j = draw(st.integers(0, len(words) - 1))
        words[i], words[j] = words[j], words[i]
    elif how == "append":
        words.append(draw(st.sampled_from(_ODD_WORDS)))
    else:  # two spaces, or a tab, where one space belongs
        sep = b"  " if how == "space" else b"\t"
        return b" ".join(words[:i]) + (sep if i else b"") + b" ".join(words[i:])
    return b" ".join(words)


@st.composite
def mutated(draw: st.DrawFn, socket_name: str) -> list[bytes]:
    """A valid message with one frame dropped, replaced, duplicated, truncated or appended,
    or with one word of its command line changed."""
    msg = list(draw(st.sampled_from(VALID[socket_name])))
    how = draw(st.sampled_from(["drop", "replace", "dup", "truncate", "append", "swap", "line", "line"]))
    i = draw(st.integers(0, max(0, len(msg) - 1)))
    if how == "line" and msg and msg[0]:  # the status endpoint's first frame is empty: no line
        msg[0] = draw(mutated_line(msg[0]))
    elif how == "drop" and msg:
        del msg[i]
    elif how == "replace" and msg:
        msg[i] = draw(st.binary(max_size=30))
    elif how == "dup" and msg:
        msg.insert(i, msg[i])
    elif how == "truncate" and msg:
        msg[i] = msg[i][: draw(st.integers(0, len(msg[i])))]
    elif how == "append":
        msg.append(draw(st.binary(max_size=30)))
    elif how == "swap" and len(msg) > 1:
        j = draw(st.integers(0, len(msg) - 1))
        msg[i], msg[j] = msg[j], msg[i]
    return msg


@pytest.fixture(scope="module")
def fuzz_cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="rw-", dir="/tmp"))
    c = Cluster(root)
    try:
        conf = root / "fast-beat.toml"
        conf.write_text("[broker]\nheartbeat = 0.2\n")
        c.broker("-c", str(conf))
        c.pool("jobs_fixtures:Tester", 2)
        yield c
    finally:
        c.cleanup()
        shutil.rmtree(root, ignore_errors=True)


class Sockets:
    def __init__(self, cluster: Cluster) -> None:
        ctx = zmq.Context.instance()
        self.socks = {}
        for name, endpoint in (("clients", cluster.clients), ("workers", cluster.workers),
                               ("status", cluster.status)):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 100_000)
            s.connect(endpoint)
            self.socks[name] = s

    def send(self, name: str, frames: list[bytes]) -> None:
        s = self.socks[name]
        if frames:
            s.send_multipart(frames, zmq.NOBLOCK)
        while s.poll(0):  # drain whatever the broker answered
            s.recv_multipart()

    def close(self) -> None:
        for s in self.socks.values():
            s.close()


_sockets: dict[int, Sockets] = {}


def _socks(cluster: Cluster) -> Sockets:
    if id(cluster) not in _sockets:
        _sockets[id(cluster)] = Sockets(cluster)
    return _sockets[id(cluster)]


SETTINGS = settings(max_examples=500, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@SETTINGS
@given(data=st.data())
def test_random_and_mutated_messages_on_every_socket(fuzz_cluster: Cluster, data: st.DataObject
                                                     ) -> None:
    socks = _socks(fuzz_cluster)
    for name in ("clients", "workers", "status"):
        if data.draw(st.booleans()):
            socks.send(name, data.draw(frames_st))
        else:
            socks.send(name, data.draw(mutated(name)))


def test_after_the_fuzzing_the_broker_serves_a_normal_batch(fuzz_cluster: Cluster) -> None:
    """Runs after the fuzz test in this module: the broker is up and works as before."""
    socks = _sockets.pop(id(fuzz_cluster), None)
    if socks is not None:
        socks.close()
    snap = fuzz_cluster.snapshot()
    assert sum(snap["bad_messages"].values()) > 200, snap["bad_messages"]
    assert {key.split(":")[0] for key in snap["bad_messages"]} == {"clients", "workers", "status"}
    # fake workers registered by well-formed fuzz HELLOs go away once they stop beating
    wait_for(lambda: len(fuzz_cluster.snapshot()["workers"]) == 2, 20,
             what="only the two real workers to remain")
    with fuzz_cluster.client() as c:
        ids = [c.submit(f"after-fuzz-{i}") for i in range(200)]
        got = {r.id: r for r in c.results(ids, timeout=60)}
    assert all(got[i].ok and got[i].payload.endswith(f":after-fuzz-{n}".encode())
               for n, i in enumerate(ids))
    assert fuzz_cluster.procs[0].popen.poll() is None  # the broker never died


def test_worker_survives_garbage_from_its_broker(tmp_path: Path) -> None:
    """A fake broker sends a worker garbage, then a real job: the worker answers it."""
    root = Path(tempfile.mkdtemp(prefix="rw-", dir="/tmp"))
    cluster = Cluster(root)
    ctx = zmq.Context.instance()
    fake = ctx.socket(zmq.ROUTER)
    fake.setsockopt(zmq.LINGER, 0)
    fake.bind(cluster.workers)
    try:
        cluster.rw("worker", "jobs_fixtures:Tester", "--broker", cluster.workers, name="worker")
        assert fake.poll(20_000), "the worker never said HELLO"
        wid, *hello = fake.recv_multipart()
        assert protocol.decode_worker(hello).__class__ is protocol.Hello
        fake.send_multipart([wid, *protocol.encode_welcome("fake", 5.0, 3)])
        garbage = [[b"RWW3"], [b"RWW3 JOB"], [b"RWW3 JOB x 1 1000 t"], [b"RWW3 JOB  1 1000 t", b"p"],
                   [b"RWW3 JOB x 0 1000 t", b"p"], [b"RWW3 JOB x 1 0 t", b"p"],
                   [b"RWW3 JOB x 1 1000 t 1", b"p"], [b"RWW3 JOB x 1 1000", b"p"],
                   [b"RWW3 JOB x\x00y 1 1000 t", b"p"], [b"RWW3  JOB x 1 1000 t", b"p"],
                   [b"", b"RWW3 JOB x 1 1000 t", b"p"], [b"nonsense"], [b"RWW3 WELCOME", b"{"],
                   [b"RWW3 WELCOME", b"[]"], [b"RWW3 WELCOME"], [b"RWW3 ???"], [b"RWW3 ACK x"],
                   [b"RWW2 JOB a 1 10", b"p"], [b"RWW9 JOB a 1 10 t", b"p"],
                   [b"RWW1", b"JOB", b"a", b"1", b"10"], [b""]]
        for g in garbage:  # every one of them is malformed
            with pytest.raises(ProtocolError):
                protocol.decode_broker(g)
        for g in garbage * 20:
            fake.send_multipart([wid, *g])
        fake.send_multipart([wid, *protocol.encode_job(b"real", 1, 5.0, b"tok", b"default", 5, 1, 0,
                                                          [b"ping"])])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert fake.poll(20_000)
            _, *msg = fake.recv_multipart()
            decoded = protocol.decode_worker(msg)
            if isinstance(decoded, protocol.WorkerResult):
                assert decoded.job_id == "real" and decoded.payload[0].endswith(b":ping")
                break
        else:
            raise AssertionError("no answer to the real job")
        assert "ignored a bad message from the broker" in cluster.procs[0].output()
    finally:
        fake.close()
        cluster.cleanup()
        shutil.rmtree(root, ignore_errors=True)
