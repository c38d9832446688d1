"""BrokerCore driven step by step: no sockets, a fake clock, decoded traffic in both directions."""

from __future__ import annotations

import random
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from respworkers import __version__
from respworkers import protocol as p
from respworkers.broker.core import BrokerCore
from respworkers.config import BrokerConfig

pytestmark = pytest.mark.timeout(30)

C1, C2, C3 = b"client-1", b"client-2", b"client-3"
W1, W2, W3, W4 = b"worker-1", b"worker-2", b"worker-3", b"worker-4"
NAMES = {W1: "w1", W2: "w2", W3: "w3", W4: "w4"}
T0 = 1000.0
WALL0 = 1_700_000_000.0


class R(NamedTuple):
    """A reply as these tests compare it: the command, the job id and the frames after it."""

    command: bytes
    job_id: str
    frames: list[bytes]
    info: dict[str, Any] | None = None
    batch: list[tuple[str, list[bytes]]] | None = None


def view(reply: p.ClientReply) -> R:
    kind = type(reply)
    if kind is p.Accepted:
        return R(p.ACCEPTED, reply.job_ids[0], [i.encode() for i in reply.job_ids[1:]])
    if kind is p.Result:
        return R(p.RESULT, reply.job_id, reply.frames)
    if kind is p.Results:
        return R(p.RESULTS, "", [], None, reply.entries)
    if kind is p.Failed:
        return R(p.FAILED, reply.job_id, [reply.reason.encode(), reply.error.encode()])
    if kind is p.Refused:
        return R(p.REFUSED, reply.job_id, [reply.code.encode(), reply.text.encode()])
    if kind is p.Info:
        return R(p.INFO, reply.job_id, [], reply.info)
    if kind in (p.Cancelled, p.Unknown, p.Expired):
        return R({p.Cancelled: p.CANCELLED, p.Unknown: p.UNKNOWN, p.Expired: p.EXPIRED}[kind],
                 reply.job_id, [])
    if kind is p.Pong:
        return R(p.PONG, "", [reply.broker_id.encode()], reply.limits)
    if kind is p.Invalid:
        return R(p.INVALID, "", [reply.reason.encode()])
    return R(p.RESYNC, "", [])


class Harness:
    """A BrokerCore with recording send callables and a fake clock."""

    def __init__(self, **overrides: Any) -> None:
        # A long heartbeat keeps workers alive in tests that are not about liveness.
        # Retries at once (no backoff) unless a test is about backoff.
        cfg = {"timeout": 60.0, "tries": 3, "heartbeat": 1000.0, "liveness": 3, "backoff": 0.0}
        cfg.update(overrides)
        self.cfg = BrokerConfig(**cfg)
        self.client_out: list[tuple[bytes, list[bytes]]] = []
        self.worker_out: list[tuple[bytes, list[bytes]]] = []
        self.tokens: dict[tuple[str, int], bytes] = {}  # the token the broker sent per attempt
        self.core = BrokerCore(
            self.cfg,
            lambda rid, frames: self.client_out.append((rid, list(frames))),
            self._to_worker,
        )
        self.mono = T0
        self.wall = WALL0
        self.core.set_time(self.mono, self.wall)
        self.core.tick()

    def _to_worker(self, rid: bytes, frames: list[bytes]) -> None:
        self.worker_out.append((rid, list(frames)))
        if frames[0].startswith(b"RWW3 JOB "):
            job = p.decode_broker(frames)
            self.tokens[(job.job_id, job.attempt)] = job.token

    def token(self, job_id: str | None, attempt: int) -> bytes:
        """The token the broker sent with this attempt (a worker that got it echoes it)."""
        return self.tokens.get((job_id, attempt), b"never-sent") if job_id else b""

    # ------------------------------------------------------------------ clock
    def advance(self, dt: float) -> float:
        self.mono += dt
        self.wall += dt
        self.core.set_time(self.mono, self.wall)
        return self.core.tick()

    def at(self, mono: float) -> float:
        return self.advance(mono - self.mono)

    # ------------------------------------------------------------------ clients
    def submit(self, client: bytes, job_id: str, payload=(b"in",), queue: str = p.DEFAULT_QUEUE,
               timeout=None, tries=None, flush: bool = True) -> None:
        self.core.on_client(client, p.encode_submit(job_id, queue, p.Options(timeout, tries), list(payload)))
        if flush:
            self.core.flush()

    def ref(self, client: bytes, command: bytes, job_id: str) -> None:
        self.core.on_client(client, p.encode_job_ref(command, job_id))

    # ------------------------------------------------------------------ workers
    def hello(self, wid: bytes, queues=("default",), info: dict | None = None, job_id=None,
              attempt: int = 0, token: bytes | None = None) -> None:
        info = {"name": NAMES.get(wid, wid.decode())} if info is None else info
        token = self.token(job_id, attempt) if token is None else token
        self.core.on_worker(wid, p.encode_hello(tuple(queues), info, job_id, attempt, token))

    def result(self, wid: bytes, job_id: str, attempt: int, ready: bool = True, payload=(b"out",),
               token: bytes | None = None) -> None:
        token = self.token(job_id, attempt) if token is None else token
        self.core.on_worker(wid, p.encode_worker_result(job_id, attempt, token, ready, list(payload)))

    def error(self, wid: bytes, job_id: str, attempt: int, text: str, ready: bool = True,
              token: bytes | None = None) -> None:
        token = self.token(job_id, attempt) if token is None else token
        self.core.on_worker(wid, p.encode_worker_error(job_id, attempt, token, ready, text))

    def give_back(self, wid: bytes, job_id: str, attempt: int, token: bytes | None = None) -> None:
        token = self.token(job_id, attempt) if token is None else token
        self.core.on_worker(wid, p.encode_return(job_id, attempt, token))

    def beat(self, *wids: bytes) -> None:
        for wid in wids:
            self.core.on_worker(wid, p.HEARTBEAT_FRAMES)

    # ------------------------------------------------------------------ what was sent
    def raw_to_client(self, client: bytes) -> list[list[bytes]]:
        out = [f for rid, f in self.client_out if rid == client]
        self.client_out = [(rid, f) for rid, f in self.client_out if rid != client]
        return out

    def to_client(self, client: bytes) -> list[R]:
        return [view(p.decode_reply(f)) for f in self.raw_to_client(client)]

    def to_worker(self, wid: bytes) -> list[Any]:
        out = [p.decode_broker(f) for rid, f in self.worker_out if rid == wid]
        self.worker_out = [(rid, f) for rid, f in self.worker_out if rid != wid]
        return out

    def jobs_to(self, wid: bytes) -> list[p.Dispatch]:
        """The JOBs sent to one worker since the last look (other messages are discarded)."""
        return [m for m in self.to_worker(wid) if isinstance(m, p.Dispatch)]

    def job_to(self, wid: bytes) -> p.Dispatch:
        jobs = self.jobs_to(wid)
        assert len(jobs) == 1, jobs
        return jobs[0]

    def clear(self) -> None:
        self.client_out.clear()
        self.worker_out.clear()

    # ------------------------------------------------------------------ state
    def snap(self) -> dict[str, Any]:
        return self.core.snapshot()

    def worker_state(self, wid: bytes) -> str | None:
        for w in self.snap()["workers"]:
            if w["id"] == wid.hex():
                return w["state"]
        return None

    def info(self, job_id: str) -> dict[str, Any]:
        self.ref(C3, p.QUERY, job_id)
        (reply,) = self.to_client(C3)
        assert reply.command == p.INFO
        assert reply.info is not None
        return reply.info


def dispatch(h: Harness, job_id: str, attempt: int, timeout: float, payload: list[bytes],
             queue: str = p.DEFAULT_QUEUE, priority: int = 5, tries: int = 3) -> p.Dispatch:
    """The JOB a worker should get for this attempt of a job submitted at the start."""
    return p.Dispatch(job_id, attempt, timeout, h.token(job_id, attempt), queue, priority, tries,
                      round(WALL0, 3), payload)


def counts(row: dict[str, Any]) -> dict[str, Any]:
    """A snapshot's queue row without its times (scheduled, oldest_wait, tenants)."""
    return {k: row[k] for k in ("queued", "running", "workers", "idle")}


def ids(jobs: list[p.Dispatch]) -> list[tuple[str, int]]:
    return [(j.job_id, j.attempt) for j in jobs]


def outcome(replies: list[p.Reply]) -> list[tuple[bytes, str, list[bytes]]]:
    return [(r.command, r.job_id, r.frames) for r in replies]


@pytest.fixture
def h() -> Harness:
    return Harness()


# ================================================================================================
# on-demand dispatch
# ================================================================================================


def test_queued_job_goes_to_a_worker_only_after_hello(h):
    h.submit(C1, "j1", payload=[b"a", b"b"])
    assert h.to_client(C1) == [R(p.ACCEPTED, "j1", [])]
    assert h.worker_out == []
    assert h.snap()["queued"] == 1

    # an unregistered worker that only heartbeats is told to register, and gets no job
    h.beat(W1)
    assert h.to_worker(W1) == [p.Disconnect("unknown worker, say HELLO")]

    h.hello(W1)
    msgs = h.to_worker(W1)
    assert isinstance(msgs[0], p.Welcome)
    assert msgs[0] == p.Welcome(h.core.broker_id, 1000.0, 3, h.core.cfg.max_message_size)
    assert msgs[1:] == [dispatch(h, "j1", 1, 60.0, [b"a", b"b"])]
    assert h.snap()["queued"] == 0
    assert h.snap()["in_flight"] == 1
    assert h.worker_state(W1) == "busy"


def test_job_submitted_while_a_worker_is_idle_goes_to_it_at_once(h):
    h.hello(W1)
    assert h.jobs_to(W1) == []
    assert h.worker_state(W1) == "idle"
    h.submit(C1, "j1")
    assert ids(h.jobs_to(W1)) == [("j1", 1)]
    assert h.worker_state(W1) == "busy"


def test_accepted_is_sent_only_on_flush(h):
    h.submit(C1, "j1", flush=False)
    assert h.to_client(C1) == []
    h.core.flush()
    assert h.raw_to_client(C1) == [[b"RWC3 ACCEPTED j1"]]
    h.core.flush()
    assert h.to_client(C1) == []
    # one ACCEPTED line per client per batch, naming its jobs in order
    h.submit(C1, "j2", flush=False)
    h.submit(C2, "j3", flush=False)
    h.submit(C1, "j4", flush=False)
    h.core.flush()
    assert h.raw_to_client(C1) == [[b"RWC3 ACCEPTED j2 j4"]]
    assert h.raw_to_client(C2) == [[b"RWC3 ACCEPTED j3"]]


def test_busy_worker_never_gets_a_second_job(h):
    h.hello(W1)
    for i in range(10):
        h.submit(C1, f"j{i}")
    assert ids(h.jobs_to(W1)) == [("j0", 1)]
    h.advance(1.0)
    h.beat(W1)
    h.hello(W2)  # another worker arrives: it takes the next one, W1 still holds only j0
    assert ids(h.jobs_to(W2)) == [("j1", 1)]
    assert h.jobs_to(W1) == []
    assert h.snap()["queued"] == 8
    assert counts(h.snap()["queues"]["default"]) == {"queued": 8, "running": 2, "workers": 2, "idle": 0}


