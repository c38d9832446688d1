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

A *paused* queue (``rw pause``) keeps taking and holding jobs but hands none out. Whether a
queue is paused is kept by name (a queue record exists only while it is in use) and
mirrored in its record's ``paused``, so the dispatch paths check one attribute.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .model import Job

if TYPE_CHECKING:
    from .workers import WorkerRec

class Lane:
    """A FIFO of entries, some stale: entry i is ``jobs[i]``, put there when its ``qtoken``
    was ``tokens[i]``, and live while it still is; ``live`` counts the live ones. Two
    parallel deques rather than one of pairs: 16 bytes an entry instead of 72 (a pair and
    its slot), for each of possibly millions of queued jobs."""

    __slots__ = ("jobs", "tokens", "live", "tenant", "level")

    def __init__(self, tenant: str | None, level: Level) -> None:
        self.jobs: deque[Job] = deque()
        self.tokens: deque[int] = deque()
        self.live = 0
        self.tenant = tenant  # None for the retries lane
        self.level = level  # so that taking a job out needs no lookups

    def head(self) -> Job | None:
        jobs, tokens = self.jobs, self.tokens
        while jobs:
            job = jobs[0]
            if job.qtoken == tokens[0]:
                return job
            jobs.popleft()
            tokens.popleft()
        return None

    def waiting(self) -> Iterator[Job]:
        """The jobs of the live entries, in order."""
        return (job for job, token in zip(self.jobs, self.tokens) if job.qtoken == token)


class Level:
    """The jobs of one priority within a queue: a retry lane, then the tenants' lanes in
    turn. A tenant's lane is in ``tenants`` exactly while it is in ``turns``; one that
    empties leaves both when its turn comes."""

    __slots__ = ("priority", "queue", "retries", "tenants", "turns", "credit", "depth")

    def __init__(self, queue: Queue, priority: int) -> None:
        self.priority = priority
        self.queue = queue
        self.retries = Lane(None, self)
        self.tenants: dict[str, Lane] = {}
        self.turns: deque[Lane] = deque()  # the tenants' lanes, whose turn it is first
        self.credit = 0  # jobs the tenant whose turn it is may still take (0: its turn begins)
        self.depth = 0

    def head(self) -> Job | None:
        """The job this level hands out next: a retry, else the tenant whose turn it is."""
        if self.retries.live:
            return self.retries.head()
        turns = self.turns
        while turns:
            lane = turns[0]
            if lane.live:
                job = lane.jobs[0]
                return job if job.qtoken == lane.tokens[0] else lane.head()
            # Its lane emptied (cancelled, claimed): it leaves the turn until it has jobs.
            turns.popleft()
            del self.tenants[lane.tenant]  # type: ignore[arg-type]
            self.credit = 0
        return None


