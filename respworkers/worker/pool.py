"""``rw worker``: supervise worker processes, restart the ones that die, stop them warmly;
recycle them after N jobs or past a memory limit, grow and shrink the pool with the work,
restart them when the code changes (``--reload``).

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

**Autoscaling** (``-n MIN:MAX``): each child keeps two shared numbers, the seconds it has
spent in jobs and when its current job started, so the parent sees how busy every child
is without a message per job. Once a second, if every child was busy at least
GROW_BUSY of the last second (on-demand dispatch keeps a child busy only while jobs wait
for it), the pool grows by half its size (at least one) up to MAX. A child that has run
no job for ``scale_down_after`` seconds is retired with a warm stop (one per second),
down to MIN. A retired or recycled child says goodbye after its job in hand: nothing is
lost and no try is charged.

A child the broker drained (``rw drain``) finishes its job, says BYE and exits with
:data:`EXIT_DRAINED`: the pool does not replace it, and once every child is drained the
pool exits 0.
"""

from __future__ import annotations

import logging
import math
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
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

import zmq

from .. import protocol
from ..config import WorkerConfig
from ..security import client_keys, secure_client
from ..targets import import_targets
from ..util import WakePipe
from .runner import EXIT_RECYCLE

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
#: Autoscaling: how often the pool looks, and how busy every child must have been to grow.
SCALE_EVERY = 1.0
GROW_BUSY = 0.85
#: --reload: how often files are looked at, and which folders are never looked into.
RELOAD_EVERY = 1.0
_NOT_SOURCE = {".git", ".hg", ".venv", "venv", "node_modules", "__pycache__", ".mypy_cache",
               ".ruff_cache", ".pytest_cache", ".tox", "build", "dist"}


def _named(pid: int | None) -> dict[str, Any]:
    """Log fields for a child: ``worker`` as the broker and rw status name it (host:pid)."""
    return {"worker": f"{socket.gethostname()}:{pid}"}


