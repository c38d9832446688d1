"""What operators ask of the broker beyond one job: list jobs, run failed ones again, empty a
queue, pause and resume a queue, drain workers. Each request does a bounded amount of work,
so none holds up the loop: a long listing or a big purge is continued by asking again;
resuming a queue and draining look at the registered workers once.
"""

from __future__ import annotations

from itertools import islice
from typing import TYPE_CHECKING, Any

from .. import protocol
from .model import DONE, REQUEUABLE, Job, JobState

if TYPE_CHECKING:
    from .core import BrokerCore
    from .workers import WorkerRec

#: Jobs one JOBS request looks at (then it answers with a cursor to go on from).
SCAN_PER_PAGE = 50_000
#: Most jobs one JOBS answer lists.
MAX_PAGE = 1000
#: Jobs one PURGE request cancels (then it says how many are left).
PURGE_STEP = 10_000
#: Most queues paused at once (each is a name in memory and a row in the journal).
MAX_PAUSED = 10_000

_STATES = {s.value for s in JobState}


def row(job: Job, now_wall: float) -> dict[str, Any]:
    """One job in a listing: what `rw jobs` shows."""
    summary = "" if job.state is DONE else (job.error or "").strip().split("\n", 1)[0]
    return {"id": job.id, "queue": job.queue, "state": job.state.value, "attempt": job.attempt,
            "tries": job.tries, "priority": job.priority, "tenant": job.tenant or None,
            "age": round(now_wall - job.created, 3), "error": summary[:200] or None}


def list_jobs(core: BrokerCore, query: dict[str, Any]) -> dict[str, Any]:
    """A page of jobs, newest first, filtered by state and queue; ``cursor`` continues it."""
    state = query.get("state")
    queue = query.get("queue")
    limit = query.get("limit", 100)
    cursor = query.get("cursor", 0)
    problem = None
    if state is not None and state not in _STATES:
        problem = f"state must be one of {', '.join(sorted(_STATES))}"
    elif queue is not None and not isinstance(queue, str):
        problem = "queue must be a name"
    elif isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        problem = f"limit must be 1..{MAX_PAGE}"
    elif isinstance(cursor, bool) or not isinstance(cursor, int) or cursor < 0:
        problem = "cursor must be a whole number"
    if problem:
        return {"jobs": [], "cursor": None, "scanned": 0, "error": problem}
    found: list[dict[str, Any]] = []
    scanned = 0
    wall = core.wall
    for job in islice(reversed(core.jobs.values()), cursor, cursor + SCAN_PER_PAGE):
        scanned += 1
        if (state is None or job.state.value == state) and (queue is None or job.queue == queue):
            found.append(row(job, wall))
            if len(found) >= limit:
                break
    done = cursor + scanned >= len(core.jobs) or (scanned < SCAN_PER_PAGE and len(found) < limit)
    return {"jobs": found, "cursor": None if done else cursor + scanned, "scanned": scanned}


def requeue(core: BrokerCore, job_ids: list[str]) -> dict[str, Any]:
    """Run ended jobs (failed, cancelled, expired) again under the same ids, with a fresh set
    of tries; their earlier outcome goes into their history."""
    requeued: list[str] = []
    unknown: list[str] = []
    skipped: dict[str, str] = {}
    cfg = core.cfg
    for job_id in job_ids:
        job = core.jobs.get(job_id)
        if job is None:
            unknown.append(job_id)
            continue
        if job.state not in REQUEUABLE:
            skipped[job_id] = job.state.value
            continue
        if job.payload is None:  # ended before payloads were kept for requeueing
            skipped[job_id] = "payload not kept"
            continue
        if len(core.jobs) - len(core.finished) >= cfg.max_queued:
            skipped[job_id] = "broker full"
            continue
        if core.commits.problem is not None:
            skipped[job_id] = f"journal unavailable: {core.commits.problem}"
            continue
        summary = "" if job.state is DONE else (job.error or "").strip().split("\n", 1)[0][:500]
        history = job.history or []
        history.append({"state": job.state.value, "reason": job.reason or None,
                        "error": summary or None, "attempts": job.attempt,
                        "finished": job.finished})
        job.history = history
        core.finished.pop(job.id, None)
        job.attempt = 0
        job.tried = ()
        job.tokens = None
        job.result = None
        job.reason = job.error = ""
        job.finished = 0.0
        job.progress = None
        job.expires_at = 0.0  # a requeued job runs whatever its old expiry said
        core.counters.requeued += 1
        requeued.append(job_id)
        core.journal.attempted(job)
        core.requeued(job)
    return {"requeued": requeued, "unknown": unknown, "skipped": skipped}