class Queue:
    __slots__ = ("name", "levels", "order", "depth", "ready", "serving", "scheduled", "paused")

    def __init__(self, name: str, paused: bool = False) -> None:
        self.name = name
        self.levels: dict[int, Level] = {}
        self.order: list[Level] = []  # the levels, highest priority first
        self.depth = 0  # live entries, all levels
        self.ready: dict[bytes, WorkerRec] = {}  # idle workers, longest idle first
        self.serving = 0  # registered workers serving this queue
        self.scheduled: dict[str, Job] = {}  # waiting for their time (delay, eta, backoff)
        self.paused = paused  # nothing is handed out while set (rw pause)

    def head(self) -> Job | None:
        """The job handed out next: highest priority first (then as its level says)."""
        if self.depth:
            for level in self.order:
                if level.depth:
                    return level.head()
        return None

    def level(self, priority: int) -> Level:
        level = self.levels.get(priority)
        if level is None:
            level = self.levels[priority] = Level(self, priority)
            self.order.append(level)
            self.order.sort(key=lambda lv: -lv.priority)
        return level

    def retry_for(self, name: str, scan: int) -> Job | None:
        """Work a worker that already tried the head retry may take instead: another retry it
        has not tried (a bounded look), else the next new job; by priority."""
        for level in self.order:
            if not level.depth:
                continue
            retries = level.retries
            for i, (job, token) in enumerate(zip(retries.jobs, retries.tokens)):
                if job.qtoken == token and name not in job.tried:
                    return job
                if i >= scan:
                    break
            for lane in level.turns:
                fresh = lane.head()
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
            for job in level.retries.waiting():
                out[job.tenant] = out.get(job.tenant, 0) + 1
        return out

    def oldest(self) -> float | None:
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
        self._weights = weights or {}  # jobs per turn, by tenant (1 if not named)
        self.paused: set[str] = set()  # names of the paused queues, used or not

    def get(self, name: str) -> Queue | None:
        return self.by_name.get(name)

    def require(self, name: str) -> Queue:
        q = self.by_name.get(name)
        if q is None:
            q = self.by_name[name] = Queue(name, name in self.paused)
        return q

    def set_paused(self, name: str, paused: bool) -> bool:
        """Pause (hand out nothing from) or resume a queue; False if it already was so."""
        if (name in self.paused) == paused:
            return False
        if paused:
            self.paused.add(name)
        else:
            self.paused.discard(name)
        q = self.by_name.get(name)
        if q is not None:
            q.paused = paused
        return True

    def forget_if_unused(self, q: Queue) -> None:
        if not (q.depth or q.ready or q.serving or q.scheduled):
            del self.by_name[q.name]

    def push(self, job: Job, front: bool) -> None:
        """Queue a job: a retry or a give-back (``front``) first in its priority's retry
        lane, a new job last in its tenant's lane."""
        q = self.by_name.get(job.queue) or self.require(job.queue)
        level = q.levels.get(job.priority) or q.level(job.priority)
        job.qtoken += 1
        lane: Lane | None
        if front:
            lane = level.retries
            lane.jobs.appendleft(job)
            lane.tokens.appendleft(job.qtoken)
        else:
            lane = level.tenants.get(job.tenant)
            if lane is None:
                lane = level.tenants[job.tenant] = Lane(job.tenant, level)
                level.turns.append(lane)
            lane.jobs.append(job)
            lane.tokens.append(job.qtoken)
        lane.live += 1
        job.lane = lane
        level.depth += 1
        q.depth += 1

    def remove(self, job: Job) -> None:
        """Take a queued (or held) job out, wherever it is: O(1)."""
        if self.held and self.held.pop(job.id, None) is not None:
            return
        job.qtoken += 1  # its entry is stale from now on
        lane: Lane = job.lane
        job.lane = None
        lane.live -= 1
        jobs = lane.jobs
        if not lane.live:
            jobs.clear()  # nothing live left: drop the stale entries at once
            lane.tokens.clear()
        elif jobs[0] is job:  # at the head (a job handed out nearly always is)
            jobs.popleft()
            lane.tokens.popleft()
        level = lane.level
        level.depth -= 1
        q = level.queue
        q.depth -= 1
        if not q.depth:
            q.levels.clear()
            q.order.clear()
            self.forget_if_unused(q)

    def taken(self, job: Job) -> None:
        """The job at a level's head was handed out: the tenant's turn may pass."""
        lane: Lane = job.lane
        self.remove(job)
        turns = lane.level.turns
        if len(turns) > 1 and turns[0] is lane:  # not a retry, nor a tenant alone
            self._turn_taken(lane)

    def _turn_taken(self, lane: Lane) -> None:
        level = lane.level
        if level.credit <= 0:  # its turn begins
            level.credit = self._weights.get(lane.tenant, 1)  # type: ignore[arg-type]
        level.credit -= 1
        if level.credit <= 0 or not lane.live:
            level.turns.rotate(-1)  # the next tenant's turn; an empty lane leaves at its turn
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
