"""When the journal is written and submissions confirmed: group commit, and what happens
when the disk refuses.

After a quiet spell a change is committed (and confirmed) at the end of the next loop
turn, or :data:`GRACE` seconds after it arrived if no turn comes sooner: a quick job's
outcome then shares the commit (and the client's wake-up) with its own submission instead
of costing a second one. Under load a commit happens at most once per ``commit_interval``
or every COMMIT_BATCH submissions, so one transaction and one ACCEPTED per client cover
many jobs. A failed write leaves the
changes buffered, refuses new submissions (the core asks :attr:`problem`) and is retried
with a growing delay.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from .journal import Journal, JournalWriteError
from .notify import Notifier

if TYPE_CHECKING:
    from .metrics import Recorder

log = logging.getLogger(__name__)

#: Unconfirmed submissions that make a commit due before commit_interval has passed.
COMMIT_BATCH = 2000
#: After a quiet spell, the longest a change waits for one more loop turn before its
#: commit (never longer than commit_interval; commit_interval = 0 commits every turn).
GRACE = 0.001
#: After a failed journal write the commit is retried after this delay, doubling up to the max.
RETRY = 0.1
RETRY_MAX = 5.0


class GroupCommit:
    def __init__(self, journal: Journal, notifier: Notifier, interval: float) -> None:
        self.journal = journal
        self.notifier = notifier
        self.interval = interval
        self.due = math.inf  # when a commit left for later is due (a wake-up time)
        self._committed = -math.inf  # when the journal last committed something
        # Why the journal cannot be written (disk full, read-only, ...), or None.
        self.problem: str | None = None
        self.problem_since = 0.0
        self._retry = RETRY
        self._retry_at = 0.0
        self.metrics: Recorder | None = None  # commit latency and size, when metrics are on
        self._first = -math.inf  # when the loop first saw the changes now pending
        self._graced = False  # they have waited their one turn of grace

    def pending(self) -> bool:
        return (bool(self.notifier.unconfirmed) or bool(self.notifier.durable_replies)
                or self.journal.dirty())

    def maybe(self, now: float) -> None:
        """Once per loop turn: commit now, or set :attr:`due` for when to."""
        if not self.pending():
            self.due = math.inf  # what was pending went away (a plain job forgotten, say)
            return
        due = self._committed + self.interval
        if self._first < self._committed:
            self._first = now
        if self.problem is not None and self._retry_at > due:
            due = self._retry_at
        if len(self.notifier.unconfirmed) >= COMMIT_BATCH and self.problem is None:
            self.now(now)
        elif now < due:
            self.due = due
        elif not self._graced and self.interval > 0 and self._first >= due:
            # After a quiet spell: one more turn first (or GRACE, whichever comes first).
            self._graced = True
            self.due = now + min(GRACE, self.interval)
        else:
            self.now(now)

    def now(self, now: float) -> bool:
        """Make everything durable now, then confirm submissions. False if the journal could
        not be written: nothing is confirmed then; the commit is retried later."""
        self.due = math.inf
        self._graced = False
        if not self.pending():
            return True
        self._committed = now
        try:
            if self.metrics is None:
                self.journal.commit()
            else:
                self._timed_commit(self.metrics)
        except JournalWriteError as exc:
            self._failed(str(exc), now)
            return False
        if self.problem is not None:
            log.warning("journal writable again after %.1fs; new submissions are accepted again",
                        now - self.problem_since)
            self.problem = None
            self._retry = RETRY
        self.notifier.send_accepted()
        return True

    def _timed_commit(self, metrics: Recorder) -> None:
        """Commit, observing how long it took and how many rows it wrote (a journal that
        writes nothing, such as ":memory:", is not observed)."""
        if not self.journal.dirty():
            self.journal.commit()
            return
        rows = getattr(self.journal, "rows", 0)
        began = time.perf_counter()
        self.journal.commit()
        metrics.committed(time.perf_counter() - began, getattr(self.journal, "rows", 0) - rows)

    def _failed(self, why: str, now: float) -> None:
        """Keep running on what is in memory; refuse new work until the journal takes writes."""
        if self.problem is None:
            self.problem_since = now
            log.error("cannot write the journal: %s. Refusing new submissions; jobs already "
                      "confirmed keep running and their outcomes are written once it recovers. "
                      "Retrying.", why)
        elif why != self.problem:
            log.error("journal still failing: %s", why)
        self.problem = why
        self._retry_at = now + self._retry
        self._retry = min(RETRY_MAX, self._retry * 2)
        self.due = self._retry_at

    def describe(self, now: float) -> dict[str, object]:
        return {**self.journal.describe(), "problem": self.problem,
                "problem_for": round(now - self.problem_since, 1) if self.problem else None}
