"""Registered workers: their records, pool slots, idleness, and whom a job goes to.

A worker is known by its ROUTER routing id. Registering one counts it as serving its
queues; an idle worker sits in the ``ready`` set of every queue it serves, oldest idle
first, which is where a new job looks for it.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional

from .model import Job
from .queues import Queue, Queues

#: How many ready workers a retry looks through for one that has not tried the job.
RETRY_SCAN = 32


class WorkerRec:
    """One registered worker process."""

    __slots__ = (
        "wid", "name", "queues", "info", "job", "job_id", "attempt", "token", "since",
        "last_seen", "expiry", "done", "failed", "ready", "stopping", "registered", "slot",
        "incarnation", "conn", "draining", "forged", "unacked", "prefetch", "held", "answered",
    )

    def __init__(self, wid: bytes, queues: tuple[str, ...], info: dict[str, Any], now: float) -> None:
        self.wid = wid
        self.queues = queues
        self.info = info
        name = info.get("name")
        # Clean whatever a peer sent (JSON allows lone surrogates, which cannot be encoded).
        self.name = str(name)[:80].encode("utf-8", "replace").decode() if name else wid.hex()
        self.job: Optional[Job] = None
        self.job_id: str | None = None  # may name a job this broker does not know
        self.attempt = 0
        self.token = b""  # the token of the attempt in hand
        self.since = now
        self.last_seen = now
        self.expiry = 0.0
        self.done = 0
        self.failed = 0
        self.ready = False
        self.stopping = False
        self.registered = now
        slot = info.get("slot")
        self.slot = slot if isinstance(slot, str) else None
        incarnation = info.get("incarnation")
        self.incarnation = incarnation if isinstance(incarnation, str) else None
        conn = info.get("conn")
        self.conn = conn if isinstance(conn, int) and not isinstance(conn, bool) else 0
        # Told to drain (rw drain): it gets no more jobs and leaves after the one in hand. A
        # drained worker that reconnects says so in its HELLO, so it stays drained.
        self.draining = info.get("draining") is True
        # Its HELLO claimed an attempt with a token the broker never sent: whatever it says
        # of that attempt is a forgery (or a dispatch a crash kept out of the journal).
        self.forged = False
        # The ACK owed for its last answer while it idles (idle workers are confirmed with
        # the next message either side sends, not with one more message of their own).
        self.unacked: list[bytes] | None = None
        # Prefetch (HELLO info ``prefetch``): it may hold this many attempts. The one in
        # ``job`` runs (the oldest sent); ``held`` are sent and not started, in order.
        self.prefetch = 1
        self.held: deque[tuple[Job, int, bytes]] | None = None  # (job, attempt, token)
        self.answered = 0  # answers applied from it (JOBS tells it: its answers confirmed)

    def stale(self, new: WorkerRec) -> bool:
        """Whether ``new`` (a HELLO for this record's slot) came from a connection this very
        process left before it registered on this record's: a HELLO delayed in the network."""
        return (self.incarnation is not None and new.incarnation == self.incarnation
                and new.conn < self.conn)

    @property
    def state(self) -> str:
        if self.draining:
            return "draining"
        if self.job_id is not None:
            return "busy"
        if self.ready:
            return "idle"
        return "stopping" if self.stopping else "waiting"

    def release(self) -> None:
        """It holds nothing now."""
        self.job = None
        self.job_id = None
        self.attempt = 0
        self.token = b""
        self.forged = False

    def holds(self, job_id: str, attempt: int, token: bytes) -> bool:
        return self.job_id == job_id and self.attempt == attempt and self.token == token

    def alive(self, now: float) -> bool:
        return now - self.last_seen <= self.expiry

    def row(self, now: float) -> dict[str, Any]:
        """The snapshot's record of this worker."""
        return {
            "id": self.wid.hex(),
            "name": self.name,
            "host": self.info.get("host"),
            "pid": self.info.get("pid"),
            "queues": list(self.queues),
            "state": self.state,
            "job": self.job_id,
            "attempt": self.attempt or None,
            "busy_for": round(now - self.since, 3) if self.job_id is not None else None,
            "done": self.done,
            "failed": self.failed,
            "last_seen": round(now - self.last_seen, 3),
            "registered": round(now - self.registered, 3),
            "prefetch": self.prefetch,
            "held": len(self.held) if self.held else 0,
        }


class Workers:
    """Every registered worker, and which one occupies each pool slot."""

    def __init__(self, queues: Queues) -> None:
        self.queues = queues
        self.records: dict[bytes, WorkerRec] = {}
        self.slots: dict[str, bytes] = {}  # a pool slot -> the worker process now in it
        self.by_name: dict[str, list[WorkerRec]] = {}  # usually one each; a name reconnecting: two

    def __len__(self) -> int:
        return len(self.records)

    def get(self, wid: bytes) -> WorkerRec | None:
        return self.records.get(wid)

    def registered(self, w: WorkerRec | None) -> bool:
        return w is not None and self.records.get(w.wid) is w

    def add(self, w: WorkerRec) -> None:
        self.records[w.wid] = w
        self.by_name.setdefault(w.name, []).append(w)
        for name in w.queues:
            self.queues.require(name).serving += 1
        if w.slot is not None:
            self.slots[w.slot] = w.wid

    def in_slot(self, slot: str) -> WorkerRec | None:
        wid = self.slots.get(slot)
        return self.records.get(wid) if wid is not None else None

    def remove(self, w: WorkerRec) -> bool:
        """Forget it; False if it was not registered (already forgotten)."""
        if self.records.get(w.wid) is not w:
            return False
        del self.records[w.wid]
        same = self.by_name.get(w.name)
        if same is not None:
            same.remove(w)
            if not same:
                del self.by_name[w.name]
        self.unready(w)
        for name in w.queues:
            q = self.queues.by_name[name]
            q.serving -= 1
            self.queues.forget_if_unused(q)
        if w.slot is not None and self.slots.get(w.slot) == w.wid:
            del self.slots[w.slot]
        return True

    def park(self, w: WorkerRec) -> None:
        """It is idle: the next job of any of its queues may go to it."""
        w.ready = True
        for name in w.queues:
            self.queues.require(name).ready[w.wid] = w

    def unready(self, w: WorkerRec) -> None:
        if w.ready:
            w.ready = False
            for name in w.queues:
                q = self.queues.by_name.get(name)
                if q is not None:
                    q.ready.pop(w.wid, None)
                    self.queues.forget_if_unused(q)

    @staticmethod
    def pick(q: Queue, job: Job) -> tuple[WorkerRec, bool]:
        """The idle worker a job goes to, and whether it has not tried the job: the one idle
        longest, but for a retry one that has not tried it if one is among the first
        RETRY_SCAN (a bounded look)."""
        ready = q.ready
        if not job.tried:
            return next(iter(ready.values())), True
        first = None
        for i, w in enumerate(ready.values()):
            if first is None:
                first = w
            if w.name not in job.tried:
                return w, True
            if i >= RETRY_SCAN:
                break
        assert first is not None
        return first, False

    def untried_serving(self, job: Job, q: Queue) -> int:
        """How many registered workers serving ``q`` have not tried ``job`` (O(names tried))."""
        tried = 0
        for name in set(job.tried):
            tried += sum(1 for w in self.by_name.get(name, ()) if q.name in w.queues)
        return q.serving - tried

    def silent(self, now: float) -> list[WorkerRec]:
        """Workers not heard from within their expiry (a scan: heartbeat ticks only)."""
        return [w for w in self.records.values() if now - w.last_seen > w.expiry]
