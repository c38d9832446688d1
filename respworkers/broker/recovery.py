"""A broker restart: rebuild the broker's state from its journal.

Its own module because it runs once, before serving, and touches every part of the core's
state (queues, timetable, retention, statistics) in ways no message does.
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import attrgetter
from typing import TYPE_CHECKING, Callable

from . import stats
from .model import DONE, ENDED, FAILED, QUEUED, RUNNING, SCHEDULED, Job
from .timetable import Due

if TYPE_CHECKING:
    from .core import BrokerCore

#: Rows loaded between two calls of ``progress`` (so a caller can answer pings meanwhile).
RESTORE_STEP = 5000


def restore(core: BrokerCore, stored: Iterable[Job],
            progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Rebuild state from the journal after a restart (before serving workers).

    Queued jobs queue again in their old order. A job that was running is held back
    for one heartbeat expiry so its worker can re-register and claim it; if none
    does, it runs again and the interrupted attempt does not count as a try.
    Ended jobs keep their outcome for WAIT and QUERY until retention ends. Paused
    queues stay paused. ``progress(rows so far)`` is called every RESTORE_STEP rows, so
    that a caller can answer pings while a large journal loads.
    """
    queued = interrupted = scheduled = 0
    ended: list[Job] = []
    for name in core.journal.paused_queues():  # before any job is queued: none is handed out
        core.queues.set_paused(name, True)
    core.start_recovery()
    # A million rows pass through this loop: what it uses is bound to locals.
    jobs, queues, timetable = core.jobs, core.queues, core.timetable
    push, last_seq = queues.push, core._seq
    for n, job in enumerate(stored, 1):
        if progress is not None and not n % RESTORE_STEP:
            progress(n)
        jobs[job.id] = job
        if job.seq > last_seq:
            last_seq = job.seq
        state = job.state
        if state in ENDED:
            if state is DONE:
                job.payload = None
            ended.append(job)
            continue
        if job.payload is None:
            job.payload = [b""]
        if job.expires_at and not job.started:  # a job that started in time may finish
            timetable.add(job.expires_at, Due.EXPIRE, job)
        if state is RUNNING:
            job.attempt = max(0, job.attempt - 1)
            job.state = QUEUED
            queues.hold(job)
            interrupted += 1
        elif state is SCHEDULED:
            queues.schedule(job)
            timetable.add(job.not_before, Due.RUN, job)
            scheduled += 1
        else:
            push(job, bool(job.tried))
            if job.tried:
                core.wait_for_untried(job)
            queued += 1
    core._seq = last_seq
    ended.sort(key=attrgetter("finished"))
    core.finished.update((job.id, job) for job in ended)
    # the snapshot's recent failures survive a restart
    for job in [job for job in ended if job.state is FAILED][-stats.RECENT_FAILURES:]:
        core.stats.failed(job)
    return {"queued": queued, "interrupted": interrupted, "scheduled": scheduled,
            "finished": len(ended)}
