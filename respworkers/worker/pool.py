"""``rw worker``: supervise N worker processes, restart the ones that die, stop them warmly.

Each child runs in its own process group, so a Ctrl-C in the terminal reaches
only this parent, which forwards one SIGTERM per signal it receives: the first
asks every child to finish its job and leave, the second makes them hand their
jobs back at once. A child restarted after a crash takes over its slot, which
tells the broker to re-dispatch the dead child's job immediately.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from types import FrameType

from ..config import WorkerConfig
from ..targets import import_target

log = logging.getLogger(__name__)

#: A child that dies sooner than this after starting is restarted with a growing delay.
QUICK_DEATH = 2.0
MAX_BACKOFF = 30.0


def _child_main(
    target: str, cfg: WorkerConfig, queues: tuple[str, ...], slot: str, parent: int, level: int
) -> None:
    os.setpgrp()  # leave the terminal's process group: Ctrl-C goes to the parent only
    from .runner import Runner

    logging.getLogger().setLevel(level)  # handlers come from the parent (fork) or default
    runner = Runner(import_target(target), cfg, queues, slot=slot, parent_pid=parent)
    runner.install_signal_handlers()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    sys.exit(runner.run())


@dataclass
class Slot:
    index: int
    process: multiprocessing.process.BaseProcess | None = None
    started: float = 0.0
    restart_at: float = 0.0
    backoff: float = 0.5


class Pool:
    def __init__(self, target: str, cfg: WorkerConfig, queues: tuple[str, ...]) -> None:
        self.target = target
        self.cfg = cfg
        self.queues = queues
        self.signals = 0
        self.slots = [Slot(i) for i in range(cfg.processes)]
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self.mp = multiprocessing.get_context(method)
        self.slot_prefix = f"{socket.gethostname()}:{os.getpid()}"
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1

    def _start(self, slot: Slot) -> None:
        # Children inherit blocked signals and unblock them once their handlers are in place.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            p = self.mp.Process(
                target=_child_main,
                args=(self.target, self.cfg, self.queues, f"{self.slot_prefix}:{slot.index}",
                      os.getpid(), logging.getLogger().getEffectiveLevel()),
                name=f"rw-worker-{slot.index}",
                daemon=False,
            )
            p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
        slot.process = p
        slot.started = time.monotonic()
        log.info("started worker process %s in slot %d", p.pid, slot.index)

    def _signal_children(self) -> None:
        for slot in self.slots:
            p = slot.process
            if p is not None and p.pid is not None and p.exitcode is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def run(self) -> int:
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for slot in self.slots:
            self._start(slot)
        forwarded = 0
        import select

        while True:
            while self.signals > forwarded:  # one SIGTERM to each child per signal received
                if forwarded == 0:
                    log.info("stopping: each worker finishes its job in hand (signal again to force)")
                else:
                    log.warning("forcing: workers hand their jobs back to the broker")
                forwarded += 1
                self._signal_children()
            alive = 0
            now = time.monotonic()
            for slot in self.slots:
                p = slot.process
                if p is not None and p.exitcode is None:
                    alive += 1
                    continue
                if p is not None:  # it just ended
                    p.join()
                    slot.process = None
                    if self.signals:
                        log.info("worker process %s exited (%s)", p.pid, p.exitcode)
                        continue
                    lived = now - slot.started
                    slot.backoff = min(MAX_BACKOFF, slot.backoff * 2) if lived < QUICK_DEATH else 0.5
                    slot.restart_at = now + (slot.backoff if lived < QUICK_DEATH else 0.0)
                    log.warning(
                        "worker process %s in slot %d exited with %s after %.1fs; restarting%s",
                        p.pid, slot.index, p.exitcode, lived,
                        f" in {slot.backoff:.1f}s" if lived < QUICK_DEATH else "",
                    )
                if not self.signals and now >= slot.restart_at:
                    self._start(slot)
                    alive += 1
                elif not self.signals:
                    alive += 1  # waiting for its backoff
            if self.signals and alive == 0:
                log.info("all worker processes stopped")
                return 0
            try:
                select.select([self._wake_r], [], [], 0.2)
                os.read(self._wake_r, 4096)
            except (BlockingIOError, InterruptedError):
                pass


def run_pool(target: str, cfg: WorkerConfig, queues: tuple[str, ...]) -> int:
    """Entry point of ``rw worker`` (the target has already been checked by the caller)."""
    return Pool(target, cfg, queues).run()