def test_ready_worker_gets_the_next_oldest_job_in_order(h):
    h.hello(W1)
    for i in range(4):
        h.submit(C1, f"j{i}")
    seen = []
    for _ in range(4):
        (job,) = h.jobs_to(W1)
        seen.append(job.job_id)
        h.result(W1, job.job_id, job.attempt, ready=True, payload=[job.job_id.encode()])
    assert seen == ["j0", "j1", "j2", "j3"]
    assert h.jobs_to(W1) == []
    assert h.worker_state(W1) == "idle"
    results = [r for r in h.to_client(C1) if r.command == p.RESULT]
    assert [(r.job_id, r.frames) for r in results] == [(f"j{i}", [f"j{i}".encode()]) for i in range(4)]
    assert h.snap()["totals"]["done"] == 4


def test_worker_answering_not_ready_gets_nothing(h):
    h.hello(W1)
    h.submit(C1, "j1")
    h.submit(C1, "j2")
    h.job_to(W1)
    h.result(W1, "j1", 1, ready=False)
    assert h.jobs_to(W1) == []
    assert h.worker_state(W1) == "stopping"
    assert h.snap()["queued"] == 1
    assert [r.command for r in h.to_client(C1)] == [p.ACCEPTED, p.ACCEPTED, p.RESULT]
    # a new submission does not wake it either
    h.submit(C2, "j3")
    assert h.jobs_to(W1) == []
    assert h.snap()["queued"] == 2


# ================================================================================================
# queues
# ================================================================================================


def test_job_for_an_unserved_queue_stays_queued(h):
    h.hello(W1)  # serves "default" only
    h.submit(C1, "g1", queue="gpu")
    assert h.jobs_to(W1) == []
    snap = h.snap()
    assert counts(snap["queues"]["gpu"]) == {"queued": 1, "running": 0, "workers": 0, "idle": 0}
    assert counts(snap["queues"]["default"]) == {"queued": 0, "running": 0, "workers": 1, "idle": 1}
    assert snap["queued"] == 1
    assert h.info("g1")["state"] == "queued"
    h.hello(W2, queues=("gpu",))
    assert ids(h.jobs_to(W2)) == [("g1", 1)]
    assert "gpu" not in h.snap()["queues"] or h.snap()["queues"]["gpu"]["queued"] == 0


def test_worker_serving_several_queues_gets_the_oldest_across_them(h):
    h.submit(C1, "b1", queue="b")
    h.submit(C1, "a1", queue="a")
    h.submit(C1, "c1", queue="c")  # not served by W1
    h.submit(C1, "b2", queue="b")
    h.submit(C1, "a2", queue="a")
    h.hello(W1, queues=("a", "b"))
    order = []
    for _ in range(4):
        (job,) = h.jobs_to(W1)
        order.append(job.job_id)
        h.result(W1, job.job_id, job.attempt)
    assert order == ["b1", "a1", "b2", "a2"]
    assert h.jobs_to(W1) == []
    assert h.snap()["queues"]["c"]["queued"] == 1


def test_idle_worker_of_one_queue_does_not_take_another_queues_job(h):
    h.hello(W1, queues=("a",))
    h.hello(W2, queues=("b",))
    h.submit(C1, "jb", queue="b")
    assert h.jobs_to(W1) == []
    assert ids(h.jobs_to(W2)) == [("jb", 1)]


# ================================================================================================
# time limits and retries
# ================================================================================================


def test_timeout_redispatches_to_a_different_ready_worker(h):
    h.hello(W1)
    h.submit(C1, "j1", timeout=5.0)
    assert h.job_to(W1) == dispatch(h, "j1", 1, 5.0, [b"in"])
    h.hello(W2)
    h.advance(4.999)
    assert h.jobs_to(W2) == []
    h.advance(0.001)
    assert h.job_to(W2) == dispatch(h, "j1", 2, 5.0, [b"in"])
    assert h.jobs_to(W1) == []
    info = h.info("j1")
    assert (info["state"], info["attempt"], info["workers_tried"], info["worker"]) == (
        "running", 2, ["w1", "w2"], "w2"
    )
    assert h.snap()["totals"]["retried"] == 1
    assert h.to_client(C1) == [R(p.ACCEPTED, "j1", [])]


def test_timed_out_job_waits_for_a_free_worker_at_the_front_of_its_queue(h):
    h.hello(W1)
    h.submit(C1, "j1", timeout=5.0)
    h.submit(C1, "j2")
    h.submit(C1, "j3")
    assert ids(h.jobs_to(W1)) == [("j1", 1)]
    h.advance(5.0)
    assert h.jobs_to(W1) == []
    assert h.info("j1")["state"] == "queued"
    assert h.snap()["queued"] == 3
    assert h.worker_state(W1) == "busy"  # it still holds the attempt it was late on
    h.hello(W2)
    assert ids(h.jobs_to(W2)) == [("j1", 2)]  # the retry is first in line


def test_default_timeout_and_tries_come_from_the_config():
    h = Harness(timeout=7.0, tries=2)
    h.hello(W1)
    h.hello(W2)
    h.hello(W3)
    h.submit(C1, "j1")
    assert h.job_to(W1).timeout == 7.0
    h.advance(7.0)
    assert ids(h.jobs_to(W2)) == [("j1", 2)]
    h.advance(7.0)
    assert h.jobs_to(W3) == []
    (_, failed) = h.to_client(C1)
    assert failed.command == p.FAILED
    assert failed.frames[0] == b"timeout"


def test_per_job_timeout_and_tries_override_defaults(h):
    # defaults: 60 s, 3 tries; this job: 2 s, 1 try
    h.hello(W1)
    h.hello(W2)
    h.submit(C1, "j1", timeout=2.0, tries=1)
    assert h.job_to(W1).timeout == 2.0
    h.advance(1.9)
    assert h.to_client(C1) == [R(p.ACCEPTED, "j1", [])]
    h.advance(0.1)
    assert h.jobs_to(W2) == []
    (failed,) = h.to_client(C1)
    assert failed.command == p.FAILED and failed.job_id == "j1"
    assert failed.frames[0] == b"timeout"
    assert b"2s" in failed.frames[1]
    info = h.info("j1")
    assert (info["state"], info["reason"], info["attempt"], info["tries"]) == ("failed", "timeout", 1, 1)
    snap = h.snap()
    assert snap["totals"]["failed"] == 1
    assert snap["recent_failures"][0]["id"] == "j1"
    assert snap["recent_failures"][0]["reason"] == "timeout"


def test_fails_with_timeout_after_the_last_try(h):
    for wid in (W1, W2, W3):
        h.hello(wid)
    h.submit(C1, "j1", timeout=1.0, tries=3)
    h.to_client(C1)
    seen = []
    for wid in (W1, W2, W3):
        (job,) = h.jobs_to(wid)
        seen.append((wid, job.attempt))
        h.advance(1.0)
    assert seen == [(W1, 1), (W2, 2), (W3, 3)]
    (failed,) = h.to_client(C1)
    assert failed.command == p.FAILED
    assert failed.frames[0] == b"timeout"
    assert b"attempt 3 of 3" in failed.frames[1]
    h.advance(10.0)
    assert h.to_client(C1) == []  # told exactly once
    assert h.snap()["in_flight"] == 0


def test_plain_req_client_gets_one_empty_frame_on_failure(h):
    h.hello(W1)
    h.core.on_client(C1, [b"", b"raw", b"payload"])
    h.core.flush()
    assert h.raw_to_client(C1) == []  # no ACCEPTED for plain requests
    job = h.job_to(W1)
    assert job.payload == [b"raw", b"payload"]
    assert job.timeout == 60.0
    for attempt in (1, 2, 3):
        h.advance(60.0)
        if attempt < 3:
            h.error(W1, job.job_id, attempt, "late", ready=True)  # frees W1 for the retry
            assert h.job_to(W1).attempt == attempt + 1
    assert h.raw_to_client(C1) == [[b"", b""]]


def test_plain_req_client_gets_the_result_frames(h):
    h.hello(W1)
    h.core.on_client(C1, [b"", b"ping"])
    job = h.job_to(W1)
    assert job.job_id.startswith("req-")
    h.result(W1, job.job_id, 1, payload=[b"pong", b"2"])
    assert h.raw_to_client(C1) == [[b"", b"pong", b"2"]]


def test_retry_prefers_a_worker_that_has_not_tried_the_job(h):
    h.hello(W1)
    h.hello(W2)
    h.submit(C1, "j1", timeout=5.0, tries=3)
    assert ids(h.jobs_to(W1)) == [("j1", 1)]
    h.advance(5.0)
    assert ids(h.jobs_to(W2)) == [("j1", 2)]
    # W1 gives up on its stale attempt and is ready again, before W3 arrives
    h.error(W1, "j1", 1, "gave up", ready=True)
    assert h.jobs_to(W1) == []
    h.hello(W3)
    assert h.worker_state(W1) == "idle" and h.worker_state(W3) == "idle"
    h.advance(5.0)
    assert h.jobs_to(W1) == []
    assert ids(h.jobs_to(W3)) == [("j1", 3)]


# ================================================================================================
# late answers and duplicates
# ================================================================================================


def test_late_answer_is_accepted_and_the_retry_answer_is_a_duplicate(h):
    h.hello(W1)
    h.hello(W2)
    h.submit(C1, "j1", timeout=5.0)
    h.to_client(C1)
    h.job_to(W1)
    h.advance(5.0)
    assert ids(h.jobs_to(W2)) == [("j1", 2)]

    h.result(W1, "j1", 1, payload=[b"from-w1"])
    assert h.to_client(C1) == [R(p.RESULT, "j1", [b"from-w1"])]
    assert h.snap()["totals"]["late"] == 1
    assert h.info("j1")["state"] == "done"
    assert h.snap()["in_flight"] == 0

    h.result(W2, "j1", 2, payload=[b"from-w2"])
    assert h.to_client(C1) == []
    totals = h.snap()["totals"]
    assert totals["duplicates"] == 1
    assert totals["done"] == 1
    assert h.worker_state(W2) == "idle"
    # the first answer is the one kept
    h.ref(C2, p.WAIT, "j1")
    assert h.to_client(C2) == [R(p.RESULT, "j1", [b"from-w1"])]


def test_late_answer_before_the_retry_started_is_accepted(h):
    h.hello(W1)
    h.submit(C1, "j1", timeout=5.0)
    h.to_client(C1)
    h.job_to(W1)
    h.advance(5.0)
    assert h.snap()["queued"] == 1
    h.result(W1, "j1", 1, ready=True)
    assert h.to_client(C1) == [R(p.RESULT, "j1", [b"out"])]
    assert h.snap()["queued"] == 0
    assert h.snap()["totals"]["late"] == 1
    assert h.jobs_to(W1) == []  # the retry was withdrawn
    assert h.worker_state(W1) == "idle"
    h.hello(W2)
    assert h.jobs_to(W2) == []


