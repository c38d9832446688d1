"""What happens with time rather than messages: held jobs released after a restart, the
timetable (delays, expiries, retries to offer), attempt deadlines, heartbeats, silent
workers dropped, and retention of finished jobs."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from .. import protocol
from . import trace
from .model import (
    QUEUED,
    RUNNING,
    SCHEDULED,
    WAITING,
)
from .timetable import Due

if TYPE_CHECKING:
    from .core import BrokerCore

log = logging.getLogger("respworkers.broker.core")


def tick(core: BrokerCore) -> float:
    """Release held jobs, run what the timetable says is due, expire attempts and silent
    workers, beat; return when to tick next."""
    now, wall = core.now, core.wall
    queues = core.queues
    if queues.held and now >= queues.release_at:
        # Nobody claimed them: they were running, so they go first, oldest first.
        for job in reversed(queues.release_held()):
            core._enqueue(job, front=True)
    if core.timetable.next <= wall:
        for what, job in core.timetable.due(wall):
            if what is Due.RUN:
                if job.state is SCHEDULED and job.not_before <= wall:
                    queues.unschedule(job)
                    job.not_before = 0.0
                    core._enqueue(job, front=bool(job.tried))
            elif what is Due.EXPIRE:
                if job.state in WAITING:
                    core._expired(job)
                elif core.unstarted(job):  # prefetched, not started: it expires all the same
                    core.uncharge(job)
                    core._expire(job)
            elif job.state is QUEUED and job.retry_since:  # Due.OFFER
                core._offer(job)
    for job in core.deadlines.due(now):
        if job.state is RUNNING and job.deadline <= now:
            holder = job.worker
            core.attempt_failed(
                job, protocol.FAIL_TIMEOUT,
                f"no answer within {job.timeout:g}s (attempt {job.attempt} of {job.tries}"
                f" on {holder.name if holder else '?'})", holder)
    if now >= core._next_beat:
        core._next_beat = now + core.cfg.heartbeat
        heartbeat(core, now)
    return next_wake(core)


def next_wake(core: BrokerCore) -> float:
    """When :meth:`tick` is due: heartbeat, earliest deadline, commit, timetable, held jobs."""
    wake = min(core._next_beat, core.deadlines.earliest, core.commits.due)
    due = core.timetable.next
    if due != math.inf:
        wake = min(wake, core.now + max(0.0, due - core.wall))
    if core.queues.held and core.queues.release_at < wake:
        wake = core.queues.release_at
    return wake


def heartbeat(core: BrokerCore, now: float) -> None:
    core._debug = trace.log.isEnabledFor(logging.DEBUG)  # the level may have changed
    dead = core.workers.silent(now)
    for w in dead:  # first, so no job of a dead worker is handed to another dead one
        core.workers.unready(w)
    for w in dead:
        core.counters.lost_workers += 1
        log.warning("worker %s silent for %.1fs: dropping it", w.name, now - w.last_seen,
                    extra={"worker": w.name, "job": w.job_id, "attempt": w.attempt or None})
        core.drop_worker(w, "stopped answering")
    beat = protocol.HEARTBEAT_FRAMES
    for wid, w in core.workers.records.items():
        if not core.send_owed_ack(w):  # an ACK says the broker is alive as a HEARTBEAT does
            core.send_worker(wid, beat)
    expire_finished(core)
    core.journal.check()
    core.stats.sample(now)


def expire_finished(core: BrokerCore) -> None:
    horizon = core.wall - core.cfg.retention
    limit = core.cfg.max_retained
    finished = core.finished
    while finished:
        job = next(iter(finished.values()))
        if job.finished > horizon and len(finished) <= limit:
            break
        finished.popitem(last=False)
        if core.jobs.get(job.id) is job:
            del core.jobs[job.id]
        core.journal.forget(job)
