"""Workers and clients of the benchmark loads, each speaking one broker's protocol.

Raw peers (every kind but ``runner`` and the ``client*`` ones) do nothing but the
protocol, through respworkers' cheap send/receive calls, so that on a 2-core machine the
broker is what is measured. ``runner`` workers and ``client`` clients are the real
``respworkers`` classes, as users run them.

Every worker answers through :func:`answer`: a payload ``pid`` is answered with the
worker's pid (the warm-up uses it to know every worker is connected), ``sleep:SECONDS``
sleeps that long (the mixed workload), anything else is echoed.

A client process connects, warms up until every worker has answered, says ``ready`` on
the control queue, waits for the ``go`` event (the suite reads the broker's CPU time just
before setting it) and reports its measurement on the same queue.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from respworkers import protocol
from respworkers.sockets import NOBLOCK, recv, send

from harness import report_errors

PAYLOAD = b"x" * 64  #: the payload of a no-op job
PID = b"pid"


def answer(payload: bytes) -> bytes:
    """What every benchmark worker does with a job."""
    if payload == PID:
        return str(os.getpid()).encode()
    if payload.startswith(b"sleep:"):
        time.sleep(float(payload[6:]))
    return payload


def sleep_payload(seconds: float) -> bytes:
    return b"sleep:%.6f" % seconds


# ================================================================================ workers
def dealer_worker(back: str) -> None:
    """A worker of the baseline broker: READY once, then echo [client, empty, payload]."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(back)
    send(s, [b"READY"])
    while True:
        frames = recv(s)
        send(s, [frames[0], frames[1], answer(frames[2])])


def rep_worker(back: str) -> None:
    """A worker of the C proxy: a REP socket (the envelope is handled by libzmq)."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.REP)
    s.connect(back)
    while True:
        s.send(answer(s.recv()))


def rww3_worker(back: str, sockets: int = 1, prefetch: int | None = None) -> None:
    """Raw RWW3 workers, ``sockets`` of them in this process (each its own connection and
    registration): HELLO, echo the attempt token in RESULT, heartbeat every second. With
    ``prefetch``, HELLO announces it and the jobs of each JOBS are answered in one RESULTS."""
    ctx = zmq.Context()
    socks = []
    for i in range(sockets):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(back)
        info: dict[str, Any] = {"name": f"bench:{os.getpid()}:{i}", "heartbeat": 1.0,
                                "slot": f"bench-{os.getpid()}-{i}-{os.urandom(8).hex()}"}
        if prefetch:
            info["prefetch"] = prefetch
        send(s, protocol.encode_hello(["default"], info))
        socks.append(s)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    beat = time.monotonic() + 1.0
    job, jobs = protocol.JOB, protocol.JOBS
    while True:
        for s, _ in poller.poll(1000):
            while True:
                try:
                    frames = recv(s, NOBLOCK)
                except zmq.Again:
                    break
                words = frames[0].split(b" ")  # RWW3 JOB id attempt timeout token ...
                if words[1] == job:
                    send(s, [b"RWW3 RESULT %s %s %s 1" % (words[2], words[3], words[5]),
                             answer(frames[1])])
                elif words[1] == jobs:  # RWW3 JOBS answered n1 n2 ...: each JOB is 2 frames here
                    out = [b"RWW3 RESULTS " + b" ".join([b"2"] * (len(words) - 3))]
                    for k in range(1, len(frames), 2):
                        w = frames[k].split(b" ")
                        out += [b"RWW3 RESULT %s %s %s 1" % (w[2], w[3], w[5]),
                                answer(frames[k + 1])]
                    send(s, out if len(out) > 3 else [out[1], out[2]])
        now = time.monotonic()
        if now >= beat:  # the broker drops a worker silent for 3 s
            beat = now + 1.0
            for s in socks:
                send(s, protocol.HEARTBEAT_FRAMES)


def _bench_worker_class(prefetch: int | None = None) -> type:
    from respworkers import Worker

    class BenchWorker(Worker):
        """The real worker class users derive from, doing :func:`answer`."""

        def process(self, payload: bytes) -> bytes:
            return answer(payload)

    if prefetch is not None:
        BenchWorker.prefetch = prefetch  # jobs a worker process holds, the running one included
    return BenchWorker


def runner_worker(back: str, prefetch: int | None = None) -> None:
    """The real thing: respworkers' worker process (Runner: jobs in line, a watchman thread)."""
    from respworkers.config import WorkerConfig
    from respworkers.worker.runner import Runner

    Runner(_bench_worker_class(prefetch), WorkerConfig(broker=back), ("default",)).run()


WORKERS: dict[str, Callable[..., None]] = {
    "dealer": dealer_worker, "rep": rep_worker, "rww3": rww3_worker, "runner": runner_worker,
}