# ================================================================================================
# worker errors
# ================================================================================================


def test_error_is_retried_at_once_on_another_worker(h):
    h.hello(W1)
    h.hello(W2)
    h.submit(C1, "j1")
    h.to_client(C1)
    assert ids(h.jobs_to(W1)) == [("j1", 1)]
    h.error(W1, "j1", 1, "Traceback: ValueError", ready=True)
    assert ids(h.jobs_to(W2)) == [("j1", 2)]  # no clock advance needed
    assert h.jobs_to(W1) == []
    assert h.worker_state(W1) == "idle"
    assert h.to_client(C1) == []
    info = h.info("j1")
    assert (info["attempt"], info["workers_tried"]) == (2, ["w1", "w2"])
    assert info["error"] == "Traceback: ValueError"


def test_error_after_the_last_try_fails_with_the_traceback(h):
    h.hello(W1)
    h.submit(C1, "j1", tries=2)
    h.to_client(C1)
    h.error(W1, "j1", 1, "Traceback 1", ready=True)
    assert ids(h.jobs_to(W1)) == [("j1", 1), ("j1", 2)]  # only worker: retried on it
    h.error(W1, "j1", 2, "Traceback (most recent call last):\n  boom\nKeyError: 'x'", ready=True)
    (failed,) = h.to_client(C1)
    assert failed == R(
        p.FAILED, "j1", [b"error", b"Traceback (most recent call last):\n  boom\nKeyError: 'x'"]
    )
    assert h.jobs_to(W1) == []
    assert h.worker_state(W1) == "idle"
    assert h.snap()["totals"]["failed"] == 1


def test_worker_that_failed_a_retry_takes_other_queued_work_instead(h):
    h.hello(W1)
    h.hello(W2)
    h.submit(C1, "j1")
    h.submit(C1, "j2")
    h.submit(C1, "j3")
    assert ids(h.jobs_to(W1)) == [("j1", 1)]
    assert ids(h.jobs_to(W2)) == [("j2", 1)]
    h.error(W1, "j1", 1, "boom", ready=True)  # no idle worker: j1 waits at the front
    assert ids(h.jobs_to(W1)) == [("j3", 1)]  # W1 already failed j1 and there is other work
    h.result(W2, "j2", 1, ready=True)
    assert ids(h.jobs_to(W2)) == [("j1", 2)]


def test_idle_workers_are_used_longest_idle_first(h):
    h.hello(W1)
    h.hello(W2)
    h.submit(C1, "j1")
    assert ids(h.jobs_to(W1)) == [("j1", 1)]
    h.result(W1, "j1", 1, ready=True)  # W1 idle again, after W2
    h.submit(C1, "j2")
    assert ids(h.jobs_to(W2)) == [("j2", 1)]
    h.submit(C1, "j3")
    assert ids(h.jobs_to(W1)) == [("j3", 1)]


def test_error_from_a_worker_not_ready_leaves_it_stopping(h):
    h.hello(W1)
    h.hello(W2)
    h.submit(C1, "j1")
    h.submit(C1, "j2")
    h.error(W1, "j1", 1, "boom", ready=False)
    assert h.worker_state(W1) == "stopping"
    assert ids(h.jobs_to(W2)) == [("j2", 1)]
    assert h.info("j1")["state"] == "queued"


# ================================================================================================
# heartbeats and lost workers
# ================================================================================================


def test_silent_worker_is_dropped_and_its_job_redispatched():
    h = Harness(heartbeat=1.0, liveness=3)
    h.hello(W1)
    h.hello(W2)
    h.submit(C1, "j1", tries=3)
    h.to_client(C1)
    assert ids(h.jobs_to(W1)) == [("j1", 1)]
    for _ in range(3):  # t0+1 .. t0+3: W1 silent for 3 s = liveness*heartbeat, not beyond
        h.advance(1.0)
        h.beat(W2)
    assert h.worker_state(W1) == "busy"
    assert h.jobs_to(W2) == []
    h.advance(1.0)  # silent for 4 s > 3 s
    assert h.worker_state(W1) is None
    assert ids(h.jobs_to(W2)) == [("j1", 2)]
    totals = h.snap()["totals"]
    assert totals["lost_workers"] == 1
    assert totals["retried"] == 1
    info = h.info("j1")
    assert info["attempt"] == 2 and info["workers_tried"] == ["w1", "w2"]
    assert "stopped answering" in info["error"]
    h.clear()
    h.beat(W1)  # it comes back from the dead: told to register again
    assert h.to_worker(W1) == [p.Disconnect("unknown worker, say HELLO")]


def test_lost_worker_on_the_last_try_fails_the_job_as_worker_lost():
    h = Harness(heartbeat=1.0, liveness=2, tries=1)
    h.hello(W1)
    h.submit(C1, "j1")
    h.to_client(C1)
    h.advance(1.0)
    h.advance(1.0)
    assert h.to_client(C1) == []
    h.advance(1.0)
    (failed,) = h.to_client(C1)
    assert failed.command == p.FAILED
    assert failed.frames[0] == b"worker-lost"


def test_malformed_messages_do_not_keep_a_worker_alive():
    h = Harness(heartbeat=1.0, liveness=2)
    h.hello(W1)
    for _ in range(3):
        h.core.on_worker(W1, [b"RWW3 NOPE"])
        h.advance(1.0)
    assert h.worker_state(W1) is None
    assert h.snap()["bad_messages"] == {"workers: unknown command": 3}


def test_heartbeats_are_sent_to_every_worker_on_tick():
    h = Harness(heartbeat=1.0, liveness=3)
    h.hello(W1)
    h.hello(W2)
    h.clear()
    h.advance(0.5)  # not yet time to beat
    assert h.worker_out == []
    h.advance(0.5)
    assert sorted(h.worker_out) == [(W1, [b"RWW3 HEARTBEAT"]), (W2, [b"RWW3 HEARTBEAT"])]
    h.clear()
    h.advance(1.0)
    assert [m for m in h.to_worker(W1)] == [p.Heartbeat()]


def test_tick_returns_the_next_wake_time():
    h = Harness(heartbeat=1.0)
    assert h.core.next_wake() == T0 + 1.0
    h.hello(W1)
    h.submit(C1, "j1", timeout=0.25)
    assert h.core.next_wake() == T0 + 0.25
    assert h.advance(0.1) == T0 + 0.25


def test_worker_declared_heartbeat_extends_its_expiry():
    h = Harness(heartbeat=1.0, liveness=3)
    h.hello(W1, info={"name": "slow", "heartbeat": 5.0})  # expiry 15 s instead of 3 s
    for _ in range(15):
        h.advance(1.0)
    assert h.worker_state(W1) == "idle"
    h.advance(1.0)
    assert h.worker_state(W1) is None
    assert h.snap()["totals"]["lost_workers"] == 1


def test_job_of_a_lost_worker_is_not_handed_to_another_dead_worker():
    h = Harness(heartbeat=1.0, liveness=2, tries=2)
    h.hello(W1)  # will be silent, holding the job
    h.hello(W2)  # will be silent, idle
    h.submit(C1, "j1")
    h.to_client(C1)
    h.hello(W3)  # alive, idle (registered after W2)
    for _ in range(3):
        h.advance(1.0)
        h.beat(W3)
    assert h.worker_state(W1) is None and h.worker_state(W2) is None
    assert h.to_client(C1) == []  # not FAILED: W3 could run it
    assert ids(h.jobs_to(W3)) == [("j1", 2)]


# ================================================================================================
# RETURN and BYE give a job back without counting a try
# ================================================================================================


def test_return_gives_the_job_back_without_counting_a_try(h):
    h.hello(W1)
    h.submit(C1, "j1", tries=1)
    h.submit(C1, "j2")
    assert ids(h.jobs_to(W1)) == [("j1", 1)]
    h.give_back(W1, "j1", 1)
    assert h.worker_state(W1) == "stopping"
    assert h.jobs_to(W1) == []
    info = h.info("j1")
    assert (info["state"], info["attempt"], info["workers_tried"]) == ("queued", 0, [])
    h.hello(W2)
    assert ids(h.jobs_to(W2)) == [("j1", 1)]  # same attempt number, and tries=1 still allows it
    assert h.snap()["totals"]["retried"] == 0
    h.result(W2, "j1", 1)
    assert [r.command for r in h.to_client(C1)] == [p.ACCEPTED, p.ACCEPTED, p.RESULT]


def test_return_goes_to_an_idle_worker_at_once(h):
    h.hello(W1)
    h.submit(C1, "j1")
    h.hello(W2)
    h.give_back(W1, "j1", 1)
    assert ids(h.jobs_to(W2)) == [("j1", 1)]
    assert h.info("j1")["workers_tried"] == ["w2"]


def test_return_of_a_job_not_held_is_counted_and_ignored(h):
    h.hello(W1)
    h.submit(C1, "j1")
    h.give_back(W1, "j1", 2)
    assert h.snap()["bad_messages"] == {"workers: RETURN for a job the worker does not hold": 1}
    assert h.info("j1")["state"] == "running"
    assert h.worker_state(W1) == "busy"


def test_bye_with_a_just_dispatched_job_gives_it_back(h):
    h.hello(W1)
    h.submit(C1, "j1", tries=1)
    assert ids(h.jobs_to(W1)) == [("j1", 1)]
    h.core.on_worker(W1, p.BYE_FRAMES)
    assert h.worker_state(W1) is None
    assert h.to_worker(W1) == []
    info = h.info("j1")
    assert (info["state"], info["attempt"]) == ("queued", 0)
    h.hello(W2)
    assert ids(h.jobs_to(W2)) == [("j1", 1)]
    assert h.snap()["totals"]["retried"] == 0
    assert h.to_client(C1) == [R(p.ACCEPTED, "j1", [])]  # not failed


def test_bye_from_an_idle_worker_removes_it(h):
    h.hello(W1)
    h.core.on_worker(W1, p.BYE_FRAMES)
    assert h.snap()["workers"] == []
    h.submit(C1, "j1")
    assert h.jobs_to(W1) == []
    assert h.snap()["queued"] == 1


# ================================================================================================
# pool slots
# ================================================================================================


def test_new_process_in_a_slot_replaces_the_old_one_at_once(h):
    h.hello(W1, info={"name": "old", "slot": "host:1:0"})
    h.submit(C1, "j1")
    h.to_client(C1)
    assert ids(h.jobs_to(W1)) == [("j1", 1)]
    h.hello(W2, info={"name": "new", "slot": "host:1:0"})  # the restarted child
    msgs = h.to_worker(W2)
    assert isinstance(msgs[0], p.Welcome)
    assert msgs[1:] == [dispatch(h, "j1", 2, 60.0, [b"in"])]
    assert [w["name"] for w in h.snap()["workers"]] == ["new"]
    assert h.snap()["totals"]["retried"] == 1
    info = h.info("j1")
    assert info["workers_tried"] == ["old", "new"]
    assert "replaced" in info["error"]
    h.result(W1, "j1", 1)  # the old socket is no longer registered: it must say HELLO first
    assert h.to_worker(W1) == [p.Disconnect("unknown worker, say HELLO")]
    assert h.to_client(C1) == []
    h.hello(W1, info={"name": "old"}, job_id="j1", attempt=1)  # alive after all: its claim holds
    h.result(W1, "j1", 1)
    assert h.to_client(C1) == [R(p.RESULT, "j1", [b"out"])]
    assert h.snap()["totals"]["late"] == 1


