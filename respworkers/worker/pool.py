"""``rw worker``: supervise N worker processes, restart the ones that die, stop them warmly.

Each child runs in its own process group, so a Ctrl-C in the terminal reaches
only this parent, which forwards one SIGTERM per signal it receives: the first
asks every child to finish its job and leave, the second makes them hand their
jobs back at once.

The parent wakes the moment a child dies (it waits on the children's sentinels) and
tells the broker at once (VACATE, naming the child's slot), so the dead child's job is
re-dispatched without waiting for heartbeats to expire or for the child's restart.
Slots are secret (random per pool), so no other peer can end a child's attempt.
A target that keeps failing at start-up (import or ``setup()``) stops the pool with
exit code 2 and the reason, instead of being restarted forever.

A child the broker drained (``rw drain``) finishes its job, says BYE and exits with
:data:`EXIT_DRAINED`: the pool does not replace it, and once every child is drained the
pool exits 0.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import socket
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import FrameType
from typing import Any

import zmq

from .. import protocol
from ..config import WorkerConfig
from ..security import client_keys, secure_client
from ..targets import import_target
from ..util import WakePipe

log = logging.getLogger(__name__)

#: A child that dies sooner than this after starting is restarted with a growing delay.
QUICK_DEATH = 2.0
MAX_BACKOFF = 30.0
#: This many start-up failures (import or setup) within START_FAILURE_WINDOW stop the pool.
START_FAILURES = 5
START_FAILURE_WINDOW = 60.0
#: How long the parent waits for a VACATE to reach the broker.
VACATE_LINGER_MS = 500
EXIT_START_FAILED = 78
#: A child that stopped because the broker drained it: not replaced.
EXIT_DRAINED = 79
RET_START_FAILED = 2


def _summary(exc: BaseException) -> str:
    """One line: the exception and where it was raised (the traceback's last frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _child_main(
    target: str, cfg: WorkerConfig, queues: tuple[str, ...], slot: str, incarnation: str,
    parent: int, level: int, report: Connection,
) -> None:
    os.setpgrp()  # leave the terminal's process group: Ctrl-C goes to the parent only
    logging.getLogger().setLevel(level)  # handlers come from the parent (fork) or default
    started = False

    def ready() -> None:
        nonlocal started
        started = True
        report.send(("ready", ""))

    try:
        from .runner import Runner

        runner = Runner(import_target(target), cfg, queues, slot=slot, parent_pid=parent,
                        incarnation=incarnation)
        runner.install_signal_handlers()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
        code = runner.run(on_ready=ready)
        if code == 0 and runner.link.draining:
            code = EXIT_DRAINED
    except BaseException as exc:  # reported through logging, not as a raw traceback
        if isinstance(exc, SystemExit):
            raise
        if started:
            log.exception("worker process failed")
            code = 70
        else:
            log.error("worker failed to start: %s", _summary(exc), exc_info=True)
            try:
                report.send(("failed", _summary(exc)))
            except OSError:
                pass
            code = EXIT_START_FAILED
    sys.exit(code)


@dataclass
class Slot:
    index: int
    name: str  #: sent as HELLO's slot; secret, so only this pool's children can take it over
    process: multiprocessing.process.BaseProcess | None = None
    report: Connection | None = None
    started: float = 0.0
    restart_at: float = 0.0
    backoff: float = 0.5
    ready: bool = False
    #: The process now in the slot (new at each start): a VACATE names it, so that one
    #: arriving late never evicts the process that replaced the dead one.
    incarnation: str = ""
    drained: bool = False  #: its process left because the broker drained it: no restart