# ================================================================================ what a client does
@dataclass
class Plan:
    """The jobs one client process runs and how.

    ``mode``: ``throughput`` (keep ``window`` jobs in flight until ``jobs`` are done),
    ``latency`` (one job at a time, each timed) or ``makespan`` (all jobs at once; the
    payload of job i is ``payloads[i % len(payloads)]``).
    """

    mode: str
    jobs: int
    window: int = 100
    per_message: int = 1  #: jobs per SUBMITS (1: one SUBMIT per job)
    payloads: Sequence[bytes] = (PAYLOAD,)
    expect_workers: int = 0  #: warm up until this many distinct workers answered (0: no check)
    sockets: int = 1  #: client connections in this process (raw RWC3 only)
    status: str | None = None  #: the broker's status endpoint (real clients)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Measured:
    """What a client process reports."""

    started: float  #: time.monotonic() of the first measured send (system-wide clock)
    ended: float
    jobs: int
    cpu: float  #: this client process's own CPU seconds during the measurement
    latencies_ns: list[int] = field(default_factory=list)
    offsets_ns: list[int] = field(default_factory=list)  #: when each timed job was sent, from start
    t0_ns: int = 0  #: perf_counter_ns() at the start (CLOCK_MONOTONIC, the same in every process)


class JobError(RuntimeError):
    """A benchmark job did not succeed: the figures would be wrong."""


# ---------------------------------------------------------------------- wires (raw clients)
class Envelope:
    """The plain REQ envelope: an empty frame, then the payload (any REQ is an rw client)."""

    def request(self, first: int, payloads: list[bytes]) -> list[bytes]:
        return [b"", payloads[0]]

    def results(self, reply: list[bytes]) -> list[bytes]:
        if len(reply) != 2 or reply[0] or not reply[1]:
            raise JobError(f"plain request failed or odd reply: {reply[:3]!r}")
        return [reply[1]]