def test_vacate_fails_the_attempt_of_the_slot_at_once(h):
    h.hello(W1, info={"name": "w1", "slot": "host:1:0:secret"})
    h.hello(W2, info={"name": "w2"})
    h.submit(C1, "j1", tries=2)
    assert ids(h.jobs_to(W1)) == [("j1", 1)]
    h.core.on_worker(W3, p.encode_vacate("host:1:0:guess"))  # a wrong slot: nothing happens
    assert h.worker_state(W1) == "busy" and h.to_worker(W3) == []
    h.core.on_worker(W3, p.encode_vacate("host:1:0:secret"))  # the pool, unregistered, says so
    assert h.to_worker(W3) == []  # no DISCONNECT for a pool
    assert h.worker_state(W1) is None
    assert ids(h.jobs_to(W2)) == [("j1", 2)]
    assert h.snap()["totals"]["lost_workers"] == 1
    assert "died" in h.info("j1")["error"]


def test_a_late_vacate_spares_the_process_that_replaced_the_dead_one(h):
    h.hello(W1, info={"name": "w1", "slot": "s", "incarnation": "first"})
    h.hello(W2, info={"name": "w2", "slot": "s", "incarnation": "second"})  # the restarted child
    h.submit(C1, "j1", tries=1)
    assert ids(h.jobs_to(W2)) == [("j1", 1)]
    h.core.on_worker(W3, p.encode_vacate("s", "first"))  # the pool's VACATE, delayed
    assert h.worker_state(W2) == "busy" and h.info("j1")["state"] == "running"
    h.core.on_worker(W3, p.encode_vacate("s", "second"))  # the second child died too
    assert h.worker_state(W2) is None and h.info("j1")["state"] == "failed"


def test_a_hello_from_a_connection_the_worker_left_does_not_evict_it(h):
    # The worker said HELLO on connection 1, heard nothing, re-registered on connection 2;
    # then HELLO 1 arrives (delayed by the network).
    h.hello(W2, info={"name": "w", "slot": "s", "incarnation": "x", "conn": 2})
    h.submit(C1, "j1", tries=1)
    assert ids(h.jobs_to(W2)) == [("j1", 1)]
    h.hello(W1, info={"name": "w", "slot": "s", "incarnation": "x", "conn": 1})
    assert h.to_worker(W1) == [p.Disconnect("stale HELLO")]
    assert h.worker_state(W2) == "busy" and h.info("j1")["state"] == "running"
    assert h.snap()["bad_messages"] == {"workers: HELLO from a connection the worker has left": 1}
    h.hello(W3, info={"name": "w", "slot": "s", "incarnation": "x", "conn": 3})  # a newer one
    assert h.worker_state(W2) is None and h.worker_state(W3) is not None


def test_slot_reconnect_with_the_same_attempt_keeps_the_job(h):
    h.hello(W1, info={"name": "w", "slot": "host:1:0"})
    h.submit(C1, "j1", timeout=10.0)
    h.to_client(C1)
    assert ids(h.jobs_to(W1)) == [("j1", 1)]
    h.advance(4.0)
    h.hello(W2, info={"name": "w", "slot": "host:1:0"}, job_id="j1", attempt=1)
    assert h.jobs_to(W2) == []  # WELCOME only
    snap = h.snap()
    assert [(w["id"], w["state"], w["job"], w["attempt"]) for w in snap["workers"]] == [
        (W2.hex(), "busy", "j1", 1)
    ]
    assert snap["totals"]["retried"] == 0
    assert snap["in_flight"] == 1
    info = h.info("j1")
    assert (info["state"], info["attempt"]) == ("running", 1)
    # the original deadline still holds
    h.advance(5.9)
    assert h.info("j1")["state"] == "running"
    h.result(W2, "j1", 1, ready=True)
    assert h.to_client(C1) == [R(p.RESULT, "j1", [b"out"])]
    assert h.snap()["totals"]["late"] == 0
    assert h.worker_state(W2) == "idle"


def test_slot_hello_claiming_another_attempt_does_not_keep_the_old_one(h):
    h.hello(W1, info={"name": "w", "slot": "s"})
    h.submit(C1, "j1")
    h.job_to(W1)
    h.hello(W2, info={"name": "w", "slot": "s"}, job_id="j1", attempt=7)
    assert h.snap()["totals"]["retried"] == 1  # the old attempt failed


def test_hello_claiming_a_queued_job_takes_it_off_the_queue(h):
    h.hello(W1)
    h.submit(C1, "j1", timeout=5.0)
    h.to_client(C1)
    h.job_to(W1)
    h.advance(5.0)  # timed out, queued for a retry, nobody free
    assert h.snap()["queued"] == 1
    h.hello(W2, job_id="j1", attempt=1)  # the same process on a new socket, no slot
    assert h.jobs_to(W2) == []
    info = h.info("j1")
    assert (info["state"], info["attempt"], info["worker"]) == ("running", 1, "w2")
    assert h.snap()["queued"] == 0
    h.advance(4.9)  # a fresh deadline
    assert h.info("j1")["state"] == "running"
    h.result(W2, "j1", 1)
    assert h.to_client(C1) == [R(p.RESULT, "j1", [b"out"])]


def test_hello_claiming_an_unknown_job_keeps_the_worker_busy_until_it_answers(h):
    h.hello(W1, job_id="ghost", attempt=3)
    assert h.worker_state(W1) == "busy"
    h.submit(C1, "j1")
    assert h.jobs_to(W1) == []
    h.result(W1, "ghost", 3, ready=True)
    assert ids(h.jobs_to(W1)) == [("j1", 1)]
    assert h.to_client(C1) == [R(p.ACCEPTED, "j1", [])]


def test_second_hello_on_the_same_socket_fails_the_attempt_in_hand(h):
    h.hello(W1)
    h.submit(C1, "j1")
    h.job_to(W1)
    h.hello(W1)  # as documented: the old record is dropped as if the worker had died
    assert h.snap()["totals"]["retried"] == 1
    assert ids(h.jobs_to(W1)) == [("j1", 2)]
    assert len(h.snap()["workers"]) == 1


def test_worker_declared_heartbeat_is_bounded():
    h = Harness(heartbeat=1.0, liveness=3)
    h.hello(W1, info={"name": "huge", "heartbeat": 1e300})  # capped at 60 s: expiry 180 s
    h.hello(W2, info={"name": "bool", "heartbeat": True})  # not a number: broker's 1 s
    h.advance(3.5)
    h.advance(0.5)
    assert h.worker_state(W2) is None
    h.advance(176.0)
    assert h.worker_state(W1) == "idle"
    h.advance(1.0)
    assert h.worker_state(W1) is None


def test_second_hello_on_the_same_socket_with_its_job_keeps_it_as_the_holder(h):
    h.hello(W1)
    h.submit(C1, "j1")
    h.to_client(C1)
    h.job_to(W1)
    h.hello(W1, job_id="j1", attempt=1)
    assert h.snap()["totals"]["retried"] == 0
    assert h.core.jobs["j1"].worker is h.core.workers.get(W1)
    h.hello(W2)
    h.error(W1, "j1", 1, "tb")  # an error from the holder is retried at once
    assert ids(h.jobs_to(W2)) == [("j1", 2)]


def test_worker_without_a_slot_is_not_replaced(h):
    h.hello(W1, info={"name": "a"})
    h.hello(W2, info={"name": "a"})
    assert {w["id"] for w in h.snap()["workers"]} == {W1.hex(), W2.hex()}


# ================================================================================================
# duplicate submissions
# ================================================================================================


def test_duplicate_submit_attaches_to_the_running_job(h):
    h.hello(W1)
    h.hello(W2)
    h.submit(C1, "j1", payload=[b"first"])
    h.submit(C2, "j1", payload=[b"second"])
    assert ids(h.jobs_to(W1)) == [("j1", 1)]
    assert h.jobs_to(W2) == []  # not run twice
    assert h.to_client(C2) == [R(p.ACCEPTED, "j1", [])]
    assert h.snap()["totals"]["submitted"] == 1
    assert h.snap()["totals"]["resubmitted"] == 1
    h.result(W1, "j1", 1, payload=[b"r"])
    assert h.to_client(C1)[-1] == R(p.RESULT, "j1", [b"r"])
    assert h.to_client(C2) == [R(p.RESULT, "j1", [b"r"])]


def test_submit_of_a_finished_id_gets_the_result_at_once(h):
    h.hello(W1)
    h.submit(C1, "j1")
    h.result(W1, "j1", 1, payload=[b"r1"])
    h.clear()
    h.submit(C2, "j1", payload=[b"again"], flush=False)
    assert h.to_client(C2) == [R(p.RESULT, "j1", [b"r1"])]  # the outcome may precede ACCEPTED
    h.core.flush()
    assert h.to_client(C2) == [R(p.ACCEPTED, "j1", [])]
    assert h.jobs_to(W1) == []
    assert h.snap()["totals"]["submitted"] == 1
    assert h.snap()["totals"]["resubmitted"] == 1


def test_submit_of_a_failed_id_gets_the_failure_at_once(h):
    h.hello(W1)
    h.submit(C1, "j1", tries=1)
    h.error(W1, "j1", 1, "tb")
    h.submit(C2, "j1")
    replies = h.to_client(C2)
    assert sorted(outcome(replies)) == [(p.ACCEPTED, "j1", []), (p.FAILED, "j1", [b"error", b"tb"])]
    assert h.jobs_to(W1) == [dispatch(h, "j1", 1, 60.0, [b"in"], tries=1)]


def test_duplicate_submit_is_confirmed_with_the_batch_not_before(h):
    h.submit(C1, "j1", flush=False)
    h.submit(C2, "j1", flush=False)
    assert h.client_out == []  # neither is confirmed before the journal commit
    h.core.flush()
    assert h.to_client(C1) == [R(p.ACCEPTED, "j1", [])]
    assert h.to_client(C2) == [R(p.ACCEPTED, "j1", [])]


def test_same_client_submitting_twice_gets_the_outcome_once(h):
    h.hello(W1)
    h.submit(C1, "j1")
    h.submit(C1, "j1")
    h.result(W1, "j1", 1)
    assert [r.command for r in h.to_client(C1)] == [p.ACCEPTED, p.ACCEPTED, p.RESULT]


# ================================================================================================
# WAIT, QUERY, CANCEL, PING
# ================================================================================================