def purge(core: BrokerCore, queue: str) -> tuple[int, int]:
    """Cancel the jobs waiting in a queue (queued and scheduled), at most PURGE_STEP per
    request; return (cancelled now, still waiting)."""
    q = core.queues.get(queue)
    if q is None:
        return 0, 0
    waiting: list[Job] = list(islice(q.scheduled.values(), PURGE_STEP))
    for level in q.levels.values():
        for lane in (level.retries, *level.tenants.values()):
            waiting.extend(islice(lane.waiting(), PURGE_STEP - len(waiting)))
            if len(waiting) >= PURGE_STEP:
                break
    for job in waiting[:PURGE_STEP]:
        core.cancel(job)  # each is queued or scheduled: collected before any was cancelled
    q = core.queues.get(queue)
    left = q.depth + len(q.scheduled) if q is not None else 0
    return min(len(waiting), PURGE_STEP), left


def pause(core: BrokerCore, queue: str) -> tuple[int, bool]:
    """Hand out nothing from ``queue`` until it is resumed: it still takes jobs, scheduled
    ones still become queued at their time, expiries still apply, running jobs finish.
    A queue nobody uses yet may be paused. Returns (jobs queued in it, whether it changed)."""
    changed = core.queues.set_paused(queue, True)
    if changed:
        core.journal.queue_paused(queue, True)
    q = core.queues.get(queue)
    return (q.depth if q is not None else 0), changed


def resume(core: BrokerCore, queue: str) -> tuple[int, int, bool]:
    """Hand out ``queue``'s jobs again, at once to its idle workers (one look at each; none
    if it was not paused: they had their chance). Returns (jobs dispatched now, jobs still
    queued, whether it changed)."""
    changed = core.queues.set_paused(queue, False)
    if changed:
        core.journal.queue_paused(queue, False)
    dispatched = 0
    q = core.queues.get(queue)
    if changed and q is not None and q.depth:
        for w in list(q.ready.values()):
            if w.ready and w.alive(core.now) and core.offer_work(w):
                dispatched += 1
            q = core.queues.get(queue)
            if q is None or not q.depth:
                break
    return dispatched, (q.depth if q is not None else 0), changed


def drain(core: BrokerCore, req: protocol.Drain) -> dict[str, Any]:
    """Tell the workers named (by name, by host, or all) to finish their job and leave.
    One look at the registered workers; unknown names and hosts are reported."""
    records = core.workers.records
    chosen: dict[bytes, WorkerRec] = dict(records) if req.everyone else {}
    unknown: list[str] = []
    for name in req.workers:
        same = core.workers.by_name.get(name)
        if same:
            chosen.update((w.wid, w) for w in same)
        else:
            unknown.append(name)
    if req.hosts:
        by_host: dict[str, list[WorkerRec]] = {}
        for w in records.values():
            host = w.info.get("host")
            if isinstance(host, str):
                by_host.setdefault(host, []).append(w)
        for host in req.hosts:
            if host in by_host:
                chosen.update((w.wid, w) for w in by_host[host])
            else:
                unknown.append(host)
    asked = []
    for w in chosen.values():
        core.drain_worker(w)
        asked.append({"name": w.name, "job": w.job_id})
    return {"asked": asked, "unknown": unknown}
