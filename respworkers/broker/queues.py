"""Named queues: per queue its jobs in the order they are handed out, its idle workers, and
how many workers serve it.

One record per queue, as the ZeroMQ guide's Majordomo keeps one ``Service(requests,
waiting)``. Within a queue, jobs wait by priority (9 first, 0 last). Within a priority,
retries and given-back jobs wait in a lane of their own, served first (they keep the
place at the head they had); new jobs wait in one lane per tenant, and the tenants take
turns (round robin, or ``weight`` jobs in a row), FIFO within a tenant: a tenant that
submits a million jobs does not make another tenant's ten wait behind them.

Every step is O(1) in the number of jobs: taking a job out of the middle of a lane
(cancelled, answered late, claimed) only bumps the job's ``qtoken``, which makes its
entry stale, and stale entries are dropped when they reach the head; a tenant whose lane
is empty leaves the turn when its turn comes. Jobs that were running when the previous
broker stopped are *held* apart for a while, so their workers can claim them.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Callable

from .model import Job

if TYPE_CHECKING:
    from .workers import WorkerRec

PRIORITIES = range(9, -1, -1)  # highest first


class Lane:
    """A FIFO of ``(qtoken, job)`` entries, some stale; ``live`` counts the others."""

    __slots__ = ("entries", "live", "tenant")

    def __init__(self, tenant: str | None) -> None:
        self.entries: deque[tuple[int, Job]] = deque()
        self.live = 0
        self.tenant = tenant  # None for the retries lane

    def head(self) -> Job | None:
        entries = self.entries
        while entries:
            token, job = entries[0]
            if job.qtoken == token:
                return job
            entries.popleft()
        return None


class Level:
    """The jobs of one priority within a queue."""

    __slots__ = ("retries", "tenants", "turns", "credit", "depth")

    def __init__(self) -> None:
        self.retries = Lane(None)
        self.tenants: dict[str, Lane] = {}
        self.turns: deque[str] = deque()  # tenants with jobs, in turn (some may have emptied)
        self.credit = 0  # jobs the tenant whose turn it is may still take in a row
        self.depth = 0

    def head(self, weight: Callable[[str], int]) -> Job | None:
        """The job this level hands out next: a retry, else the tenant whose turn it is."""
        job = self.retries.head()
        if job is not None:
            return job
        turns, tenants = self.turns, self.tenants
        while turns:
            lane = tenants.get(turns[0])
            job = lane.head() if lane is not None else None
            if job is not None:
                if self.credit <= 0:
                    self.credit = weight(turns[0])
                return job
            # Its lane emptied (cancelled, claimed): it leaves the turn until it has jobs.
            tenants.pop(turns.popleft(), None)
            self.credit = 0
        return None


class Queue:
    __slots__ = ("name", "levels", "depth", "ready", "serving", "scheduled")

    def __init__(self, name: str) -> None:
        self.name = name
        self.levels: dict[int, Level] = {}
        self.depth = 0  # live entries, all levels
        self.ready: dict[bytes, WorkerRec] = {}  # idle workers, longest idle first
        self.serving = 0  # registered workers serving this queue
        self.scheduled: dict[str, Job] = {}  # waiting for their time (delay, eta, backoff)

    def head(self, weight: Callable[[str], int]) -> Job | None:
        """The job handed out next: highest priority first (then as its level says)."""
        if not self.depth:
            return None
        for priority in PRIORITIES:
            level = self.levels.get(priority)
            if level is not None and level.depth:
                job = level.head(weight)
                if job is not None:
                    return job
        return None

    def retry_for(self, name: str, scan: int) -> Job | None:
        """Work a worker that already tried the head retry may take instead: another retry it
        has not tried (a bounded look), else the next new job; by priority."""
        for priority in PRIORITIES:
            level = self.levels.get(priority)
            if level is None or not level.depth:
                continue
            for i, (token, job) in enumerate(level.retries.entries):
                if job.qtoken == token and name not in job.tried:
                    return job
                if i >= scan:
                    break
            turns, tenants = level.turns, level.tenants
            for tenant in turns:
                lane = tenants.get(tenant)
                fresh = lane.head() if lane is not None else None
                if fresh is not None:
                    return fresh
        return None

    def waiting_per_tenant(self) -> dict[str, int]:
        """For the snapshot: jobs waiting per tenant (retries counted under their tenant)."""
        out: dict[str, int] = {}
        for level in self.levels.values():
            for tenant, lane in level.tenants.items():
                if lane.live:
                    out[tenant] = out.get(tenant, 0) + lane.live
            for token, job in level.retries.entries:
                if job.qtoken == token:
                    out[job.tenant] = out.get(job.tenant, 0) + 1
        return out

    def oldest(self, weight: Callable[[str], int]) -> float | None:
        """Submission time of the oldest job waiting here (lane heads only: lanes are FIFO)."""
        created = [job.created for level in self.levels.values()
                   for lane in (level.retries, *level.tenants.values())
                   if (job := lane.head()) is not None]
        return min(created) if created else None


class Queues:
    """Every queue that has jobs waiting or scheduled, idle workers or workers serving it."""

    def __init__(self, weights: dict[str, int] | None = None) -> None:
        self.by_name: dict[str, Queue] = {}
        self.held: dict[str, Job] = {}  # running at the previous broker's end: claimable
        self.release_at = 0.0  # when held jobs queue again
        self._weights = weights or {}
        self.weight: Callable[[str], int] = lambda tenant: self._weights.get(tenant, 1)

    def get(self, name: str) -> Queue | None:
        return self.by_name.get(name)

    def require(self, name: str) -> Queue:
        q = self.by_name.get(name)
        if q is None:
            q = self.by_name[name] = Queue(name)
        return q

    def forget_if_unused(self, q: Queue) -> None:
        if not (q.depth or q.ready or q.serving or q.scheduled):
            del self.by_name[q.name]

    def push(self, job: Job, front: bool) -> None:
        """Queue a job: a retry or a give-back (``front``) first in its priority's retry
        lane, a new job last in its tenant's lane."""
        q = self.require(job.queue)
        level = q.levels.get(job.priority)
        if level is None:
            level = q.levels[job.priority] = Level()
        job.qtoken += 1
        lane: Lane | None
        if front:
            lane = level.retries
            lane.entries.appendleft((job.qtoken, job))
        else:
            lane = level.tenants.get(job.tenant)
            if lane is None:
                lane = level.tenants[job.tenant] = Lane(job.tenant)
                level.turns.append(job.tenant)
            lane.entries.append((job.qtoken, job))
        lane.live += 1
        job.lane = lane
        level.depth += 1
        q.depth += 1

    def remove(self, job: Job) -> None:
        """Take a queued (or held) job out, wherever it is: O(1)."""
        if self.held.pop(job.id, None) is not None:
            return
        job.qtoken += 1  # its entry is stale from now on
        lane: Lane = job.lane
        job.lane = None
        lane.live -= 1
        if not lane.live:
            lane.entries.clear()  # nothing live left: drop the stale entries at once
        q = self.by_name[job.queue]
        q.levels[job.priority].depth -= 1
        q.depth -= 1
        if not q.depth:
            q.levels.clear()
            self.forget_if_unused(q)

    def taken(self, job: Job) -> None:
        """The job at a level's head was handed out: the tenant's turn may pass."""
        lane: Lane = job.lane
        self.remove(job)
        if lane.tenant is None:
            return
        q = self.by_name.get(job.queue)
        level = q.levels.get(job.priority) if q is not None else None
        if level is None or not level.turns or level.turns[0] != lane.tenant:
            return
        level.credit -= 1
        if level.credit <= 0 or not lane.live:
            level.turns.rotate(-1)  # next tenant's turn; an empty lane leaves at its turn
            level.credit = 0

    def schedule(self, job: Job) -> None:
        self.require(job.queue).scheduled[job.id] = job

    def unschedule(self, job: Job) -> None:
        q = self.by_name.get(job.queue)
        if q is not None and q.scheduled.pop(job.id, None) is not None:
            self.forget_if_unused(q)

    def hold(self, job: Job) -> None:
        self.held[job.id] = job

    def release_held(self) -> list[Job]:
        """Held jobs nobody claimed, oldest first (they were running: they go first)."""
        jobs = sorted(self.held.values(), key=lambda j: j.seq)
        self.held.clear()
        return jobs

    def waiting(self) -> int:
        """Jobs queued in all queues, held ones included."""
        return sum(q.depth for q in self.by_name.values()) + len(self.held)

    def scheduled(self) -> int:
        return sum(len(q.scheduled) for q in self.by_name.values())
