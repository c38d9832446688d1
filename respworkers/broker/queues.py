"""Named queues: per queue its jobs in order, its idle workers, and how many workers serve it.

One record per queue, as the ZeroMQ guide's Majordomo keeps one ``Service(requests,
waiting)``. Taking a job out of the middle of a queue (cancelled, answered late, claimed
by a worker) is O(1): it only bumps the job's ``qtoken``, which makes its entry stale, and
stale entries are dropped when they reach the head. Jobs that were running when the
previous broker stopped are *held* apart for a while, so their workers can claim them.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from .model import Job

if TYPE_CHECKING:
    from .workers import WorkerRec


class Queue:
    __slots__ = ("name", "entries", "depth", "ready", "serving")

    def __init__(self, name: str) -> None:
        self.name = name
        self.entries: deque[tuple[int, Job]] = deque()  # (qtoken, job), oldest first; some stale
        self.depth = 0  # live entries
        self.ready: dict[bytes, WorkerRec] = {}  # idle workers, longest idle first
        self.serving = 0  # registered workers serving this queue

    def head(self) -> Job | None:
        """The oldest live job, dropping stale entries on the way."""
        entries = self.entries
        while entries:
            token, job = entries[0]
            if job.qtoken == token:
                return job
            entries.popleft()
        return None

    def after_head(self, scan: int, skip: Job) -> Job | None:
        """A live job other than ``skip`` among the first ``scan`` entries, if any."""
        for i, (token, job) in enumerate(self.entries):
            if job is not skip and job.qtoken == token:
                return job
            if i >= scan:
                break
        return None


class Queues:
    """Every queue that has jobs waiting, idle workers or workers serving it."""

    def __init__(self) -> None:
        self.by_name: dict[str, Queue] = {}
        self.held: dict[str, Job] = {}  # running at the previous broker's end: claimable
        self.release_at = 0.0  # when held jobs queue again

    def get(self, name: str) -> Queue | None:
        return self.by_name.get(name)

    def require(self, name: str) -> Queue:
        q = self.by_name.get(name)
        if q is None:
            q = self.by_name[name] = Queue(name)
        return q

    def forget_if_unused(self, q: Queue) -> None:
        if not (q.depth or q.ready or q.serving):
            del self.by_name[q.name]

    def push(self, job: Job, front: bool) -> None:
        q = self.require(job.queue)
        job.qtoken += 1
        if front:
            q.entries.appendleft((job.qtoken, job))
        else:
            q.entries.append((job.qtoken, job))
        q.depth += 1

    def remove(self, job: Job) -> None:
        """Take a queued (or held) job out, wherever it is: O(1)."""
        if self.held.pop(job.id, None) is not None:
            return
        job.qtoken += 1  # its entry is stale from now on
        q = self.by_name[job.queue]
        q.depth -= 1
        if not q.depth:
            q.entries.clear()  # nothing live left: drop the stale entries at once
            self.forget_if_unused(q)

    def hold(self, job: Job) -> None:
        self.held[job.id] = job

    def release_held(self) -> list[Job]:
        """Held jobs nobody claimed, oldest first (they were running: they go first)."""
        jobs = sorted(self.held.values(), key=lambda j: j.seq)
        self.held.clear()
        return jobs

    def waiting(self) -> int:
        """Jobs waiting in all queues, held ones included."""
        return sum(q.depth for q in self.by_name.values()) + len(self.held)