class Pool:
    def __init__(self, target: str, cfg: WorkerConfig, queues: tuple[str, ...]) -> None:
        self.target = target
        self.cfg = cfg
        self.queues = queues
        self.signals = 0
        prefix = f"{socket.gethostname()}:{os.getpid()}"
        self.slots = [Slot(i, f"{prefix}:{i}:{secrets.token_hex(8)}") for i in range(cfg.processes)]
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self.mp: Any = multiprocessing.get_context(method)  # fork where there is one
        self.keys = client_keys(cfg.secret_key, cfg.broker_key, "worker")
        self.start_failures: deque[float] = deque()
        self.failure: str | None = None  #: why the pool gave up, if it did
        self.wake = WakePipe()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1

    def _start(self, slot: Slot) -> None:
        reader, writer = self.mp.Pipe(duplex=False)
        slot.incarnation = secrets.token_hex(8)
        # Children inherit blocked signals and unblock them once their handlers are in place.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            p = self.mp.Process(
                target=_child_main,
                args=(self.target, self.cfg, self.queues, slot.name, slot.incarnation,
                      os.getpid(), logging.getLogger().getEffectiveLevel(), writer),
                name=f"rw-worker-{slot.index}",
                daemon=False,
            )
            p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
        writer.close()
        slot.process = p
        slot.report = reader
        slot.ready = False
        slot.started = time.monotonic()
        log.info("started worker process %s in slot %d", p.pid, slot.index)

    def _signal_children(self, signum: int) -> None:
        for slot in self.slots:
            p = slot.process
            if p is not None and p.pid is not None and p.exitcode is None:
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    def _read_report(self, slot: Slot) -> str | None:
        """Whether the child said it started; the reason if it said it failed to."""
        failure = None
        conn = slot.report
        if conn is None:
            return None
        try:
            while conn.poll():
                kind, text = conn.recv()
                if kind == "ready":
                    slot.ready = True
                else:
                    failure = text
        except (EOFError, OSError):
            pass
        return failure

    def _vacate(self, slots: list[Slot]) -> None:
        """Tell the broker these slots' processes died, so their jobs go elsewhere now.

        A short-lived context: the parent never holds ZeroMQ state across a fork."""
        ctx = zmq.Context()
        try:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, VACATE_LINGER_MS)
            secure_client(sock, self.keys)
            sock.connect(self.cfg.broker)
            for slot in slots:
                sock.send_multipart(protocol.encode_vacate(slot.name, slot.incarnation),
                                    zmq.NOBLOCK)
            sock.close()
        except zmq.ZMQError as exc:
            log.warning("could not tell the broker that a worker died: %s", exc)
        finally:
            ctx.term()

    def _reap(self, now: float) -> None:
        """Handle children that ended: restart them, or give up on a target that cannot start."""
        dead: list[Slot] = []
        for slot in self.slots:
            p = slot.process
            if p is None or p.exitcode is None:
                if p is not None and slot.report is not None and not slot.ready:
                    self._read_report(slot)
                continue
            p.join()
            failure = self._read_report(slot)
            if slot.report is not None:
                slot.report.close()
                slot.report = None
            slot.process = None
            if p.exitcode == EXIT_DRAINED:
                slot.drained = True
                log.info("worker process %s in slot %d was drained; not replacing it",
                         p.pid, slot.index)
                continue
            if self.signals:
                log.info("worker process %s exited (%s)", p.pid, p.exitcode)
                continue
            dead.append(slot)
            lived = now - slot.started
            if not slot.ready:
                self.start_failures.append(now)
                while self.start_failures and now - self.start_failures[0] > START_FAILURE_WINDOW:
                    self.start_failures.popleft()
                if len(self.start_failures) >= START_FAILURES:
                    self.failure = (f"worker processes failed to start {len(self.start_failures)} "
                                    f"times within {START_FAILURE_WINDOW:.0f}s; last: "
                                    f"{failure or f'exit code {p.exitcode}'}")
            slot.backoff = min(MAX_BACKOFF, slot.backoff * 2) if lived < QUICK_DEATH else 0.5
            slot.restart_at = now + (slot.backoff if lived < QUICK_DEATH else 0.0)
            log.warning(
                "worker process %s in slot %d exited with %s after %.1fs; restarting%s",
                p.pid, slot.index, p.exitcode, lived,
                f" in {slot.backoff:.1f}s" if lived < QUICK_DEATH else "",
            )
        if dead and self.failure is None:
            self._vacate(dead)

    def run(self) -> int:
        self.wake.catch_signals()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for slot in self.slots:
            self._start(slot)
        forwarded = 0
        while True:
            if self.failure is not None and not self.signals:
                log.error("%s; stopping the pool", self.failure)
                self.signals = 1
            while self.signals > forwarded:  # one SIGTERM to each child per signal received
                if forwarded == 0:
                    log.info("stopping: each worker finishes its job in hand (signal again to force)")
                else:
                    log.warning("forcing: workers hand their jobs back to the broker")
                forwarded += 1
                # Two pending signals of one number are one: a child not scheduled between
                # two kill() calls would see one stop, not two. It counts SIGINT as SIGTERM,
                # so the signals alternate and never merge.
                self._signal_children(signal.SIGTERM if forwarded % 2 else signal.SIGINT)
            now = time.monotonic()
            self._reap(now)
            if not self.signals:
                for slot in self.slots:
                    if (slot.process is None and now >= slot.restart_at and self.failure is None
                            and not slot.drained):
                        self._start(slot)
            alive = [s for s in self.slots if s.process is not None]
            if not alive and (self.signals or all(s.drained for s in self.slots)):
                log.info("all worker processes stopped")
                return RET_START_FAILED if self.failure else 0
            waiting = [s.restart_at for s in self.slots
                       if s.process is None and not self.signals and not s.drained]
            timeout = max(0.0, min(waiting) - now) if waiting else None
            handles: list[object] = [self.wake.fileno()]
            for s in alive:
                assert s.process is not None
                handles.append(s.process.sentinel)
                if s.report is not None and not s.ready:
                    handles.append(s.report)
            multiprocessing.connection.wait(handles, timeout)  # type: ignore[arg-type]
            self.wake.drain()


def run_pool(target: str, cfg: WorkerConfig, queues: tuple[str, ...]) -> int:
    """Entry point of ``rw worker`` (the target has already been checked by the caller)."""
    pool = Pool(target, cfg, queues)
    code = pool.run()
    if pool.failure:
        print(f"rw: {pool.failure}", file=sys.stderr)
    return code
