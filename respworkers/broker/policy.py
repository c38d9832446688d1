"""Retries: when a failed attempt runs again, and on which worker.

**When.** After a failed attempt (an error, a time-out, a lost worker) the job waits
``backoff × 2^(attempt − 1)`` seconds, at most ``backoff_max``, times a random factor
between 0.5 and 1 (jitter, so that jobs failing together do not retry together). The job's
own ``backoff``/``backoff_max`` come first, then those the failing worker's class announced
in HELLO, then the broker's (``[broker] backoff``: 1 s by default, 0 retries at once). A worker
that raises ``Retry(after=...)`` sets the delay itself.

**Where.** A retry goes to a worker that has not tried the job whenever one serves its
queue, even if that worker is busy now: the retry waits for it, for at most
``retry_elsewhere_wait`` seconds (5 by default). After that, or when every worker serving
the queue has tried the job, any worker may take it. Workers are told apart by name
(``host:pid``).
"""

from __future__ import annotations

import random
from typing import Any

from ..config import BrokerConfig
from .model import Job
from .queues import Queue
from .workers import WorkerRec, Workers


def _seconds(info: dict[str, Any] | None, key: str, queue: str) -> float | None:
    """The worker class's setting: one number, or one per queue (a worker process that runs
    several classes)."""
    value = info.get(key) if info else None
    if isinstance(value, dict):
        value = value.get(queue)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        return None
    return float(value)


class RetryPolicy:
    def __init__(self, cfg: BrokerConfig, rng: random.Random | None = None) -> None:
        self.backoff = cfg.backoff
        self.backoff_max = cfg.backoff_max
        self.elsewhere_wait = cfg.retry_elsewhere_wait
        self.rng = rng or random.Random()

    def delay(self, job: Job, worker: WorkerRec | None, asked: float | None = None) -> float:
        """Seconds before the job's next attempt (0: at once)."""
        if asked is not None:
            return asked
        info = worker.info if worker is not None else None
        base = job.backoff
        if base is None:
            base = _seconds(info, "backoff", job.queue)
        if base is None:
            base = self.backoff
        if base <= 0:
            return 0.0
        cap = job.backoff_max
        if cap is None:
            cap = _seconds(info, "backoff_max", job.queue)
        if cap is None:
            cap = self.backoff_max
        exponent = min(max(job.attempt - 1, 0), 60)
        return float(min(cap, base * 2.0 ** exponent) * self.rng.uniform(0.5, 1.0))

    def waits_for_another(self, job: Job, name: str, q: Queue, workers: Workers,
                          now_wall: float) -> bool:
        """Should a worker named ``name``, which tried this retry, leave it to another?"""
        if not job.tried or name not in job.tried:
            return False
        if job.retry_since and now_wall - job.retry_since >= self.elsewhere_wait:
            return False
        return workers.untried_serving(job, q) > 0
