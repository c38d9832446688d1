"""The brokers the suite measures, each run in a process of its own.

- ``baseline``: a minimal ~40-line Python on-demand (LRU) broker in the style of the
  ZeroMQ guide: a ROUTER for clients, a ROUTER for workers, a deque of ready workers.
  It is the reference every respworkers figure is a ratio to; it is defined here only.
- ``c-proxy``: libzmq's own ``zmq.proxy(ROUTER, DEALER)`` loop in C with REP workers.
  The DEALER deals jobs round-robin to workers whether or not they are busy: the upper
  bound of what a broker on this machine can move, and unfair on uneven jobs.
- ``rw-memory`` / ``rw-sqlite``: the respworkers broker (``run_broker``) without a
  journal, and with its sqlite journal (WAL, sync=normal) in the run's temp folder.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from typing import Any

import zmq

from harness import Fleet, wait_for_ipc


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
def rw_broker(settings: dict[str, Any]) -> None:
    """The respworkers broker as ``rw broker`` runs it (signals: SIGTERM stops it warmly)."""
    from respworkers.broker.server import run_broker
    from respworkers.config import BrokerConfig

    run_broker(BrokerConfig(**settings))


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

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return int(self.proc.pid)


def rw_settings(fleet: Fleet, journal: str | None, **extra: Any) -> dict[str, Any]:
    """BrokerConfig fields for a broker on ipc:// endpoints in the fleet's temp folder."""
    return {"clients": fleet.ipc("clients"), "workers": fleet.ipc("workers"),
            "status": fleet.ipc("status"), "journal": journal or ":memory:", **extra}


def start_broker(fleet: Fleet, kind: str, **extra: Any) -> Running:
    """Start one broker of ``kind`` and return once every endpoint is bound (for respworkers,
    the workers endpoint is bound only once its journal is loaded)."""
    front, back = fleet.ipc("clients"), fleet.ipc("workers")
    if kind == "baseline":
        return _started(fleet, Running(kind, fleet.start(baseline_broker, front, back), front, back,
                                       None, None))
    if kind == "c-proxy":
        return _started(fleet, Running(kind, fleet.start(c_proxy, front, back), front, back,
                                       None, None))
    if kind not in ("rw-memory", "rw-sqlite"):
        raise ValueError(f"unknown broker {kind!r}")
    journal = os.path.join(fleet.tmp, "journal.sqlite3") if kind == "rw-sqlite" else None
    settings = rw_settings(fleet, journal, **extra)
    proc = fleet.start(rw_broker, settings, name=kind)
    return _started(fleet, Running(kind, proc, front, back, settings["status"], journal))


def _started(fleet: Fleet, b: Running) -> Running:
    wait_for_ipc([b.clients, b.workers] + ([b.status] if b.status else []), watch=fleet)
    return b
