"""A job's life at ``debug`` level: one line per step, each with the job's id as a field.

The core calls these only when its ``_debug`` flag is set (computed once per heartbeat),
so with debug off the hot path pays one attribute test per step and builds nothing.
Every line carries ``job`` (and ``attempt``, ``worker``, ``queue``, ``reason`` where
they apply) as structured fields: ``--log-format json`` lines can be picked by job id.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .. import protocol
from ..logs import iso_time
from .model import DONE, Job

if TYPE_CHECKING:
    from .workers import WorkerRec

log = logging.getLogger("respworkers.broker.jobs")


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0][:300]


def accepted(job: Job, opts: protocol.Options) -> None:
    options = {k: v for k, v in opts._asdict().items() if v is not None}
    shown = "".join(f", {k} {v:g}" if isinstance(v, float) else f", {k} {v}"
                    for k, v in options.items())
    log.debug("job %s accepted: queue %s%s", job.id, job.queue, shown,
              extra={"job": job.id, "queue": job.queue, "options": options})


def dispatched(job: Job, w: WorkerRec) -> None:
    log.debug("job %s dispatched to worker %s (attempt %d of %d)", job.id, w.name,
              job.attempt, job.tries,
              extra={"job": job.id, "attempt": job.attempt, "worker": w.name, "queue": job.queue})


def claimed(job: Job, w: WorkerRec) -> None:
    log.debug("job %s claimed by worker %s, back with attempt %d in hand", job.id, w.name,
              job.attempt,
              extra={"job": job.id, "attempt": job.attempt, "worker": w.name, "queue": job.queue})


def retried(job: Job, w: WorkerRec | None, reason: str, delay: float, wall: float) -> None:
    fields = {"job": job.id, "attempt": job.attempt, "queue": job.queue, "reason": reason,
              "error": _first_line(job.error or "")}
    if w is not None:
        fields["worker"] = w.name
    if delay > 0:
        fields["retry_at"] = iso_time(wall + delay)
        when = f"in {delay:.3f}s, at {fields['retry_at']}"
    else:
        when = "at once"
    log.debug("job %s attempt %d of %d failed (%s: %s): retried %s", job.id, job.attempt,
              job.tries, reason, fields["error"], when, extra=fields)


def given_back(job: Job, w: WorkerRec) -> None:
    log.debug("job %s attempt %d given back by worker %s (no try charged)", job.id,
              job.attempt, w.name,
              extra={"job": job.id, "attempt": job.attempt, "worker": w.name, "queue": job.queue})


def ended(job: Job, reason: str, error: str, w: WorkerRec | None) -> None:
    """Done, failed, cancelled or expired: the job's state is already its end."""
    state = job.state.value
    fields = {"job": job.id, "attempt": job.attempt, "queue": job.queue, "state": state}
    if w is not None:
        fields["worker"] = w.name
    if job.state is DONE:
        log.debug("job %s done (attempt %d)", job.id, job.attempt, extra=fields)
        return
    fields["reason"] = reason
    fields["error"] = _first_line(error)
    log.debug("job %s %s (%s): %s", job.id, state, reason, fields["error"], extra=fields)


def abandoned(job_id: str, attempt: int, w: WorkerRec, why: str) -> None:
    log.debug("job %s attempt %d abandoned: worker %s told to stop (the job is %s)", job_id,
              attempt, w.name, why,
              extra={"job": job_id, "attempt": attempt, "worker": w.name, "reason": why})


def answer_dropped(job_id: str, attempt: int, w: WorkerRec, why: str) -> None:
    log.debug("job %s attempt %d: answer from worker %s dropped (%s)", job_id, attempt, w.name,
              why, extra={"job": job_id, "attempt": attempt, "worker": w.name, "reason": why})