def test_wait_on_a_running_job_gets_the_result_once(h):
    h.hello(W1)
    h.submit(C1, "j1")
    h.ref(C2, p.WAIT, "j1")
    h.ref(C2, p.WAIT, "j1")  # asking twice does not mean two answers
    assert h.to_client(C2) == []
    h.result(W1, "j1", 1)
    assert h.to_client(C2) == [R(p.RESULT, "j1", [b"out"])]


def test_wait_on_a_finished_job_answers_at_once(h):
    h.hello(W1)
    h.submit(C1, "j1")
    h.result(W1, "j1", 1)
    h.ref(C2, p.WAIT, "j1")
    assert h.to_client(C2) == [R(p.RESULT, "j1", [b"out"])]


def test_query_reports_state_attempt_and_workers_tried(h):
    h.hello(W1)
    h.hello(W2)
    h.submit(C1, "j1", queue="default", timeout=3.0, tries=4, payload=[b"abc", b"de"])
    h.advance(3.0)
    info = h.info("j1")
    assert info["id"] == "j1"
    assert info["queue"] == "default"
    assert info["state"] == "running"
    assert info["attempt"] == 2
    assert info["tries"] == 4
    assert info["timeout"] == 3.0
    assert info["worker"] == "w2"
    assert info["workers_tried"] == ["w1", "w2"]
    assert info["payload_size"] == 5
    assert info["waiting_clients"] == 1
    assert info["age"] == 3.0
    h.result(W2, "j1", 2, payload=[b"1234"])
    info = h.info("j1")
    assert (info["state"], info["worker"]) == ("done", None)
    assert (info["result_size"], info["payload_size"]) == (4, None)


def test_unknown_ids_get_unknown(h):
    for cmd in (p.WAIT, p.QUERY, p.CANCEL):
        h.ref(C1, cmd, "nope")
    assert h.to_client(C1) == [R(p.UNKNOWN, "nope", [])] * 3


def test_ping_gets_pong_with_the_broker_id(h):
    h.core.on_client(C1, p.encode_ping())
    [pong] = h.raw_to_client(C1)
    assert len(pong) == 2 and pong[0] == b"RWC3 PONG " + h.core.broker_id.encode()
    assert p.decode_reply(pong).limits["max_tries"] == h.core.cfg.max_tries
    assert h.core.broker_id


def test_cancel_a_queued_job(h):
    h.submit(C1, "j1")
    h.ref(C2, p.WAIT, "j1")
    h.to_client(C1)
    h.ref(C3, p.CANCEL, "j1")
    assert h.to_client(C1) == [R(p.CANCELLED, "j1", [])]
    assert h.to_client(C2) == [R(p.CANCELLED, "j1", [])]
    (reply,) = h.to_client(C3)
    assert reply.command == p.INFO and reply.info["state"] == "cancelled"
    assert h.snap()["queued"] == 0
    assert h.snap()["totals"]["cancelled"] == 1
    h.hello(W1)
    assert h.jobs_to(W1) == []  # never dispatched
    assert h.worker_state(W1) == "idle"
    h.ref(C3, p.CANCEL, "j1")  # cancelling again changes nothing
    assert h.to_client(C1) == []
    assert h.snap()["totals"]["cancelled"] == 1


def test_cancelling_the_only_queued_job_forgets_the_empty_queue(h):
    h.submit(C1, "j1", queue="rare")
    assert h.snap()["queues"]["rare"]["queued"] == 1
    h.ref(C1, p.CANCEL, "j1")
    assert "rare" not in h.snap()["queues"]
    assert h.core.queues.get("rare") is None


def test_cancel_a_running_job_drops_the_late_result_and_frees_the_worker(h):
    h.hello(W1)
    h.submit(C1, "j1")
    h.submit(C1, "j2")
    h.to_client(C1)
    assert ids(h.jobs_to(W1)) == [("j1", 1)]
    h.ref(C2, p.CANCEL, "j1")
    assert h.to_client(C1) == [R(p.CANCELLED, "j1", [])]
    (reply,) = h.to_client(C2)
    assert reply.info["state"] == "cancelled"
    assert h.snap()["in_flight"] == 0
    h.result(W1, "j1", 1, ready=True)
    assert h.to_client(C1) == []
    assert h.snap()["totals"]["duplicates"] == 1
    assert h.info("j1")["state"] == "cancelled"
    assert ids(h.jobs_to(W1)) == [("j2", 1)]  # ready again
    h.advance(100.0)  # the cancelled attempt never times out into a retry
    assert h.jobs_to(W1) == []


def test_refused_while_not_accepting(h):
    h.core.accepting = False
    h.submit(C1, "j1")
    assert h.to_client(C1) == [R(p.REFUSED, "j1", [b"shutdown", b"the broker is stopping"])]
    h.core.on_client(C2, [b"", b"plain"])
    assert h.raw_to_client(C2) == [[b"", b""]]
    assert h.snap()["totals"]["submitted"] == 0


# ================================================================================================
# bad input
# ================================================================================================


@pytest.mark.parametrize(
    "frames, key",
    [
        ([b"RWC3 FROB"], "clients: unknown command"),
        ([b"RWC3"], "clients: no command"),
        ([b"RWC1 PING"], "clients: unsupported version"),
        ([b"hello"], "clients: bad header"),
        ([b"x", b"RWC3 PING"], "clients: bad header"),  # the command line must come first
        ([b"RWC3 SUBMIT a\x00b default -", b"x"], "clients: bad job id"),
        ([b"RWC3 SUBMIT j  -", b"x"], "clients: bad queue"),
        ([b"RWC3 SUBMIT j default timeout=-1", b"x"], "clients: bad timeout"),
        ([b"RWC3 SUBMIT j default tries=x", b"x"], "clients: bad tries"),
        ([b"RWC3 SUBMIT j default colour=red", b"x"], "clients: bad options"),
        ([b"RWC3 SUBMIT j default -"], "clients: bad SUBMIT"),  # no payload
        ([b"RWC3 SUBMIT j  default 0 0", b"x"], "clients: bad SUBMIT"),  # double space: 7 words
        ([b"RWC3 WAIT"], "clients: bad WAIT"),
        ([b"RWC3 CANCEL j", b"x"], "clients: bad CANCEL"),
    ],
)
def test_malformed_client_message_gets_invalid(h, frames, key):
    h.core.on_client(C1, frames)
    [raw] = h.raw_to_client(C1)
    assert raw[0] == b"RWC3 INVALID" and len(raw) == 2  # no job id, the reason in its own frame
    reply = view(p.decode_reply(raw))
    assert reply.command == p.INVALID
    assert reply.frames[0].decode().startswith(key.split(": ", 1)[1] + ": ")
    assert h.snap()["bad_messages"] == {key: 1}
    assert h.snap()["totals"]["submitted"] == 0


def test_bad_req_envelope_gets_the_plain_failure_and_an_empty_message_nothing(h):
    h.core.on_client(C1, [b""])  # a REQ envelope with nothing after it
    assert h.raw_to_client(C1) == [[b"", b""]]  # the plain failure reply, not INVALID
    h.core.on_client(C1, [])
    assert h.client_out == []  # nothing to answer to
    assert h.snap()["bad_messages"] == {"clients: empty request": 1, "clients: empty message": 1}
    assert h.snap()["totals"]["submitted"] == 0
    assert h.snap()["queued"] == 0
    # behind a REQ envelope even a command line is a payload: a plain job, not a PING
    h.hello(W1)
    h.core.on_client(C2, [b"", b"RWC3 PING"])
    assert h.raw_to_client(C2) == []
    assert h.job_to(W1).payload == [b"RWC3 PING"]


@pytest.mark.parametrize(
    "frames, key",
    [
        ([b"RWW1 HEARTBEAT"], "workers: unsupported version"),
        ([b"RWC3 HEARTBEAT"], "workers: bad header"),
        ([b"", b"RWW3 HEARTBEAT"], "workers: bad header"),
        ([], "workers: empty message"),
        ([b"RWW3"], "workers: no command"),
        ([b"RWW3 NOPE"], "workers: unknown command"),
        ([b"RWW3 RESULT j1 1 t 1"], "workers: bad RESULT"),  # no result frame
        ([b"RWW3 RESULT j1 1 1", b"r"], "workers: bad RESULT"),  # no token
        ([b"RWW3 RESULT j1  1 t 1", b"r"], "workers: bad RESULT"),  # double space: 7 words
        ([b"RWW3 RESULT j1 1 t x", b"r"], "workers: bad ready"),
        ([b"RWW3 RESULT j1 0 t 1", b"r"], "workers: bad attempt"),
        ([b"RWW3 ERROR j1 1 t 1"], "workers: bad ERROR"),  # no error text frame
        ([b"RWW3 RETURN j1 1"], "workers: bad RETURN"),
        ([b"RWW3 HELLO default", b"[]"], "workers: bad info"),
        ([b"RWW3 HELLO default"], "workers: bad HELLO"),
        ([b"RWW3 HELLO default j1", b"{}"], "workers: bad HELLO"),
    ],
)
def test_malformed_worker_message_is_counted_and_dropped(h, frames, key):
    h.hello(W1)
    h.submit(C1, "j1")
    h.clear()
    h.core.on_worker(W1, frames)
    h.core.on_worker(W2, frames)  # unregistered: still no answer to garbage
    if key == "workers: unsupported version":  # told why, in its words, at most once a second
        assert h.worker_out == [(W1, [b"RWW1 DISCONNECT", b"unsupported version: b'RWW1'; this side "
                                      b"speaks RWW3; upgrade respworkers on this worker to the "
                                      b"broker's version " + __version__.encode()])]
        h.worker_out.clear()
    if frames and frames[0].startswith(b"RWW3 HELLO"):  # told why, so it does not wait forever
        assert [(rid, p.decode_broker(f).__class__) for rid, f in h.worker_out] == [
            (W1, p.Disconnect)]  # and W2 not: at most once a second
        h.worker_out.clear()
    assert h.worker_out == []
    assert h.client_out == []
    assert h.snap()["bad_messages"] == {key: 2}
    assert h.worker_state(W1) == "busy"


def test_result_for_a_job_not_held_is_counted_and_ignored(h):
    h.hello(W1)
    h.hello(W2)
    h.submit(C1, "j1")
    h.submit(C1, "j2")
    h.to_client(C1)
    h.result(W1, "j2", 1)  # j2 is W2's
    h.result(W1, "j1", 2)  # wrong attempt
    h.result(W2, "nope", 1)  # unknown job
    assert h.to_client(C1) == []
    assert h.snap()["bad_messages"] == {"workers: RESULT for a job the worker does not hold": 3}
    assert h.worker_state(W1) == "busy" and h.worker_state(W2) == "busy"
    assert h.info("j2")["state"] == "running"
    h.error(W2, "j1", 1, "x")
    assert h.snap()["bad_messages"]["workers: ERROR for a job the worker does not hold"] == 1
    assert h.info("j1")["state"] == "running"


