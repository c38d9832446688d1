"""The job: its states, who waits for it, its attempt tokens, and how it is stored as a row.

Everything that knows a job's layout lives here, so the journal imports the model and
never the core, and the row layout is written once (:data:`COLUMNS`, :func:`full_row`,
:func:`change_row`, :func:`from_row`).
"""

from __future__ import annotations

import json
import struct
from enum import Enum, IntEnum
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from .workers import WorkerRec


class JobState(str, Enum):
    """What a job is doing; the values are what INFO, the snapshot and the journal say."""

    SCHEDULED = "scheduled"  #: waits for its time (a delay, an eta, or a retry's backoff)
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"  #: not started before its expiry: never ran

    def __str__(self) -> str:
        return self.value


SCHEDULED, QUEUED, RUNNING, DONE, FAILED, CANCELLED, EXPIRED = (
    JobState.SCHEDULED, JobState.QUEUED, JobState.RUNNING, JobState.DONE, JobState.FAILED,
    JobState.CANCELLED, JobState.EXPIRED)
ENDED = frozenset((DONE, FAILED, CANCELLED, EXPIRED))
WAITING = frozenset((SCHEDULED, QUEUED))
#: Ended jobs that can run again (``rw requeue``): their payload is kept until retention ends.
REQUEUABLE = frozenset((FAILED, CANCELLED, EXPIRED))
DEFAULT_PRIORITY = 5
DEFAULT_TENANT = ""


class Waiter(IntEnum):
    """How a waiting client is told a job's outcome."""

    PROTO = 0  #: a protocol client: one message per outcome
    PLAIN = 1  #: a plain REQ: the result frames, or one empty frame
    BATCH = 2  #: sent SUBMITS (or WAIT with several ids): results batched per loop turn


#: The clients to tell when a job ends: ``(routing id, how)`` pairs, a tuple.
Waiters = tuple[tuple[bytes, Waiter], ...]


class Job:
    """One client job and its attempts. ``waiters`` are the clients to tell when it ends.

    A broker may hold millions of these, so a job costs little until it needs more: no id
    bytes are kept (``bid`` encodes on demand), and ``waiters`` and ``tried`` are tuples,
    the shared empty tuple until something is added (replaced whole, never mutated)."""

    __slots__ = (
        "id", "queue", "payload", "timeout", "tries", "attempt", "state", "seq",
        "waiters", "tried", "worker", "deadline", "created", "started", "finished",
        "result", "reason", "error", "qtoken", "lane", "tokens", "priority", "tenant",
        "not_before", "expires_at", "backoff", "backoff_max", "progress", "history", "watchers",
        "retry_since",
    )

    def __init__(
        self, job_id: str, queue: str, payload: list[bytes] | None, timeout: float, tries: int,
        seq: int, created: float, priority: int = DEFAULT_PRIORITY, tenant: str = DEFAULT_TENANT,
    ) -> None:
        self.id = job_id
        self.queue = queue
        self.payload = payload  # freed when the job ends
        self.timeout = timeout
        self.tries = tries
        self.attempt = 0  # attempts that count as tries so far
        self.state = QUEUED
        self.seq = seq
        self.waiters: Waiters = ()  # (routing id, how to tell it)
        self.tried: tuple[str, ...] = ()  # worker names, in order
        self.worker: Optional[WorkerRec] = None  # holder of the current attempt
        self.deadline = 0.0
        self.created = created
        self.started = 0.0
        self.finished = 0.0
        self.result: list[bytes] | None = None
        self.reason = ""
        self.error = ""
        self.qtoken = 0  # matches the token of its live queue entry, if it has one
        self.lane: Any = None  # the queue lane its live entry is in (queues.Lane)
        self.priority = priority
        self.tenant = tenant
        self.not_before = 0.0  # wall time it may run from (scheduled), else 0
        self.expires_at = 0.0  # wall time it expires if not started, else 0 (never)
        self.backoff: float | None = None  # its own retry policy (None: the worker's, the broker's)
        self.backoff_max: float | None = None
        self.progress: dict[str, Any] | None = None  # the latest a worker reported
        self.history: list[dict[str, Any]] | None = None  # earlier outcomes (rw requeue)
        self.watchers: list[bytes] | None = None  # clients following its progress
        self.retry_since = 0.0  # when a retry started to wait for a worker that has not tried it
        # Attempts sent to workers that may still answer: token -> attempt. A worker proves
        # it was sent an attempt by echoing its token; nobody else can end the attempt.
        self.tokens: dict[bytes, int] | None = None

    @property
    def bid(self) -> bytes:
        """The id as the protocol sends it."""
        return self.id.encode()

    def info(self, now_wall: float) -> dict[str, Any]:
        """INFO's JSON (docs/protocol.md section 4.2)."""
        scheduled = self.state is SCHEDULED
        return {
            "id": self.id,
            "queue": self.queue,
            "state": self.state.value,
            "attempt": self.attempt,
            "tries": self.tries,
            "timeout": self.timeout,
            "worker": self.worker.name if self.worker and self.state is RUNNING else None,
            "workers_tried": list(self.tried),
            "created": self.created,
            "started": self.started or None,
            "finished": self.finished or None,
            "age": round(now_wall - self.created, 3),
            "reason": self.reason or None,
            "error": self.error or None,
            "result_size": sum(map(len, self.result)) if self.result is not None else None,
            "payload_size": sum(map(len, self.payload)) if self.payload is not None else None,
            "waiting_clients": len(self.waiters),
            "priority": self.priority,
            "tenant": self.tenant or None,
            "runs_at": self.not_before if scheduled else None,
            "runs_in": round(max(0.0, self.not_before - now_wall), 3) if scheduled else None,
            "expires_at": self.expires_at or None,
            "backoff": self.backoff,
            "backoff_max": self.backoff_max,
            "progress": self.progress,
            "history": self.history or [],
        }

    def failure(self) -> dict[str, Any]:
        """The snapshot's record of a failed job (its error's first line is the summary)."""
        summary = (self.error or "").strip().split("\n", 1)[0]
        return {"id": self.id, "queue": self.queue, "reason": self.reason,
                "error": summary[:500], "attempts": self.attempt, "at": self.finished}