def _summary(exc: BaseException) -> str:
    """One line: the exception and where it was raised (the traceback's last frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _child_main(
    targets: list[str], cfg: WorkerConfig, queues: tuple[str, ...], slot: str, incarnation: str,
    parent: int, level: int, report: Connection, busy: Any,
) -> None:
    os.setpgrp()  # leave the terminal's process group: Ctrl-C goes to the parent only
    if logging.getLogger().handlers:  # forked: the parent's handler, format and all
        logging.getLogger().setLevel(level)
    else:  # spawned (--reload): a fresh interpreter logs as its pool does
        from ..logs import setup

        setup(level, cfg.log_format)
    started = False

    def ready() -> None:
        nonlocal started
        started = True
        report.send(("ready", ""))

    try:
        from .runner import Runner

        runner = Runner(import_targets(targets), cfg, queues, slot=slot, parent_pid=parent,
                        incarnation=incarnation, busy=busy)
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
    #: Shared with the child: [seconds spent in finished jobs, start of the job in hand or 0].
    busy: Any = None
    busy_seen: float = 0.0  #: busy seconds at the last look
    last_busy: float = 0.0  #: when the child was last seen working (or started)
    retiring: bool = False  #: warm-stopped to shrink the pool: not restarted
    restart_now: bool = False  #: warm-stopped to be replaced at once (reload)

    def busy_seconds(self, now: float) -> float:
        total, since = float(self.busy[0]), float(self.busy[1])
        return total + (now - since if since else 0.0)


class Pool:
    def __init__(self, targets: Sequence[str], cfg: WorkerConfig, queues: tuple[str, ...]) -> None:
        self.targets = list(targets)
        self.cfg = cfg
        self.queues = queues
        self.signals = 0
        self._prefix = f"{socket.gethostname()}:{os.getpid()}"
        self._next_index = 0
        self.low = cfg.min_processes or cfg.processes  #: the pool's size range
        self.high = cfg.processes
        self.slots = [self._new_slot() for _ in range(self.low)]
        # fork where there is one (children start fast, with the target imported); a fresh
        # interpreter per child when reloading, so that each one imports the code anew.
        method = ("fork" if "fork" in multiprocessing.get_all_start_methods() and not cfg.reload
                  else "spawn")
        self.mp: Any = multiprocessing.get_context(method)
        self._next_scale = 0.0
        self._sources = self._source_times() if cfg.reload else {}
        self._next_scan = 0.0
        self.keys = client_keys(cfg.secret_key, cfg.broker_key, "worker")
        self.start_failures: deque[float] = deque()
        self.failure: str | None = None  #: why the pool gave up, if it did
        self.wake = WakePipe()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1

    def _new_slot(self) -> Slot:
        index = self._next_index
        self._next_index += 1
        return Slot(index, f"{self._prefix}:{index}:{secrets.token_hex(8)}")

    def _start(self, slot: Slot) -> None:
        reader, writer = self.mp.Pipe(duplex=False)
        slot.incarnation = secrets.token_hex(8)
        slot.busy = self.mp.RawArray("d", 2)
        slot.busy_seen = 0.0
        slot.restart_now = False
        # Children inherit blocked signals and unblock them once their handlers are in place.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            p = self.mp.Process(
                target=_child_main,
                args=(self.targets, self.cfg, self.queues, slot.name, slot.incarnation,
                      os.getpid(), logging.getLogger().getEffectiveLevel(), writer, slot.busy),
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
        slot.started = slot.last_busy = time.monotonic()
        log.info("started worker process %s in slot %d", p.pid, slot.index, extra=_named(p.pid))

    def _signal_children(self, signum: int) -> None:
        for slot in self.slots:
            self._signal(slot, signum)

    @staticmethod
    def _signal(slot: Slot, signum: int) -> None:
        """Signal the slot's process, if it runs (SIGTERM: a warm stop, its job ends first)."""
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
                         p.pid, slot.index, extra=_named(p.pid))
                continue
            if self.signals:
                log.info("worker process %s exited (%s)", p.pid, p.exitcode, extra=_named(p.pid))
                continue
            if slot.retiring:
                log.info("worker process %s retired (%d left)", p.pid,
                         sum(s.process is not None for s in self.slots), extra=_named(p.pid))
                self.slots.remove(slot)
                continue
            if (p.exitcode == EXIT_RECYCLE or slot.restart_now) and slot.ready:
                # It said goodbye after its last answer: nothing to vacate, no back-off.
                log.info("worker process %s %s; starting a fresh one", p.pid,
                         "recycled" if p.exitcode == EXIT_RECYCLE else "stopped to reload",
                         extra=_named(p.pid))
                slot.restart_at = now
                continue
            if self.cfg.reload and not slot.ready:
                # Broken code while developing: wait for the next change, do not give up.
                log.error("worker process failed to start: %s; waiting for a change",
                          failure or f"exit code {p.exitcode}")
                slot.restart_at = math.inf
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
                extra=_named(p.pid),
            )
        if dead and self.failure is None:
            self._vacate(dead)

    # ------------------------------------------------------------------ autoscaling
    def _scale(self, now: float) -> None:
        """Grow while every child is busy, retire one that has been idle long enough."""
        if now < self._next_scale:
            return
        window = now - (self._next_scale - SCALE_EVERY) if self._next_scale else SCALE_EVERY
        self._next_scale = now + SCALE_EVERY
        live = [s for s in self.slots if s.process is not None and not s.retiring]
        all_busy = bool(live)
        for slot in live:
            total = slot.busy_seconds(now)
            worked = total - slot.busy_seen
            slot.busy_seen = total
            if worked > 0 or slot.busy[1]:
                slot.last_busy = now
            if not slot.ready or worked < GROW_BUSY * min(window, SCALE_EVERY):
                all_busy = False
        size = len(live)
        if all_busy and size < self.high and not any(s.drained for s in self.slots):
            grow = min(self.high - size, max(1, size // 2))
            log.info("all %d worker processes busy: starting %d more", size, grow)
            for _ in range(grow):
                slot = self._new_slot()
                self.slots.append(slot)
                self._start(slot)
            return
        idle = [s for s in live if s.ready and now - s.last_busy >= self.cfg.scale_down_after]
        if idle and size > self.low:
            slot = min(idle, key=lambda s: s.last_busy)
            assert slot.process is not None and slot.process.pid is not None
            log.info("worker process %s idle for %.0fs: retiring it", slot.process.pid,
                     now - slot.last_busy, extra=_named(slot.process.pid))
            slot.retiring = True
            self._signal(slot, signal.SIGTERM)

    # ------------------------------------------------------------------ reload
    def _source_times(self) -> dict[str, float]:
        """Modification times of the Python files under the working directory."""
        times: dict[str, float] = {}
        stack = [Path.cwd()]
        while stack and len(times) < 20_000:
            try:
                entries = list(os.scandir(stack.pop()))
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name not in _NOT_SOURCE and not entry.name.startswith("."):
                            stack.append(Path(entry.path))
                    elif entry.name.endswith(".py"):
                        times[entry.path] = entry.stat().st_mtime
                except OSError:
                    continue
        return times

    def _check_sources(self, now: float) -> None:
        if now < self._next_scan:
            return
        self._next_scan = now + RELOAD_EVERY
        times = self._source_times()
        changed = sorted(p for p in times.keys() | self._sources.keys()
                         if times.get(p) != self._sources.get(p))
        self._sources = times
        if not changed:
            return
        log.info("%s changed: restarting the worker processes (each finishes its job first)",
                 os.path.relpath(changed[0]) + (f" and {len(changed) - 1} more" if len(changed) > 1
                                                else ""))
        for slot in self.slots:
            p = slot.process
            if p is None:
                slot.restart_at = now  # one that failed to start tries the new code
            elif p.pid is not None and not slot.retiring:
                slot.restart_now = True
                self._signal(slot, signal.SIGTERM)

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        self.wake.catch_signals()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for slot in self.slots:
            self._start(slot)
        forwarded = 0
        scaling = self.high > self.low
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
                if scaling:
                    self._scale(now)
                if self.cfg.reload:
                    self._check_sources(now)
            alive = [s for s in self.slots if s.process is not None]
            if not alive and (self.signals or all(s.drained for s in self.slots)):
                log.info("all worker processes stopped")
                return RET_START_FAILED if self.failure else 0
            waiting = [s.restart_at for s in self.slots
                       if s.process is None and not self.signals and not s.drained]
            if not self.signals:
                if scaling:
                    waiting.append(self._next_scale)
                if self.cfg.reload:
                    waiting.append(self._next_scan)
            timeout = max(0.0, min(waiting) - now) if waiting else None
            if timeout == math.inf:
                timeout = None
            handles: list[object] = [self.wake.fileno()]
            for s in alive:
                assert s.process is not None
                handles.append(s.process.sentinel)
                if s.report is not None and not s.ready:
                    handles.append(s.report)
            multiprocessing.connection.wait(handles, timeout)  # type: ignore[arg-type]
            self.wake.drain()


def run_pool(targets: Sequence[str], cfg: WorkerConfig, queues: tuple[str, ...]) -> int:
    """Entry point of ``rw worker`` (the targets have already been checked by the caller)."""
    pool = Pool(targets, cfg, queues)
    code = pool.run()
    if pool.failure:
        print(f"rw: {pool.failure}", file=sys.stderr)
    return code