def test_unregistered_worker_is_told_to_say_hello(h):
    h.core.on_worker(W1, p.HEARTBEAT_FRAMES)
    h.core.on_worker(W1, p.encode_return("j", 1, b"t"))
    h.core.on_worker(W1, p.encode_worker_error("j", 1, b"t", True, "e"))
    assert h.to_worker(W1) == [p.Disconnect("unknown worker, say HELLO")] * 3
    h.core.on_worker(W1, p.BYE_FRAMES)
    assert h.to_worker(W1) == []
    assert h.snap()["workers"] == []
    assert h.snap()["bad_messages"] == {"workers: RETURN from an unregistered worker": 1,
                                        "workers: ERROR from an unregistered worker": 1}


def test_a_result_from_an_unregistered_peer_changes_nothing(h):
    """Only a worker that was sent an attempt can end it: a fresh DEALER that sends RESULT
    (even with the right token, say after a broker restart) is told to register first."""
    h.hello(W1)
    h.submit(C1, "j1")
    h.submit(C1, "j2")  # queued: no ready worker
    h.to_client(C1)
    h.result(W2, "j1", 1, payload=[b"FORGED"], token=b"guess")
    h.result(W3, "j1", 1, payload=[b"FORGED"])  # the real token, from an unregistered peer
    h.result(W3, "j2", 1, payload=[b"FORGED"])
    assert h.to_worker(W2) == [p.Disconnect("unknown worker, say HELLO")]
    assert h.to_client(C1) == []
    assert h.info("j1")["state"] == "running" and h.info("j2")["state"] == "queued"
    assert h.snap()["bad_messages"] == {"workers: RESULT from an unregistered worker": 3}
    h.result(W1, "j1", 1)
    assert h.to_client(C1) == [R(p.RESULT, "j1", [b"out"])]


def test_a_result_with_a_wrong_token_changes_nothing(h):
    h.hello(W1)
    h.hello(W2)
    h.submit(C1, "j1")
    h.submit(C1, "j2")
    h.to_client(C1)
    h.result(W2, "j2", 1, token=b"0" * 32)  # it holds j2, but not with this token
    h.error(W2, "j2", 1, "forged", token=b"0" * 32)
    h.give_back(W2, "j2", 1, token=b"0" * 32)
    assert h.to_client(C1) == []
    assert h.info("j2")["state"] == "running" and h.worker_state(W2) == "busy"
    assert h.snap()["bad_messages"] == {
        "workers: RESULT for a job the worker does not hold": 1,
        "workers: ERROR for a job the worker does not hold": 1,
        "workers: RETURN for a job the worker does not hold": 1,
    }


def test_a_hello_claiming_an_attempt_with_a_wrong_token_is_refused(h):
    """A HELLO claim makes the claimant a holder only with the token the broker sent."""
    h.hello(W1)
    h.submit(C1, "j1")
    h.to_client(C1)
    h.hello(W2, job_id="j1", attempt=1, token=b"f" * 32)  # forged claim, then its answer
    h.result(W2, "j1", 1, payload=[b"FORGED"], token=b"f" * 32)
    assert h.to_client(C1) == []
    assert h.info("j1")["state"] == "running" and h.info("j1")["worker"] == "w1"
    assert h.snap()["bad_messages"] == {
        "workers: HELLO claiming an attempt with a wrong token": 1,
        "workers: RESULT for an attempt with a wrong token": 1}
    assert h.snap()["totals"]["duplicates"] == 0
    for forge in ("ERROR", "RETURN", "PROGRESS"):  # each follow-up of a forged claim is counted
        h.hello(W3, job_id="j1", attempt=1, token=b"e" * 32)
        if forge == "ERROR":
            h.error(W3, "j1", 1, "forged", token=b"e" * 32)
        elif forge == "RETURN":
            h.give_back(W3, "j1", 1, token=b"e" * 32)
        else:
            h.core.on_worker(W3, p.encode_worker_progress("j1", 1, b"e" * 32, b'{"fraction":1}'))
        assert h.snap()["bad_messages"][f"workers: {forge} of an attempt with a wrong token"
                                        if forge == "RETURN" else
                                        f"workers: {forge} for an attempt with a wrong token"] == 1
    assert h.info("j1")["state"] == "running" and h.info("j1")["worker"] == "w1"
    h.result(W1, "j1", 1)
    assert h.to_client(C1) == [R(p.RESULT, "j1", [b"out"])]


def test_a_lost_worker_that_comes_back_with_its_token_may_still_answer(h):
    h.hello(W1)
    h.submit(C1, "j1", tries=3)
    h.to_client(C1)
    token = h.token("j1", 1)
    h.core.on_worker(W1, p.BYE_FRAMES)  # gone without answering (gave the job back)
    h.hello(W2)
    assert ids(h.jobs_to(W2)) == [("j1", 1)]
    h.hello(W3, job_id="j1", attempt=1, token=token)  # the old token: given back, so refused
    assert h.snap()["bad_messages"] == {"workers: HELLO claiming an attempt with a wrong token": 1}


# ================================================================================================
# retention
# ================================================================================================


def test_finished_jobs_are_forgotten_after_retention():
    h = Harness(heartbeat=1.0, retention=100.0)
    h.hello(W1)
    h.submit(C1, "j1")
    h.result(W1, "j1", 1)
    for _ in range(99):
        h.advance(1.0)
        h.beat(W1)
    assert h.info("j1")["state"] == "done"
    assert h.snap()["retained"] == 1
    h.advance(1.5)
    h.ref(C2, p.QUERY, "j1")
    assert h.to_client(C2) == [R(p.UNKNOWN, "j1", [])]
    assert h.snap()["retained"] == 0
    h.beat(W1)
    h.clear()
    h.submit(C2, "j1")  # a new job now: it runs again
    assert ids(h.jobs_to(W1)) == [("j1", 1)]


def test_retention_uses_the_wall_clock():
    h = Harness(heartbeat=1.0, retention=100.0)
    h.hello(W1)
    h.submit(C1, "j1")
    h.result(W1, "j1", 1)
    h.wall += 500.0  # wall clock jumps, monotonic barely moves
    h.advance(1.0)
    assert h.snap()["retained"] == 0
    h.ref(C2, p.WAIT, "j1")
    assert h.to_client(C2) == [R(p.UNKNOWN, "j1", [])]


def test_finished_jobs_beyond_max_retained_are_forgotten_oldest_first():
    h = Harness(max_retained=2)
    h.hello(W1)
    for i in range(4):
        h.submit(C1, f"j{i}")
        h.result(W1, f"j{i}", 1)
    h.submit(C1, "running")
    assert h.snap()["retained"] == 4  # only on the heartbeat tick
    h.advance(1000.0)
    assert h.snap()["retained"] == 2
    h.clear()
    for job_id, cmd in (("j0", p.UNKNOWN), ("j1", p.UNKNOWN), ("j2", p.INFO), ("j3", p.INFO),
                        ("running", p.INFO)):
        h.ref(C2, p.QUERY, job_id)
        (reply,) = h.to_client(C2)
        assert reply.command == cmd, job_id


def test_unfinished_jobs_are_never_expired():
    h = Harness(heartbeat=1.0, retention=1.0, max_retained=0)
    h.submit(C1, "queued-forever", queue="none")
    for _ in range(5):
        h.advance(1.0)
    assert h.info("queued-forever")["state"] == "queued"


# ================================================================================================
# snapshot
# ================================================================================================


def test_snapshot_describes_workers_and_queues(h):
    h.hello(W1, queues=("a", "b"), info={"name": "w1", "host": "h", "pid": 42})
    h.hello(W2, queues=("b",))
    h.submit(C1, "j1", queue="a")
    h.advance(2.0)
    snap = h.snap()
    w1 = next(w for w in snap["workers"] if w["name"] == "w1")
    assert (w1["host"], w1["pid"], w1["queues"], w1["state"], w1["job"], w1["attempt"], w1["busy_for"]) == (
        "h", 42, ["a", "b"], "busy", "j1", 1, 2.0
    )
    assert counts(snap["queues"]["a"]) == {"queued": 0, "running": 1, "workers": 1, "idle": 0}
    assert counts(snap["queues"]["b"]) == {"queued": 0, "running": 0, "workers": 2, "idle": 1}
    assert snap["broker"]["defaults"] == {"timeout": 60.0, "tries": 3}
    assert snap["in_flight"] == 1


# ================================================================================================
# a randomised run: invariants that must hold whatever the interleaving
# ================================================================================================

_submit_op = st.tuples(st.just("submit"), st.integers(0, 1), st.integers(0, 7),
                       st.sampled_from(["default", "default", "x"]), st.one_of(st.none(), st.integers(1, 3)),
                       st.sampled_from(["single", "batch", "wait"]))
_answer_op = st.tuples(st.just("answer"), st.integers(0, 2),
                       st.sampled_from(["result", "result", "error", "return"]),
                       st.sampled_from([True, True, True, False]))
_op = st.one_of(
    _submit_op, _submit_op, _answer_op, _answer_op,
    st.tuples(st.just("hello"), st.integers(0, 2), st.booleans()),
    st.tuples(st.just("bye"), st.integers(0, 2)),
    st.tuples(st.just("cancel"), st.integers(0, 7)),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 1.0, 2.0, 3.0]),
              st.sampled_from([None, None, 0, 1, 2])),
)
_CLIENTS = [C1, C2]


