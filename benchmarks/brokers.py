"""The brokers the suite measures, each run in a process of its own.

- ``baseline``: a minimal ~40-line Python on-demand (LRU) broker in the style of the
  ZeroMQ guide: a ROUTER for clients, a ROUTER for workers, a deque of ready workers.
  It is the reference every respworkers figure is a ratio to; it is defined here only.
- ``c-proxy``: libzmq's own ``zmq.proxy(ROUTER, DEALER)`` loop in C with REP workers.
  The DEALER deals jobs round-robin to workers whether or not they are busy: the upper
  bound of what a broker on this machine can move, and unfair on uneven jobs.
- ``rw-memory`` / ``rw-sqlite``: the respworkers broker (``run_broker``) without a
  journal, and with its sqlite journal (WAL, sync=normal) in the run's temp folder.
- ``rw-memory+c`` / ``rw-sqlite+c``: the same broker from the compiled build
  (``make compiled``: build/compiled), in a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any

import zmq

from harness import Fleet, pid_of, wait_for_ipc

HERE = os.path.dirname(os.path.abspath(__file__))
#: Where ``make compiled`` puts the package with its compiled hot modules.
COMPILED = os.path.join(os.path.dirname(HERE), "build", "compiled")


def compiled_build() -> str | None:
    """Why the compiled broker cannot run here, or None."""
    core = os.path.join(COMPILED, "respworkers", "broker")
    if not os.path.isdir(core) or not any(f.startswith("core.") and f.endswith(".so")
                                          for f in os.listdir(core)):
        return f"no compiled build in {os.path.relpath(COMPILED)} (make compiled)"
    return None


# ------------------------------------------------------------------------------ baseline broker
def baseline_broker(front: str, back: str) -> None:
    """The minimal on-demand broker the respworkers broker is held against (~40 lines)."""
    ctx = zmq.Context()
    frontend = ctx.socket(zmq.ROUTER)
    frontend.bind(front)
    backend = ctx.socket(zmq.ROUTER)
    backend.bind(back)
    ready: deque[bytes] = deque()
    pending: deque[list[bytes]] = deque()
    poller = zmq.Poller()
    poller.register(frontend, zmq.POLLIN)
    poller.register(backend, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if backend in events:
            while True:
                try:
                    frames = backend.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                worker = frames[0]
                if len(frames) > 2:  # [worker, client, empty, reply...]
                    frontend.send_multipart(frames[1:])
                if pending:
                    backend.send_multipart([worker, *pending.popleft()])
                else:
                    ready.append(worker)
        if frontend in events:
            while True:
                try:
                    frames = frontend.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if ready:
                    backend.send_multipart([ready.popleft(), *frames])
                else:
                    pending.append(frames)


# ------------------------------------------------------------------------------ C proxy
def c_proxy(front: str, back: str) -> None:
    """libzmq's proxy loop (C): clients' ROUTER to a round-robin DEALER of REP workers."""
    ctx = zmq.Context()
    frontend = ctx.socket(zmq.ROUTER)
    frontend.bind(front)
    backend = ctx.socket(zmq.DEALER)
    backend.bind(back)
    zmq.proxy(frontend, backend)


# ------------------------------------------------------------------------------ respworkers
def rw_broker(settings: dict[str, Any], trace: str | None = None) -> None:
    """The respworkers broker as ``rw broker`` runs it (signals: SIGTERM stops it warmly).

    With ``trace`` (a file path), its slow steps are timed (see :func:`_trace_stalls`) and
    written there as JSON when it stops.
    """
    from respworkers.broker.server import run_broker
    from respworkers.config import BrokerConfig

    stalls = _trace_stalls() if trace else None
    try:
        run_broker(BrokerConfig(**settings))
    finally:
        if trace and stalls is not None:
            with open(trace, "w") as fh:
                json.dump(stalls, fh)


#: Broker steps timed by --trace: label -> where the step may live, (module, class, method).
#: Each runs at most a few times per loop turn, so timing them costs microseconds per turn.
#: Several places per label keep --trace working across the broker's refactors.
TRACED: dict[str, tuple[tuple[str, str, str], ...]] = {
    "tick (heartbeats, expiry)": (("respworkers.broker.core", "BrokerCore", "tick"),),
    "journal commit + ACCEPTED": (("respworkers.broker.core", "BrokerCore", "flush"),
                                  ("respworkers.broker.commits", "GroupCommit", "now")),
    "send_results": (("respworkers.broker.core", "BrokerCore", "send_results"),),
    "status snapshot": (("respworkers.broker.server", "BrokerServer", "_serve_status"),),
    "sqlite commit": (("respworkers.broker.journal", "SqliteJournal", "commit"),),
}
TRACE_MIN_NS = 250_000  # steps shorter than this are not recorded


def _trace_stalls() -> list[tuple[str, int, int, int]]:
    """Time, inside this broker process, every loop turn and the steps in TRACED, the
    cyclic GC's collections and gc.freeze; keep those over TRACE_MIN_NS as (what, start,
    duration, CPU time of the thread meanwhile), in perf_counter nanoseconds (CLOCK_MONOTONIC:
    comparable with the client's). A step whose CPU time is well under its duration was
    waiting: for the disk (fsync), or for a core (preempted by another process).

    This patches respworkers classes in this process only, so that the suite can say
    where a latency tail comes from without a hook in the broker.
    """
    import functools
    import gc
    import importlib
    import time

    stalls: list[tuple[str, int, int, int]] = []
    perf, cpu = time.perf_counter_ns, time.thread_time_ns

    def timed(fn: Any, label: str) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kw: Any) -> Any:
            t, c = perf(), cpu()
            try:
                return fn(*args, **kw)
            finally:
                d = perf() - t
                if d >= TRACE_MIN_NS:
                    stalls.append((label, t, d, cpu() - c))
        return wrapper

    for label, places in TRACED.items():
        found = 0
        for module, cls_name, method in places:
            try:
                cls = getattr(importlib.import_module(module), cls_name, None)
            except ImportError:
                cls = None
            if cls is not None and hasattr(cls, method):
                setattr(cls, method, timed(getattr(cls, method), label))
                found += 1
        if not found:  # renamed by a refactor: trace the rest
            print(f"--trace: no {label!r} step found in respworkers, not timed", file=sys.stderr)
    gc.freeze = timed(gc.freeze, "gc.freeze")  # type: ignore[assignment]

    collecting = [0, 0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collecting[:] = perf(), cpu()
        elif collecting[0]:
            d = perf() - collecting[0]
            if d >= TRACE_MIN_NS:
                stalls.append((f"gc gen {info.get('generation')}", collecting[0], d, cpu() - collecting[1]))

    gc.callbacks.append(on_gc)
    # A loop turn is the time between one poll's return and the next poll.
    poll = zmq.Poller.poll
    returned = [0, 0]

    def timed_poll(self: zmq.Poller, timeout: Any = None) -> Any:
        t = perf()
        if returned[0] and t - returned[0] >= TRACE_MIN_NS:
            stalls.append(("loop turn", returned[0], t - returned[0], cpu() - returned[1]))
        events = []
        try:
            events = poll(self, timeout)
            return events
        finally:
            returned[:] = perf(), cpu()
            if not events:  # woken by its own timer (a due commit, a tick), not by a message
                stalls.append(("timer wake-up", returned[0], 0, 0))

    zmq.Poller.poll = timed_poll  # type: ignore[method-assign]
    return stalls


BROKERS = ("baseline", "c-proxy", "rw-memory", "rw-sqlite")


@dataclass
class Running:
    """A started broker: its process and where to reach it."""

    kind: str
    proc: Any
    clients: str
    workers: str
    status: str | None
    journal: str | None
    trace: str | None = None  #: where the broker writes its timed steps when it stops

    @property
    def pid(self) -> int:
        return pid_of(self.proc)


def rw_broker_compiled(settings: dict[str, Any], trace: str | None = None) -> None:
    """:func:`rw_broker` from the compiled build: this (forked) process becomes a fresh
    interpreter that imports respworkers from build/compiled (same pid, so it is stopped
    like any other)."""
    # -c puts the working folder (maybe the pure package's) first: the build goes before it.
    code = ("import json, sys; sys.path[:0] = sys.argv[3:5]; import respworkers.broker.core as c; "
            "assert c.__file__.endswith('.so'), f'not compiled: {c.__file__}'; "
            "from brokers import rw_broker; rw_broker(json.loads(sys.argv[1]), sys.argv[2] or None)")
    os.execv(sys.executable, [sys.executable, "-c", code, json.dumps(settings), trace or "",
                              COMPILED, HERE])


def rw_settings(fleet: Fleet, journal: str | None, **extra: Any) -> dict[str, Any]:
    """BrokerConfig fields for a broker on ipc:// endpoints in the fleet's temp folder."""
    return {"clients": fleet.ipc("clients"), "workers": fleet.ipc("workers"),
            "status": fleet.ipc("status"), "journal": journal or ":memory:", **extra}


def start_broker(fleet: Fleet, kind: str, trace: bool = False, **extra: Any) -> Running:
    """Start one broker of ``kind`` and return once every endpoint is bound (for respworkers,
    the workers endpoint is bound only once its journal is loaded). ``trace``: respworkers
    brokers time their slow steps (see :func:`rw_broker`)."""
    front, back = fleet.ipc("clients"), fleet.ipc("workers")
    if kind == "baseline":
        return _started(fleet, Running(kind, fleet.start(baseline_broker, front, back), front, back,
                                       None, None))
    if kind == "c-proxy":
        return _started(fleet, Running(kind, fleet.start(c_proxy, front, back), front, back,
                                       None, None))
    compiled = kind.endswith("+c")
    base = kind[:-2] if compiled else kind
    if base not in ("rw-memory", "rw-sqlite"):
        raise ValueError(f"unknown broker {kind!r}")
    journal = os.path.join(fleet.tmp, "journal.sqlite3") if base == "rw-sqlite" else None
    settings = rw_settings(fleet, journal, **extra)
    path = os.path.join(fleet.tmp, "trace.json") if trace else None
    proc = fleet.start(rw_broker_compiled if compiled else rw_broker, settings, path, name=kind)
    return _started(fleet, Running(kind, proc, front, back, settings["status"], journal, path))


def _started(fleet: Fleet, b: Running) -> Running:
    wait_for_ipc([b.clients, b.workers] + ([b.status] if b.status else []), watch=fleet)
    return b