# ------------------------------------------------------------------------------------ rows
#: The journal's columns, in the order of :func:`full_row` and :func:`from_row`.
COLUMNS = ("seq", "id", "queue", "timeout", "tries", "attempt", "state", "payload", "result",
           "reason", "error", "tried", "created", "started", "finished", "tokens", "priority",
           "tenant", "not_before", "expires_at", "backoff", "backoff_max", "progress", "history")
#: The columns a change after submission rewrites, in the order of :func:`change_row`.
CHANGING = ("state", "attempt", "result", "reason", "error", "tried", "started", "finished",
            "tokens", "not_before", "expires_at", "progress", "history")

_LEN = struct.Struct(">I")


def pack_frames(frames: list[bytes]) -> bytes:
    """Frames as one blob: each frame prefixed with its 4-byte big-endian length."""
    return b"".join(_LEN.pack(len(f)) + f for f in frames)


def unpack_frames(blob: bytes) -> list[bytes]:
    end = len(blob)
    if end >= 4 and _LEN.unpack_from(blob)[0] == end - 4:  # one frame: the usual case
        return [blob[4:]]
    out, pos = [], 0
    while pos < end:
        (n,) = _LEN.unpack_from(blob, pos)
        pos += 4
        out.append(blob[pos:pos + n])
        pos += n
    return out


def pack_tokens(tokens: dict[bytes, int] | None) -> str:
    """Live attempt tokens as ``attempt:token`` words separated by commas."""
    if not tokens:
        return ""
    return ",".join(f"{attempt}:{token.decode('ascii', 'replace')}" for token, attempt in tokens.items())


def unpack_tokens(text: str) -> dict[bytes, int] | None:
    if not text:
        return None
    out: dict[bytes, int] = {}
    for word in text.split(","):
        attempt, _, token = word.partition(":")
        if attempt.isdigit() and token:
            out[token.encode()] = int(attempt)
    return out or None


def change_row(job: Job) -> tuple[Any, ...]:
    """The :data:`CHANGING` columns of a job, as it is now."""
    return (
        job.state.value, job.attempt, pack_frames(job.result) if job.result is not None else None,
        job.reason, job.error, "\n".join(job.tried), job.started, job.finished,
        pack_tokens(job.tokens), job.not_before, job.expires_at,
        json.dumps(job.progress) if job.progress else "",
        json.dumps(job.history) if job.history else "",
    )


def dispatch_row(job: Job) -> tuple[Any, ...]:
    """What a dispatch changes (journal._DISPATCHED), then the row's key."""
    return (job.state.value, job.attempt, "\n".join(job.tried), job.started,
            pack_tokens(job.tokens), job.seq)


def full_row(job: Job) -> tuple[Any, ...]:
    """Every :data:`COLUMNS` value of a job, as it is now."""
    (state, attempt, result, reason, error, tried, started, finished, tokens, not_before,
     expires_at, progress, history) = change_row(job)
    return (job.seq, job.id, job.queue, job.timeout, job.tries, attempt, state,
            None if job.payload is None else pack_frames(job.payload), result, reason, error,
            tried, job.created, started, finished, tokens, job.priority, job.tenant, not_before,
            expires_at, job.backoff, job.backoff_max, progress, history)


_STATES = {state.value: state for state in JobState}


def from_row(row: tuple[Any, ...], shared: dict[Any, Any] | None = None) -> Job:
    """A job as it was stored (:data:`COLUMNS` order); waiters are not stored.

    ``shared``, one dict for the rows of a load, makes jobs share equal values (queue,
    tenant and worker names, timeouts) rather than hold a copy each: sqlite returns new
    objects per row, and a million rows would hold a hundred megabytes of copies."""
    (seq, job_id, queue, timeout, tries, attempt, state, payload, result, reason, error, tried,
     created, started, finished, tokens, priority, tenant, not_before, expires_at, backoff,
     backoff_max, progress, history) = row
    if shared is not None:
        queue = shared.setdefault(queue, queue)
        tenant = shared.setdefault(tenant, tenant)
        timeout = shared.setdefault(timeout, timeout)
    job = Job(job_id, queue, unpack_frames(payload) if payload is not None else None, timeout,
              tries, seq, created, priority, tenant)
    job.state = _STATES[state]
    job.attempt = attempt
    if result is not None:
        job.result = unpack_frames(result)
    job.reason, job.error = reason, error
    if tried:
        job.tried = tuple(tried.split("\n") if shared is None else
                          [shared.setdefault(name, name) for name in tried.split("\n")])
    if started:
        job.started = started
    if finished:
        job.finished = finished
    if tokens:
        job.tokens = unpack_tokens(tokens)
    if not_before or expires_at:
        job.not_before, job.expires_at = not_before, expires_at
    if backoff is not None or backoff_max is not None:
        job.backoff, job.backoff_max = backoff, backoff_max
    if progress:
        job.progress = json.loads(progress)
    if history:
        job.history = json.loads(history)
    return job