class Sim:
    """Simulated workers that remember the attempt they hold and check what the broker sends them."""

    def __init__(self) -> None:
        self.h = Harness(timeout=2.0, tries=2, heartbeat=1.0, liveness=2)
        self.wids = [W1, W2, W3]  # the current socket of each pool slot
        self.holding: dict[bytes, tuple[str, int] | None] = {}
        self.finals: dict[tuple[bytes, str], int] = {}
        self.submitted: set[tuple[bytes, str]] = set()
        for slot in range(3):
            self.apply(("hello", slot, False))
        self.pump()

    def pump(self) -> None:
        h = self.h
        h.core.send_results()  # the end of a loop turn
        for wid, frames in h.worker_out:
            msg = p.decode_broker(frames)
            if isinstance(msg, p.Dispatch):
                assert self.holding.get(wid) is None, f"{wid!r} got {msg} while holding {self.holding[wid]}"
                self.holding[wid] = (msg.job_id, msg.attempt)
        h.worker_out.clear()
        for client, frames in h.client_out:
            reply = view(p.decode_reply(frames))
            told = [j for j, _ in reply.batch] if reply.batch else [reply.job_id]
            if reply.command in (p.RESULT, p.RESULTS, p.FAILED, p.CANCELLED):
                for job_id in told:
                    key = (client, job_id)
                    self.finals[key] = self.finals.get(key, 0) + 1
        h.client_out.clear()

    def check(self) -> None:
        core = self.h.core
        running = [j for j in core.jobs.values() if j.state == "running"]
        for job in running:
            assert job.worker is not None and core.workers.get(job.worker.wid) is job.worker
            assert job.worker.job_id == job.id
        assert len(core.deadlines) == len(running)
        for w in core.workers.records.values():
            if w.ready:
                assert w.job_id is None
                assert all(w.wid in core.queues.by_name[q].ready for q in w.queues)
        for name, q in core.queues.by_name.items():
            if not (q.ready and q.depth):
                continue
            # Jobs wait beside idle workers only when each is a retry that those workers
            # already tried, waiting (briefly) for a busy one that has not.
            idle = {w.name for w in q.ready.values()}
            for job in core.jobs.values():
                if job.queue == name and job.state == "queued":
                    assert job.retry_since and idle <= set(job.tried), (
                        f"queue {name} has job {job.id} waiting and idle workers {idle}")
            assert all(w.ready and core.workers.get(w.wid) is w for w in q.ready.values())
            assert q.depth or q.ready or q.serving, f"queue {name} is kept for nothing"
            assert q.serving == sum(name in w.queues for w in core.workers.records.values())
        queued = sum(q.depth for q in core.queues.by_name.values())
        assert queued == sum(1 for j in core.jobs.values() if j.state == "queued")
        deadlines = [j.deadline for j in running]
        if deadlines:  # the next wake-up is never later than a running attempt's time limit
            assert core.next_wake() <= min(deadlines), (core.next_wake(), min(deadlines))
        for key, n in self.finals.items():
            assert n == 1, f"{key} told {n} times"

    def apply(self, op: tuple) -> None:
        h = self.h
        kind = op[0]
        if kind == "submit":
            client, job_id = _CLIENTS[op[1]], f"j{op[2]}"
            how = op[5]
            if (client, job_id) in self.submitted:
                # Again, as a client's resync does: never a second outcome while it waits.
                job = h.core.jobs.get(job_id)
                if job is None or job.state in ("done", "failed", "cancelled"):
                    return
            elif how == "wait":
                how = "single"
            self.submitted.add((client, job_id))
            if how == "wait":
                h.ref(client, p.WAIT, job_id)
            elif how == "batch":
                h.core.on_client(client, p.encode_submits(
                    [p.encode_submit(job_id, op[3], p.Options(None, op[4]), [b"in"])]))
            else:
                h.submit(client, job_id, queue=op[3], tries=op[4])
        elif kind == "hello":
            slot, reconnect = op[1], op[2]
            wid = self.wids[slot]
            held = self.holding.get(wid)
            info = {"name": f"slot{slot}", "slot": str(slot)}
            if reconnect and held:  # same process, fresh socket, job in hand
                new = wid + b"'"
                self.wids[slot] = new
                self.holding.pop(wid)
                self.holding[new] = held
                h.hello(new, info=info, job_id=held[0], attempt=held[1])
            elif wid not in h.core.workers.records:
                self.holding[wid] = None  # a new process in the slot
                h.hello(wid, info=info)
        elif kind == "answer":
            wid = self.wids[op[1]]
            held = self.holding.get(wid)
            if held is None:
                return
            self.holding[wid] = None
            if op[2] == "result":
                h.result(wid, held[0], held[1], ready=op[3])
            elif op[2] == "error":
                h.error(wid, held[0], held[1], "tb", ready=op[3])
            else:
                h.give_back(wid, *held)
        elif kind == "bye":
            wid = self.wids[op[1]]
            if wid in h.core.workers.records:
                h.core.on_worker(wid, p.BYE_FRAMES)
                self.holding.pop(wid, None)
        elif kind == "cancel":
            h.ref(C3, p.CANCEL, f"j{op[1]}")
        else:
            _, dt, silent = op
            h.mono += dt
            h.wall += dt
            h.core.set_time(h.mono, h.wall)
            for i, wid in enumerate(self.wids):  # all but the silent one keep beating
                if i != silent and wid in h.core.workers.records:
                    h.beat(wid)
            h.core.tick()


def run_sim(ops: list[tuple]) -> Sim:
    """Apply the operations, checking invariants after each; then drain: every job must end."""
    sim = Sim()
    h = sim.h
    for op in ops:
        sim.apply(op)
        sim.pump()
        sim.check()
    # drain: a fresh worker for every queue; everyone answers what they hold; every job must end
    h.hello(W4, queues=("default", "x"))
    sim.holding[W4] = None
    for _ in range(100):
        sim.pump()
        held = [(wid, job) for wid, job in sim.holding.items() if job is not None]
        for wid, job in held:
            sim.holding[wid] = None
            h.result(wid, job[0], job[1], ready=True)
        if not held:
            h.mono += 3.0
            h.wall += 3.0
            h.core.set_time(h.mono, h.wall)
            for wid in list(h.core.workers.records):
                h.beat(wid)
            h.core.tick()
        sim.pump()
        sim.check()
        if all(j.state in ("done", "failed", "cancelled") for j in h.core.jobs.values()):
            break
    assert all(j.state in ("done", "failed", "cancelled") for j in h.core.jobs.values())
    for key in sim.submitted:
        assert sim.finals.get(key) == 1, key
    return sim


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(st.lists(_op, max_size=60))
def test_random_traffic_keeps_the_broker_consistent(ops):
    run_sim(ops)


def _random_op(rng) -> tuple:
    kind = rng.choice(["submit", "submit", "answer", "answer", "answer", "hello", "bye", "cancel",
                       "advance", "advance"])
    if kind == "submit":
        return (kind, rng.randrange(2), rng.randrange(8), rng.choice(["default", "default", "x"]),
                rng.choice([None, 1, 2, 3]), rng.choice(["single", "batch", "wait"]))
    if kind == "answer":
        return (kind, rng.randrange(3), rng.choice(["result", "result", "error", "return"]),
                rng.random() < 0.8)
    if kind == "hello":
        return (kind, rng.randrange(3), rng.random() < 0.5)
    if kind == "bye":
        return (kind, rng.randrange(3))
    if kind == "cancel":
        return (kind, rng.randrange(8))
    return (kind, rng.choice([0.5, 1.0, 2.0, 3.0]), rng.choice([None, None, 0, 1, 2]))


@pytest.mark.parametrize("seed", range(40))
def test_long_random_runs_keep_the_broker_consistent(seed):
    rng = random.Random(seed)
    sim = run_sim([_random_op(rng) for _ in range(300)])
    c = sim.h.core.counters
    assert sim.submitted
    assert c.done + c.failed + c.cancelled == c.submitted == len({job_id for _, job_id in sim.submitted})


# ================================================================================================
# regressions from the code review
# ================================================================================================


def test_worker_name_with_a_lone_surrogate_does_not_kill_the_broker(tmp_path):
    from respworkers.broker.journal import SqliteJournal

    hello = [b"RWW3 HELLO default", b'{"name": "bad\\ud800name"}']
    h = Harness(tries=1)
    h.core.on_worker(W1, hello)
    h.submit(C1, "j1", timeout=1.0)
    h.advance(2.0)  # the FAILED text names the worker
    failed = [r for r in h.to_client(C1) if r.command == p.FAILED]
    assert failed and "bad?name" in failed[0].frames[1].decode()
    core = BrokerCore(BrokerConfig(heartbeat=1000.0), lambda r, f: None, lambda r, f: None,
                      SqliteJournal(tmp_path / "j.db"))
    core.set_time(T0, WALL0)
    core.tick()
    core.on_worker(W1, hello)
    core.on_client(C1, p.encode_submit("j1", p.DEFAULT_QUEUE, None, [b"x"]))
    core.flush()  # the journal stores the worker's name in workers_tried


def test_a_silent_idle_worker_is_never_handed_a_job():
    h = Harness(heartbeat=1.0, liveness=3, timeout=3.8, tries=2)
    h.hello(W1)
    h.hello(W2)
    h.hello(W3)  # W2 dies silently; W1 and W3 keep beating
    h.submit(C1, "j1")
    assert ids(h.jobs_to(W1)) == [("j1", 1)]
    h.to_client(C1)
    for _ in range(3):
        h.advance(1.0)
        h.beat(W1, W3)
    h.advance(0.8)  # j1's deadline, and W2 has been silent past its expiry
    h.beat(W1, W3)
    assert h.jobs_to(W2) == []
    assert ids(h.jobs_to(W3)) == [("j1", 2)]
    assert h.worker_state(W2) is None


def test_cancelled_jobs_leave_the_queue_in_order_without_scanning_it():
    h = Harness()
    for i in range(5):
        h.submit(C1, f"j{i}")
    h.ref(C2, p.CANCEL, "j1")
    h.ref(C2, p.CANCEL, "j3")
    assert h.snap()["queues"]["default"]["queued"] == 3
    h.hello(W1)
    got = [h.job_to(W1).job_id]
    for _ in range(2):
        h.result(W1, got[-1], 1)
        got.append(h.job_to(W1).job_id)
    assert got == ["j0", "j2", "j4"]
    assert h.snap()["queued"] == 0


def test_a_job_taken_out_and_queued_again_runs_once():
    h = Harness()
    h.hello(W1)
    h.submit(C1, "j1", timeout=1.0)
    assert ids(h.jobs_to(W1)) == [("j1", 1)]
    h.advance(2.0)  # timed out: queued again, W1 still busy with it
    h.submit(C1, "j2")
    h.hello(W4, job_id="j1", attempt=1)  # W1 on a new socket claims j1 out of the queue
    h.hello(W2)
    assert ids(h.jobs_to(W2)) == [("j2", 1)]
    h.core.on_worker(W4, list(p.BYE_FRAMES))  # gives j1 back: queued again at the front
    h.hello(W3)
    assert ids(h.jobs_to(W3)) == [("j1", 1)]
    h.result(W2, "j2", 1)
    assert h.jobs_to(W2) == []  # the stale entry of j1 is not dispatched a second time


def test_hello_with_too_many_queues_is_refused():
    h = Harness()
    queues = ",".join(f"q{i}" for i in range(p.MAX_WORKER_QUEUES + 1)).encode()
    h.core.on_worker(W1, [b"RWW3 HELLO " + queues, b"{}"])
    assert h.worker_state(W1) is None
    assert h.snap()["bad_messages"] == {"workers: bad HELLO": 1}


def test_a_retry_dispatched_at_a_tick_is_timed_out_on_time():
    """A retry dispatched by tick() into a time-limit group the tick had already passed (or a
    new one) must still set the next wake-up: its limit is not a heartbeat late."""
    h = Harness(heartbeat=10.0, timeout=1.0, tries=3)
    h.hello(W1)
    h.hello(W2)
    h.submit(C1, "j1")
    assert ids(h.jobs_to(W1)) == [("j1", 1)]
    wake = h.advance(1.01)  # times out: the retry goes to W2 at once, due 1 s later
    assert ids(h.jobs_to(W2)) == [("j1", 2)]
    assert wake <= h.mono + 1.0 + 1e-9


def test_next_wake_follows_new_deadlines_in_constant_time():
    h = Harness(heartbeat=1000.0)
    h.hello(W1)
    h.hello(W2)
    h.submit(C1, "long", timeout=50.0)
    assert h.core.next_wake() == pytest.approx(T0 + 50.0)
    h.submit(C1, "short", timeout=2.0)
    assert h.core.next_wake() == pytest.approx(T0 + 2.0)


