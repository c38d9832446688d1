"""What must happen to a job at a given time: run (a delay, an eta, a retry's backoff),
be offered to any worker (a retry waited long enough for one that had not tried it), or
expire. One heap, O(log n) per entry; entries are not removed when a job changes, they
are checked when they come due (the job says whether the entry still applies).

Times are wall-clock (epoch seconds): they are journaled and outlive the broker.
"""

from __future__ import annotations

import heapq
import itertools
import math
from enum import IntEnum

from .model import Job


class Due(IntEnum):
    RUN = 0  #: a scheduled job may run: it queues
    OFFER = 1  #: a waiting retry may now go to a worker that has tried it
    EXPIRE = 2  #: not started yet: it ends expired


class Timetable:
    __slots__ = ("_heap", "_n")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Due, Job]] = []
        self._n = itertools.count()  # ties: first come, first due

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, at: float, what: Due, job: Job) -> None:
        heapq.heappush(self._heap, (at, next(self._n), what, job))

    def due(self, now: float) -> list[tuple[Due, Job]]:
        heap = self._heap
        out = []
        while heap and heap[0][0] <= now:
            _, _, what, job = heapq.heappop(heap)
            out.append((what, job))
        return out

    @property
    def next(self) -> float:
        return self._heap[0][0] if self._heap else math.inf
