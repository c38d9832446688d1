"""Attempt time limits: which running attempts are past their deadline, and the earliest one.

Attempts are grouped by their time limit: within a group deadlines only grow (a later
start means a later deadline), so the due ones are at the front of each group and
stopping one deletes it in O(1). The earliest deadline is always known: a start can only
lower it, and a stop that may have removed it marks it for a recount over the groups'
heads (O(distinct time limits)), so no new or refilled group is ever overlooked.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from .model import Job


class Deadlines:
    __slots__ = ("groups", "_earliest", "_recount")

    def __init__(self) -> None:
        self.groups: dict[float, OrderedDict[str, Job]] = {}
        self._earliest = math.inf
        self._recount = False

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def start(self, job: Job, now: float) -> None:
        """The attempt runs from ``now``: its deadline is ``now + timeout``."""
        job.deadline = deadline = now + job.timeout
        group = self.groups.get(job.timeout)
        if group is None:
            group = self.groups[job.timeout] = OrderedDict()
        group[job.id] = job
        if deadline < self._earliest:
            self._earliest = deadline

    def stop(self, job: Job) -> None:
        group = self.groups.get(job.timeout)
        if group is not None and group.pop(job.id, None) is not None:
            if not group:
                del self.groups[job.timeout]
            if job.deadline <= self._earliest:
                self._recount = True

    def due(self, now: float) -> list[Job]:
        """Attempts whose deadline has passed, earliest first within each time limit."""
        out = []
        for group in self.groups.values():
            for job in group.values():
                if job.deadline > now:
                    break
                out.append(job)
        return out

    @property
    def earliest(self) -> float:
        if self._recount:
            self._recount = False
            self._earliest = min((next(iter(g.values())).deadline for g in self.groups.values()),
                                 default=math.inf)
        return self._earliest