def test_after_a_restart_interrupted_jobs_run_first_in_their_order(tmp_path):
    from respworkers.broker.journal import SqliteJournal

    def core_on(journal):
        sent: list = []
        core = BrokerCore(BrokerConfig(heartbeat=1.0, liveness=3), lambda r, f: None,
                          lambda r, f: sent.append(list(f)), journal)
        core.set_time(T0, WALL0)
        return core, sent

    path = tmp_path / "j.db"
    core, _ = core_on(SqliteJournal(path))
    for i in range(5):
        core.on_client(C1, p.encode_submit(f"j{i}", p.DEFAULT_QUEUE, None, [b"x"]))
    core.on_worker(W1, p.encode_hello(["default"], {"name": "w1"}, None, 0))  # runs j0
    core.flush()
    core.journal.db.close()  # the broker dies (kill -9): no clean close
    core.journal._unlock()  # type: ignore[attr-defined]  # and its lock goes with the process
    core, sent = core_on(SqliteJournal(path))
    assert core.restore(core.journal.load()) == {"queued": 4, "interrupted": 1, "scheduled": 0,
                                                   "finished": 0}
    core.start_recovery()
    core.set_time(T0 + 10, WALL0 + 10)  # nobody claimed j0 within the window
    core.tick()
    order = []
    core.on_worker(W2, p.encode_hello(["default"], {"name": "w2"}, None, 0))
    for _ in range(5):
        job = p.decode_broker(sent[-1])
        order.append((job.job_id, job.attempt))
        core.on_worker(W2, p.encode_worker_result(job.job_id, job.attempt, job.token, True, [b"r"]))
    assert order == [("j0", 1), ("j1", 1), ("j2", 1), ("j3", 1), ("j4", 1)]


# ================================================================================================
# batches: SUBMITS in, RESULTS out
# ================================================================================================


def submits(h: Harness, client: bytes, *job_ids: str, **options: Any) -> None:
    singles = [p.encode_submit(j, p.DEFAULT_QUEUE, p.Options(options.get("timeout"),
                                                             options.get("tries")),
                               [j.encode()]) for j in job_ids]
    h.core.on_client(client, p.encode_submits(singles))


def test_submits_creates_every_job_and_one_accepted_names_them_all(h):
    submits(h, C1, "a", "b", "c")
    h.core.flush()
    assert h.raw_to_client(C1) == [[b"RWC3 ACCEPTED a b c"]]
    assert h.snap()["queued"] == 3 and h.snap()["totals"]["submitted"] == 3


def test_results_of_batched_jobs_leave_in_one_message_per_client_per_turn(h):
    h.hello(W1)
    h.hello(W2)
    submits(h, C1, "a", "b", "c")
    h.core.flush()
    h.clear()
    h.result(W1, "a", 1)
    h.result(W2, "b", 1)
    assert h.raw_to_client(C1) == []  # held until the end of the turn
    h.core.send_results()
    (reply,) = h.to_client(C1)
    assert reply.command == p.RESULTS and reply.batch == [("a", [b"out"]), ("b", [b"out"])]
    h.result(W1, "c", 1)
    h.core.send_results()
    assert h.raw_to_client(C1) == [[b"RWC3 RESULT c", b"out"]]  # one alone: a plain RESULT
    h.core.send_results()
    assert h.raw_to_client(C1) == []


def test_failures_of_batched_jobs_are_told_at_once_and_singles_stay_single(h):
    h.hello(W1)
    submits(h, C1, "a", tries=1)
    h.submit(C2, "s")  # an ordinary SUBMIT: its result is never batched
    h.core.flush()
    h.clear()
    h.error(W1, "a", 1, "boom")
    assert outcome(h.to_client(C1)) == [(p.FAILED, "a", [b"error", b"boom"])]
    h.result(W1, "s", 1)
    assert h.raw_to_client(C2) == [[b"RWC3 RESULT s", b"out"]]


def test_a_refused_job_in_a_batch_does_not_stop_the_others(h):
    h = Harness(max_tries=2)
    submits(h, C1, "ok1", tries=2)
    h.core.on_client(C1, p.encode_submits([
        p.encode_submit("ok2", p.DEFAULT_QUEUE, None, [b"x"]),
        p.encode_submit("bad", p.DEFAULT_QUEUE, p.Options(None, 5), [b"x"]),
        p.encode_submit("ok3", p.DEFAULT_QUEUE, None, [b"x"]),
    ]))
    h.core.flush()
    replies = h.to_client(C1)
    assert [r.command for r in replies] == [p.REFUSED, p.ACCEPTED]
    assert replies[0].job_id == "bad" and replies[0].frames[0] == b"limit"
    assert (replies[1].job_id, replies[1].frames) == ("ok1", [b"ok2", b"ok3"])


def test_a_batched_job_resubmitted_attaches_and_its_result_comes_once(h):
    submits(h, C1, "a")
    submits(h, C1, "a")  # same id again in a later batch: one job, one waiter
    h.core.flush()
    h.clear()
    h.hello(W1)
    (job,) = h.jobs_to(W1)
    h.result(W1, job.job_id, job.attempt)
    h.core.send_results()
    assert h.raw_to_client(C1) == [[b"RWC3 RESULT a", b"out"]]
    assert h.snap()["totals"]["submitted"] == 1


def test_a_batched_job_waited_for_or_resubmitted_singly_is_told_once(h):
    # A client's resync sends WAIT (confirmed jobs) or SUBMIT (unconfirmed ones) for jobs it
    # first sent in a SUBMITS: it is already a waiter, and is not added again (4.3).
    submits(h, C1, "a", "b")
    h.core.flush()
    h.ref(C1, p.WAIT, "a")
    h.submit(C1, "b")
    h.clear()
    h.hello(W1)
    h.hello(W2)
    for wid in (W1, W2):
        (job,) = h.jobs_to(wid)
        h.result(wid, job.job_id, job.attempt)
    h.core.send_results()
    replies = h.to_client(C1)
    told = [i for r in replies for i in ([j for j, _ in r.batch] if r.batch else [r.job_id])]
    assert sorted(told) == ["a", "b"]


def test_a_hello_the_broker_refuses_is_answered_with_the_reason(h):
    h.core.on_worker(W1, [b"RWW3 HELLO default"])  # no info frame: the worker must be told
    assert h.to_worker(W1) == [p.Disconnect(
        "HELLO refused: bad HELLO: needs exactly one info frame after the line (an empty frame "
        "means {})")]
    h.core.on_worker(W2, [b"RWW3 HELLO default"])  # at most once a second: a loop stays cheap
    assert h.to_worker(W2) == []
    h.advance(1.0)
    h.core.on_worker(W2, [b"RWW3 HELLO default", b"x", b"y"])
    assert len(h.to_worker(W2)) == 1
    assert h.snap()["bad_messages"] == {"workers: bad HELLO": 3}


def test_a_refused_limit_never_looks_equal_to_the_limit():
    h = Harness(max_timeout=86400.0)
    h.submit(C1, "j", timeout=86400.001)
    (refused,) = h.to_client(C1)
    assert refused.frames[1] == b"timeout 86400.001s is over the broker's max_timeout of 86400s"


def test_jobs_running_at_a_restart_are_held_back_exactly_heartbeat_times_liveness():
    h = Harness(heartbeat=1.0, liveness=3)
    job = __import__("respworkers.broker.model", fromlist=["Job"]).Job(
        "held", "default", [b"x"], 60.0, 3, 1, WALL0)
    h.core.queues.hold(job)
    h.core.start_recovery()
    h.hello(W1)
    assert h.core.next_wake() <= T0 + 3.0
    h.at(T0 + 2.99)
    assert h.jobs_to(W1) == []
    h.at(T0 + 3.0)
    assert ids(h.jobs_to(W1)) == [("held", 1)]


def test_a_job_due_to_expire_at_once_expires_without_touching_its_queue(h):
    h.hello(W1)
    h.submit(C1, "busy")
    h.core.on_client(C1, p.encode_submit("now", p.DEFAULT_QUEUE, p.Options(expires=0.0), [b"x"]))
    h.core.flush()
    assert h.info("now")["state"] == "expired"
    assert (p.EXPIRED, "now", []) in outcome(h.to_client(C1))
    assert h.snap()["queues"]["default"]["queued"] == 0


def test_a_retry_due_after_the_expiry_expires(h):
    h.hello(W1)
    h.core.on_client(C1, p.encode_submit("j", p.DEFAULT_QUEUE, p.Options(expires=10.0), [b"x"]))
    h.core.flush()
    assert ids(h.jobs_to(W1)) == [("j", 1)]
    h.advance(11.0)  # it started in time: a running job never expires
    assert h.info("j")["state"] == "running"
    h.error(W1, "j", 1, "boom")  # its retry would start after the expiry
    info = h.info("j")
    assert info["state"] == "expired" and "attempt 2 of 3 not started" in info["error"]
    assert h.jobs_to(W1) == []


def test_an_idle_workers_answer_is_confirmed_by_the_next_message_either_side_sends():
    h = Harness(heartbeat=1.0, liveness=3)
    h.hello(W1)
    h.hello(W2)
    h.submit(C1, "a")
    h.submit(C1, "b")
    (a,) = h.jobs_to(W1)
    (b,) = h.jobs_to(W2)
    h.result(W1, a.job_id, 1)  # nothing waits: W1 is parked, its ACK is owed
    assert h.to_worker(W1) == []
    h.beat(W1)  # it speaks: the ACK goes at once
    assert h.to_worker(W1) == [p.Ack(a.job_id, 1)]
    h.beat(W1)
    assert h.to_worker(W1) == []  # once
    h.result(W2, b.job_id, 1)
    h.clear()
    h.advance(1.0)  # the broker's heartbeat: the ACK instead of a HEARTBEAT
    assert h.to_worker(W2) == [p.Ack(b.job_id, 1)]
    assert h.to_worker(W1) == [p.Heartbeat()]
    h.result(W2, b.job_id, 1)  # a repeated answer is a duplicate, confirmed the same way
    h.submit(C1, "c")  # a JOB confirms too: no ACK follows it
    (c,) = h.jobs_to(W1)
    h.beat(W1)
    assert h.to_worker(W1) == []
    h.result(W1, c.job_id, 1, ready=False)  # leaving: confirmed at once
    assert h.to_worker(W1) == [p.Ack(c.job_id, 1)]


def test_a_stopping_broker_sends_the_acks_it_owes_idle_workers():
    h = Harness()
    h.hello(W1)
    h.submit(C1, "a")
    (a,) = h.jobs_to(W1)
    h.result(W1, a.job_id, 1)
    assert h.to_worker(W1) == []  # owed until W1 speaks
    h.core.send_owed_acks()  # the server's clean stop, after its last commit
    assert h.to_worker(W1) == [p.Ack(a.job_id, 1)]
    h.core.send_owed_acks()
    assert h.to_worker(W1) == []
