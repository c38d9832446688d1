"""What the broker counts and shows: counters, rates, bad input, recent failures, the snapshot."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import ProtocolError
from ..util import RateLimitedLog
from .model import RUNNING, Job

if TYPE_CHECKING:
    from .core import BrokerCore

log = logging.getLogger("respworkers.broker.core")

#: How many recent failures the status snapshot lists.
RECENT_FAILURES = 20
#: Window of the rates shown in the status, in seconds.
RATE_WINDOW = 10.0


class Counters:
    """Since this broker started (docs/protocol.md section 5, ``totals``)."""

    __slots__ = (
        "submitted", "done", "failed", "cancelled", "expired", "retried", "duplicates", "late",
        "lost_workers", "resubmitted", "refused", "requeued", "abandoned", "drained",
    )

    def __init__(self) -> None:
        self.submitted = self.done = self.failed = self.cancelled = self.expired = 0
        self.retried = self.duplicates = self.late = self.lost_workers = 0
        self.resubmitted = self.refused = self.requeued = 0
        self.abandoned = 0  # running attempts told to stop (ABANDON) because their job ended
        self.drained = 0  # workers told to finish their job and leave (rw drain)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Stats:
    def __init__(self) -> None:
        self.counters = Counters()
        self.bad: dict[str, int] = {}  # malformed or unexpected input, by reason
        self.recent_failures: deque[dict[str, Any]] = deque(maxlen=RECENT_FAILURES)
        self._rates: deque[tuple[float, int, int, int]] = deque()
        self._bad_log = RateLimitedLog(log)

    def count_bad(self, where: str, exc: ProtocolError, now: float) -> None:
        """Count a malformed or unexpected message; log at most one line per second."""
        key = f"{where}: {exc.reason}"
        self.bad[key] = self.bad.get(key, 0) + 1
        self._bad_log.warning("dropped bad message on %s (%s); counting them in the status",
                              where, exc, now=now)

    def failed(self, job: Job) -> None:
        self.recent_failures.append(job.failure())

    def sample(self, now: float) -> None:
        """At each heartbeat: remember the counters, for the rates."""
        c = self.counters
        self._rates.append((now, c.submitted, c.done, c.failed))
        while len(self._rates) > 2 and now - self._rates[0][0] > RATE_WINDOW:
            self._rates.popleft()

    def rates(self) -> dict[str, float]:
        if len(self._rates) >= 2:
            t0, s0, d0, f0 = self._rates[0]
            t1, s1, d1, f1 = self._rates[-1]
            if t1 > t0:
                dt = t1 - t0
                return {"submitted": round((s1 - s0) / dt, 2), "done": round((d1 - d0) / dt, 2),
                        "failed": round((f1 - f0) / dt, 2)}
        return {"submitted": 0.0, "done": 0.0, "failed": 0.0}


def snapshot(core: BrokerCore) -> dict[str, Any]:
    """The status snapshot (docs/protocol.md section 5). Scans workers and queues: on request
    only, never per message; ``broker.snapshot_took`` says how long that scan held the loop."""
    took = time.perf_counter()
    now, wall = core.now, core.wall
    queues: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        e = queues.get(name)
        if e is None:
            e = queues[name] = {"queued": 0, "scheduled": 0, "running": 0, "workers": 0,
                                "idle": 0, "oldest_wait": None, "paused": name in paused}
        return e

    paused = core.queues.paused
    for name in sorted(paused):  # shown even while nothing uses them
        entry(name)

    for name, q in core.queues.by_name.items():
        if q.depth or q.scheduled:
            e = entry(name)
            e["queued"] = q.depth
            e["scheduled"] = len(q.scheduled)
        if q.depth:
            oldest = q.oldest()
            e["oldest_wait"] = round(wall - oldest, 3) if oldest is not None else None
            tenants = q.waiting_per_tenant()
            if len(tenants) > 1 or "" not in tenants:  # only when someone names tenants
                e["tenants"] = {t or "(none)": n for t, n in sorted(tenants.items())}
    for job in core.queues.held.values():  # held back after a restart: queued too
        entry(job.queue)["queued"] += 1
    workers = []
    for w in core.workers.records.values():
        for name in w.queues:
            e = entry(name)
            e["workers"] += 1
            e["idle"] += w.ready
        row = w.row(now)
        if w.job is not None and w.job.state is RUNNING and w.job.worker is w:
            entry(w.job.queue)["running"] += 1
            if w.job.progress is not None:
                row["progress"] = w.job.progress
        for job, _, _ in w.held or ():  # prefetched, not started: running for its job's INFO
            if job.state is RUNNING and job.worker is w:
                entry(job.queue)["running"] += 1
        workers.append(row)
    snap: dict[str, Any] = {
        "broker": {
            "id": core.broker_id,
            "version": __version__,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": core.started_wall,
            "uptime": round(wall - core.started_wall, 3),
            "endpoints": core.endpoints,
            "defaults": {"timeout": core.cfg.timeout, "tries": core.cfg.tries},
            "accepting": core.accepting,
            "journal": core.commits.describe(now),
        },
        "workers": workers,
        "queues": queues,
        "paused": sorted(paused),
        "queued": core.queues.waiting(),
        "scheduled": core.queues.scheduled(),
        "in_flight": len(core.deadlines),
        "retained": len(core.finished),
        "totals": core.stats.counters.as_dict(),
        "rates": core.stats.rates(),
        "bad_messages": dict(core.stats.bad),
        "recent_failures": list(core.stats.recent_failures),
        "time": wall,
    }
    snap["broker"]["snapshot_took"] = round(time.perf_counter() - took, 6)
    return snap