class Rwc:
    """RWC3: one SUBMIT per job, or ``per_message`` jobs per SUBMITS. Job ids are unique
    per client (``prefix``), so a journal never takes a job for a resubmission."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def request(self, first: int, payloads: list[bytes]) -> list[bytes]:
        p = self.prefix
        if len(payloads) == 1:
            return protocol.encode_submit(f"{p}{first}", "default", None, [payloads[0]])
        return protocol.encode_submits([
            protocol.encode_submit(f"{p}{first + k}", "default", None, [payload])
            for k, payload in enumerate(payloads)])

    @staticmethod
    def results(reply: list[bytes]) -> list[bytes]:
        line = reply[0]
        if line.startswith(b"RWC3 RESULT "):
            return reply[1:2]
        if line.startswith(b"RWC3 RESULTS "):
            counts = line.split(b" ")[3::2]  # "RWC3 RESULTS", then id and frame count per job
            out, i = [], 1
            for c in counts:
                out.append(reply[i])
                i += int(c)
            return out
        if line.startswith((b"RWC3 ACCEPTED", b"RWC3 PONG")):
            return []
        raise JobError(f"broker answered {reply[:2]!r}")


Wire = Any  # Envelope | Rwc


def _windowed(sock: zmq.Socket, wire: Wire, plan: Plan, first: int = 0) -> Measured:
    """Keep ``plan.window`` jobs in flight until ``plan.jobs`` results came back (one socket)."""
    n, window, k_max = plan.jobs, plan.window, plan.per_message
    payloads, m = plan.payloads, len(plan.payloads)
    timed = plan.mode == "latency"
    lat: list[int] = []
    offsets: list[int] = []
    perf = time.perf_counter_ns
    cpu0 = time.process_time()
    started = time.monotonic()
    t0 = perf()
    sent = got = 0
    ts = 0
    while got < n:
        while sent < n and sent - got <= window - k_max:
            k = min(k_max, n - sent)
            batch = [payloads[(sent + j) % m] for j in range(k)]
            if timed:
                ts = perf()
            send(sock, wire.request(first + sent, batch))
            sent += k
        done = wire.results(recv(sock))
        if done:
            got += len(done)
            if timed:
                now = perf()
                lat.append(now - ts)
                offsets.append(ts - t0)
    return Measured(started, time.monotonic(), n, time.process_time() - cpu0, lat, offsets, t0)


def _windowed_many(socks: list[zmq.Socket], wires: list[Wire], plan: Plan) -> Measured:
    """``plan.window`` jobs in flight on each of several sockets; ``plan.jobs`` in all."""
    per_sock = [plan.jobs // len(socks) + (i < plan.jobs % len(socks)) for i in range(len(socks))]
    sent = [0] * len(socks)
    got = [0] * len(socks)
    index = {s: i for i, s in enumerate(socks)}
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    cpu0 = time.process_time()
    started = time.monotonic()
    for i, s in enumerate(socks):
        while sent[i] < per_sock[i] and sent[i] - got[i] < plan.window:
            send(s, wires[i].request(sent[i], [PAYLOAD]))
            sent[i] += 1
    left = plan.jobs
    while left:
        for s, _ in poller.poll():
            i = index[s]
            while True:
                try:
                    reply = recv(s, NOBLOCK)
                except zmq.Again:
                    break
                done = len(wires[i].results(reply))
                got[i] += done
                left -= done
                while sent[i] < per_sock[i] and sent[i] - got[i] < plan.window:
                    send(s, wires[i].request(sent[i], [PAYLOAD]))
                    sent[i] += 1
    return Measured(started, time.monotonic(), plan.jobs, time.process_time() - cpu0)


def _warm_up_raw(socks: list[zmq.Socket], wires: list[Wire], expect: int) -> None:
    """Send ``pid`` jobs until ``expect`` distinct workers have answered (and every socket
    has had an answer), so that no measurement starts before every worker is connected."""
    pids: set[bytes] = set()
    deadline = time.monotonic() + 30
    rounds = 0
    while True:
        rounds += 1
        for i, (s, w) in enumerate(zip(socks, wires)):
            k = 2 * expect if i == 0 else 1
            for j in range(k):
                if isinstance(w, Envelope):
                    send(s, [b"", PID])
                else:
                    send(s, protocol.encode_submit(f"{w.prefix}warm{rounds}-{j}", "default",
                                                   None, [PID]))
            got = 0
            while got < k:
                for r in w.results(recv(s)):
                    pids.add(r)
                    got += 1
        if len(pids) >= expect:
            return
        if time.monotonic() > deadline:
            raise JobError(f"only {len(pids)} of {expect} workers answered within 30s")
        time.sleep(0.05)


def raw_client(kind: str, front: str, plan: Plan, ctl: Any, go: Any) -> None:
    """A raw client process: ``envelope`` (plain REQ envelope on a DEALER) or ``rwc``."""
    report_errors(ctl, _raw_client, kind, front, plan, ctl, go)


def _raw_client(kind: str, front: str, plan: Plan, ctl: Any, go: Any) -> None:
    ctx = zmq.Context()
    socks, wires = [], []
    for i in range(plan.sockets):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if kind == "rwc":
            s.setsockopt(zmq.ROUTING_ID, b"rwc-bench-%d-%d" % (os.getpid(), i))
        s.connect(front)
        socks.append(s)
        wires.append(Envelope() if kind == "envelope" else Rwc(f"c{os.getpid()}-{i}-"))
    _warm_up_raw(socks, wires, max(1, plan.expect_workers))
    ctl.put(("ready", os.getpid()))
    go.wait()
    if plan.sockets == 1:
        m = _windowed(socks[0], wires[0], plan)
    else:
        m = _windowed_many(socks, wires, plan)
    ctl.put(("done", m))
    for s in socks:
        s.close(0)
    ctx.term()


# ---------------------------------------------------------------------- the real client
def real_client(front: str, plan: Plan, ctl: Any, go: Any) -> None:
    """``respworkers.Client`` as users run it: ``submit`` one job per message (per_message
    1), or ``submit_many`` in chunks; outcomes collected as they come."""
    report_errors(ctl, _real_client, front, plan, ctl, go)


def _real_client(front: str, plan: Plan, ctl: Any, go: Any) -> None:
    from respworkers import Client

    with Client(front, status=plan.status or "ipc:///nonexistent") as c:
        pids: set[bytes] = set()
        deadline = time.monotonic() + 30
        while len(pids) < max(1, plan.expect_workers):
            pids.update(c.map([PID] * max(2, 2 * plan.expect_workers)))
            if time.monotonic() > deadline:
                raise JobError(f"only {len(pids)} of {plan.expect_workers} workers answered")
        ctl.put(("ready", os.getpid()))
        go.wait()
        ctl.put(("done", _real_measure(c, plan)))


def _ok(r: Any) -> None:
    if not r.ok:
        raise JobError(f"job {r.id} ended {r.status}: {r.reason} {r.error[:200]}")


def _real_measure(c: Any, plan: Plan) -> Measured:
    n, window, k_max = plan.jobs, plan.window, plan.per_message
    payloads, m = plan.payloads, len(plan.payloads)
    cpu0 = time.process_time()
    started = time.monotonic()
    lat: list[int] = []
    offsets: list[int] = []
    perf = time.perf_counter_ns
    t0 = perf()
    if plan.mode == "latency":
        for i in range(n):
            ts = perf()
            c.run(payloads[i % m])
            lat.append(perf() - ts)
            offsets.append(ts - t0)
    elif plan.mode == "makespan":
        ids = c.submit_many([payloads[i % m] for i in range(n)])
        for r in c.results(ids):
            _ok(r)
    elif k_max == 1:  # one SUBMIT per job, collected oldest first
        inflight: deque[str] = deque()
        sent = 0
        for _ in range(n):
            while sent < n and len(inflight) < window:
                inflight.append(c.submit(payloads[sent % m]))
                sent += 1
            _ok(c.outcome(inflight.popleft()))
    else:  # submit_many chunks, collected chunk by chunk
        chunks: deque[list[str]] = deque()
        sent = done = 0
        while done < n:
            while sent < n and len(chunks) * k_max < window:
                k = min(k_max, n - sent)
                chunks.append(c.submit_many([payloads[(sent + j) % m] for j in range(k)]))
                sent += k
            for r in c.results(chunks.popleft()):
                _ok(r)
                done += 1
    return Measured(started, time.monotonic(), n, time.process_time() - cpu0, lat, offsets, t0)
