"""The broker's state machine: jobs, queues, ready workers, attempts and their deadlines.

No sockets here. The server feeds decoded traffic in and the core answers through
two callables (``send_client``, ``send_worker``) so it can be driven step by step
in tests with a fake clock. Every per-message path is O(1) in the number of jobs
and workers; anything that scans runs on the heartbeat tick, not per message.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Any, Callable

from .. import __version__, protocol
from ..config import BrokerConfig
from ..errors import ProtocolError
from .journal import Journal, JournalWriteError, NullJournal, Stored

log = logging.getLogger(__name__)

SendFn = Callable[[bytes, list], None]

QUEUED = "queued"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"
FINAL = frozenset((DONE, FAILED, CANCELLED))

# How a waiting client is told a job's outcome.
PROTO = 0  #: a protocol client: one message per outcome
PLAIN = 1  #: a plain REQ: the result frames, or one empty frame
BATCH = 2  #: a protocol client that sent SUBMITS: results batched per loop turn (RESULTS)

#: How many recent failures the status snapshot lists.
RECENT_FAILURES = 20
#: How many ready workers a retry looks through for one that has not tried the job.
RETRY_SCAN = 32
#: Longest heartbeat interval a worker may announce (seconds).
MAX_WORKER_HEARTBEAT = 60.0
#: Window of the rates shown in the status, in seconds.
RATE_WINDOW = 10.0
#: Unconfirmed submissions that make a commit due before commit_interval has passed.
COMMIT_BATCH = 2000
#: Jobs of a SUBMITS taken in between two looks at the clock (loop turns are bounded in time).
INTAKE_STEP = 64
#: Largest RESULTS message, in bytes of results (a single larger result travels alone).
MAX_RESULTS_BYTES = 256 << 10
#: Rows restored between two looks at the sockets while a large journal loads.
RESTORE_STEP = 5000
#: After a failed journal write the commit is retried after this delay, doubling up to the max.
JOURNAL_RETRY = 0.1
JOURNAL_RETRY_MAX = 5.0


def _secs(value: float) -> str:
    """Seconds to the millisecond, never rounded so that two different values print alike."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


class Tokens:
    """Unguessable attempt tokens (32 hex digits), cut from one urandom read per 256 tokens."""

    __slots__ = ("_hex", "_pos")

    def __init__(self) -> None:
        self._hex = b""
        self._pos = 0

    def next(self) -> bytes:
        pos = self._pos
        if pos >= len(self._hex):
            self._hex = os.urandom(4096).hex().encode()
            pos = 0
        self._pos = pos + 32
        return self._hex[pos:pos + 32]


class Job:
    """One client job and its attempts. ``waiters`` are the clients to tell when it ends."""

    __slots__ = (
        "id", "bid", "queue", "payload", "timeout", "tries", "attempt", "state", "seq",
        "waiters", "tried", "worker", "deadline", "created", "started", "finished",
        "result", "reason", "error", "qtoken", "tokens",
    )

    def __init__(
        self, job_id: str, queue: str, payload: list[bytes], timeout: float, tries: int,
        seq: int, created: float,
    ) -> None:
        self.id = job_id
        self.bid = job_id.encode()
        self.queue = queue
        self.payload: list[bytes] | None = payload
        self.timeout = timeout
        self.tries = tries
        self.attempt = 0  # attempts that count as tries so far
        self.state = QUEUED
        self.seq = seq
        self.waiters: list[tuple[bytes, int]] = []  # (routing id, PROTO | PLAIN | BATCH)
        self.tried: list[str] = []  # worker names, in order
        self.worker: WorkerRec | None = None  # holder of the current attempt
        self.deadline = 0.0
        self.created = created
        self.started = 0.0
        self.finished = 0.0
        self.result: list[bytes] | None = None
        self.reason = ""
        self.error = ""
        self.qtoken = 0  # matches the token of its live queue entry, if it has one
        # Attempts sent to workers that may still answer: token -> attempt. A worker proves
        # it was sent an attempt by echoing its token; nobody else can end the attempt.
        self.tokens: dict[bytes, int] | None = None

    def info(self, now_wall: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "queue": self.queue,
            "state": self.state,
            "attempt": self.attempt,
            "tries": self.tries,
            "timeout": self.timeout,
            "worker": self.worker.name if self.worker and self.state == RUNNING else None,
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
        }


class WorkerRec:
    """One registered worker process, known by its ROUTER routing id."""

    __slots__ = (
        "wid", "name", "queues", "info", "job", "job_id", "attempt", "token", "since",
        "last_seen", "expiry", "done", "failed", "ready", "stopping", "registered", "slot",
    )

    def __init__(self, wid: bytes, queues: tuple[str, ...], info: dict[str, Any], now: float) -> None:
        self.wid = wid
        self.queues = queues
        self.info = info
        name = info.get("name")
        # Clean whatever a peer sent (JSON allows lone surrogates, which cannot be encoded).
        self.name = str(name)[:80].encode("utf-8", "replace").decode() if name else wid.hex()
        self.job: Job | None = None
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

    @property
    def state(self) -> str:
        if self.job_id is not None:
            return "busy"
        if self.ready:
            return "idle"
        return "stopping" if self.stopping else "waiting"


class Counters:
    __slots__ = (
        "submitted", "done", "failed", "cancelled", "retried", "duplicates", "late",
        "lost_workers", "resubmitted", "refused",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class BrokerCore:
    """All broker decisions. Drive it with :meth:`set_time`, the ``on_*`` methods and :meth:`tick`."""

    def __init__(
        self,
        cfg: BrokerConfig,
        send_client: SendFn,
        send_worker: SendFn,
        journal: Journal | None = None,
        endpoints: dict[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.send_client = send_client
        self.send_worker = send_worker
        self.journal: Journal = journal or NullJournal()
        self.broker_id = uuid.uuid4().hex[:12]
        self.endpoints = endpoints or {}
        self.now = time.monotonic()
        self.wall = time.time()
        self.started_wall = self.wall
        self.jobs: dict[str, Job] = {}
        # Per queue, entries (token, job) oldest first. Taking a job out of the middle
        # (cancel, a late answer, a claim) only bumps job.qtoken, which makes its entry
        # stale: O(1) instead of deque.remove. depth counts the live entries.
        self.pending: dict[str, deque[tuple[int, Job]]] = {}
        self.depth: dict[str, int] = {}
        self.ready: dict[str, dict[bytes, WorkerRec]] = {}
        self.workers: dict[bytes, WorkerRec] = {}
        self.slots: dict[str, bytes] = {}  # a pool slot -> the worker process now in it
        self.serving: dict[str, int] = {}  # queue -> registered workers serving it
        # In-flight attempts grouped by timeout: within a group deadlines only grow,
        # so expiry looks at the front of each group and completion deletes in O(1).
        self.inflight: dict[float, OrderedDict[str, Job]] = {}
        self.finished: OrderedDict[str, Job] = OrderedDict()
        self.unconfirmed: list[tuple[bytes, bytes]] = []
        self.outbox: dict[bytes, list[Job]] = {}  # batched results waiting for the turn's end
        # Jobs that were running when the previous broker stopped: held back briefly so
        # the workers still running them can re-register and claim them.
        self.recovering: dict[str, Job] = {}
        self.recover_at = 0.0
        self.counters = Counters()
        self.bad: dict[str, int] = {}  # malformed or unexpected input, by reason
        self.recent_failures: deque[dict[str, Any]] = deque(maxlen=RECENT_FAILURES)
        self.rates: deque[tuple[float, int, int, int]] = deque()
        self.accepting = True
        # Why the journal cannot be written (disk full, read-only, ...), or None. While set,
        # new submissions are refused and the commit is retried with a growing delay.
        self.journal_problem: str | None = None
        self.journal_problem_since = 0.0
        self._journal_retry = JOURNAL_RETRY
        self._journal_retry_at = 0.0
        self.journal.bind(self.jobs)
        self.tokens = Tokens()
        # Loop turns are bounded in time: the server sets when this turn's budget ends; a
        # batch of submissions still unfinished then is continued in the next turn.
        self.clock: Callable[[], float] = time.monotonic
        self.turn_ends = math.inf
        self._intake: deque[tuple[bytes, list[protocol.Submit], int]] = deque()
        self._seq = 0
        self._version_told = -math.inf  # when an old-version worker was last told why not
        self._hello_told = -math.inf  # when a worker was last told why its HELLO was refused
        self._next_beat = 0.0
        self._earliest = math.inf  # no attempt's deadline is earlier than this
        self._committed = -math.inf  # when the journal last committed something
        self._commit_due = math.inf  # when maybe_flush() left changes to commit
        self._bad_logged = 0.0
        self._welcome = protocol.encode_welcome(
            self.broker_id, cfg.heartbeat, cfg.liveness, cfg.max_message_size)
        self.limits = {"max_message_size": cfg.max_message_size, "max_queued": cfg.max_queued,
                       "max_timeout": cfg.max_timeout, "max_tries": cfg.max_tries}

    # ------------------------------------------------------------------ restart
    def restore(
        self, stored: Iterable[Stored], progress: Callable[[int], None] | None = None
    ) -> dict[str, int]:
        """Rebuild state from the journal after a restart (call before serving workers).

        Queued jobs queue again in their old order. A job that was running is held back
        for one heartbeat expiry so its worker can re-register and claim it; if none
        does, it runs again and the interrupted attempt does not count as a try.
        Finished jobs keep their outcome for WAIT and QUERY until retention ends.
        ``progress(rows so far)`` is called every RESTORE_STEP rows, so that a caller can
        answer pings while a large journal loads.
        """
        counts = {"queued": 0, "interrupted": 0, "finished": 0}
        finished: list[Job] = []
        self.start_recovery()
        for n, row in enumerate(stored, 1):
            if progress is not None and not n % RESTORE_STEP:
                progress(n)
            job = Job(row.id, row.queue, row.payload or [b""], row.timeout, row.tries, row.seq,
                      row.created)
            job.attempt, job.tried, job.tokens = row.attempt, row.tried, row.tokens
            job.started, job.error, job.reason = row.started, row.error, row.reason
            self.jobs[job.id] = job
            self._seq = max(self._seq, row.seq)
            if row.state in FINAL:
                job.state, job.result, job.finished, job.payload = (
                    row.state, row.result, row.finished, None)
                finished.append(job)
            elif row.state == RUNNING:
                job.attempt = max(0, row.attempt - 1)
                self.recovering[job.id] = job
                counts["interrupted"] += 1
            else:
                self._enqueue(job, front=False)
                counts["queued"] += 1
        finished.sort(key=lambda j: j.finished)
        for job in finished:
            self.finished[job.id] = job
            if job.state == FAILED:  # the snapshot's recent failures survive a restart
                self.recent_failures.append(self._failure_record(job))
        counts["finished"] = len(finished)
        return counts

    def start_recovery(self) -> None:
        """Open the window in which workers may claim interrupted jobs (call when serving)."""
        self.recover_at = self.now + self.cfg.heartbeat * self.cfg.liveness

    # ------------------------------------------------------------------ clock
    def set_time(self, mono: float, wall: float) -> None:
        self.now = mono
        self.wall = wall

    # ------------------------------------------------------------------ bad input
    def count_bad(self, where: str, exc: ProtocolError) -> None:
        """Count a malformed or unexpected message; log at most one line per second."""
        key = f"{where}: {exc.reason}"
        self.bad[key] = self.bad.get(key, 0) + 1
        if self.now - self._bad_logged >= 1.0:
            self._bad_logged = self.now
            log.warning("dropped bad message on %s (%s); counting them in the status", where, exc)

    # ================================================================== clients
    def on_client(self, client: bytes, frames: list[bytes]) -> None:
        try:
            req = protocol.decode_client(frames)
        except ProtocolError as exc:
            self.count_bad("clients", exc)
            if frames and not frames[0]:  # a REQ envelope: the plain failure reply
                self.send_client(client, protocol.encode_plain_reply(None))
            elif frames:
                self.send_client(client, protocol.encode_invalid(str(exc)))
            return
        kind = type(req)
        if kind is protocol.Submit:
            self._submit(client, req.job_id, req.queue, req.timeout, req.tries, req.payload, PROTO)
        elif kind is protocol.SubmitMany:
            self._take_in(client, req.jobs, 0)
        elif kind is protocol.Plain:
            # Unguessable, so no other client can WAIT for, QUERY or CANCEL it by guessing.
            job_id = "req-" + self.tokens.next().decode()
            self._submit(client, job_id, protocol.DEFAULT_QUEUE, None, None, req.payload, PLAIN)
        elif kind is protocol.JobRef:
            self._job_ref(client, req.command, req.job_id)
        elif kind is protocol.Wait:
            # Many ids (a client catching up): outcomes batched like those of SUBMITS.
            how = PROTO if len(req.job_ids) == 1 else BATCH
            for job_id in req.job_ids:
                self._wait(client, job_id, how)
        elif kind is protocol.Unwait:
            for job_id in req.job_ids:
                job = self.jobs.get(job_id)
                if job is not None and job.waiters:
                    job.waiters = [w for w in job.waiters if w[0] != client]
        else:
            self.send_client(client, protocol.encode_pong(self.broker_id, self.limits))

    def _take_in(self, client: bytes, jobs: list[protocol.Submit], start: int) -> None:
        """Submit a batch's jobs, in steps; past the turn's budget the rest waits for the next
        turn (in order, before anything else a client sent), so no turn runs long."""
        submit = self._submit
        clock = self.clock
        n = len(jobs)
        while start < n:
            end = min(n, start + INTAKE_STEP)
            for sub in jobs[start:end]:
                submit(client, sub.job_id, sub.queue, sub.timeout, sub.tries, sub.payload, BATCH)
            start = end
            if start < n and clock() >= self.turn_ends:
                self._intake.append((client, jobs, start))
                return

    def intake_pending(self) -> bool:
        """Whether batched submissions wait to be taken in (read no new client message then)."""
        return bool(self._intake)

    def resume_intake(self) -> None:
        intake = self._intake
        while intake and self.clock() < self.turn_ends:
            self._take_in(*intake.popleft())

    def _submit(
        self, client: bytes, job_id: str, queue: str, timeout: float | None, tries: int | None,
        payload: list[bytes], how: int,
    ) -> None:
        job = self.jobs.get(job_id)
        if job is not None:  # same id again: attach, never run twice
            self.counters.resubmitted += 1
            if how != PLAIN:  # confirmed with this batch, so never before the original is durable
                self.unconfirmed.append((client, job.bid))
            if job.state in FINAL:
                self._tell(job, client, how)
            elif all(waiter != client for waiter, _ in job.waiters):  # one outcome per client
                job.waiters.append((client, how))
            return
        refusal = self._refusal(timeout, tries, payload)
        if refusal is not None:
            self.counters.refused += 1
            if how == PLAIN:
                self.send_client(client, protocol.encode_plain_reply(None))
            else:
                self.send_client(client, protocol.encode_refused(job_id, *refusal))
            return
        self._seq += 1
        job = Job(
            job_id, queue, payload, timeout or self.cfg.timeout, tries or self.cfg.tries,
            self._seq, self.wall,
        )
        job.waiters.append((client, how))
        self.jobs[job_id] = job
        self.counters.submitted += 1
        self.journal.submitted(job)
        if how != PLAIN:
            self.unconfirmed.append((client, job.bid))
        self._enqueue(job, front=False)

    def _refusal(
        self, timeout: float | None, tries: int | None, payload: list[bytes]
    ) -> tuple[str, str] | None:
        """Why a new job cannot be accepted (code, text), or None. O(frames), no scans."""
        cfg = self.cfg
        if not self.accepting:
            return protocol.REFUSE_SHUTDOWN, "the broker is stopping"
        if self.journal_problem is not None:
            return protocol.REFUSE_JOURNAL, f"journal unavailable: {self.journal_problem}"
        if timeout is not None and timeout > cfg.max_timeout:
            return (protocol.REFUSE_LIMIT,
                    f"timeout {_secs(timeout)}s is over the broker's max_timeout of "
                    f"{_secs(cfg.max_timeout)}s")
        if tries is not None and tries > cfg.max_tries:
            return (protocol.REFUSE_LIMIT,
                    f"tries {tries} is over the broker's max_tries of {cfg.max_tries}")
        size = sum(map(len, payload))
        if size > cfg.max_message_size:
            return (protocol.REFUSE_LIMIT, f"payload of {size} bytes is over the broker's "
                    f"max_message_size of {cfg.max_message_size} bytes")
        if len(self.jobs) - len(self.finished) >= cfg.max_queued:
            return (protocol.REFUSE_FULL,
                    f"broker full: {cfg.max_queued} jobs waiting or running (max_queued)")
        return None

    def _job_ref(self, client: bytes, command: bytes, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            self.send_client(client, protocol.encode_unknown(job_id))
        elif command == protocol.QUERY:
            self.send_client(client, protocol.encode_info(job_id, job.info(self.wall)))
        else:
            self.cancel(job)
            self.send_client(client, protocol.encode_info(job_id, job.info(self.wall)))

    def _wait(self, client: bytes, job_id: str, how: int) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            self.send_client(client, protocol.encode_unknown(job_id))
        elif job.state in FINAL:
            self._tell(job, client, how)
        elif all(waiter != client for waiter, _ in job.waiters):  # also if it sent SUBMITS
            job.waiters.append((client, how))

    def send_results(self) -> None:
        """End of a loop turn: one RESULTS per client for its batched jobs that ended."""
        if not self.outbox:
            return
        limit = MAX_RESULTS_BYTES
        for client, jobs in self.outbox.items():
            batch: list[tuple[bytes, list[bytes]]] = []
            size = 0
            for job in jobs:
                result = job.result or [b""]
                n = sum(map(len, result))
                if batch and size + n > limit:  # bounded messages: a slow reader costs little
                    self.send_client(client, protocol.encode_results(batch))
                    batch, size = [], 0
                batch.append((job.bid, result))
                size += n
            self.send_client(client, protocol.encode_results(batch))
        self.outbox.clear()

    def maybe_flush(self) -> None:
        """Group commit, called once per loop turn: flush now, or by ``next_wake()``.

        After a quiet spell a change is committed (and confirmed) in the turn it arrives;
        under load at most once per ``commit_interval``, so one transaction and one
        ACCEPTED per client cover many jobs.
        """
        if not (self.unconfirmed or self.journal.dirty()):
            return
        due = self._committed + self.cfg.commit_interval
        if self.journal_problem is not None and self._journal_retry_at > due:
            due = self._journal_retry_at
        if self.now >= due or (len(self.unconfirmed) >= COMMIT_BATCH and self.journal_problem is None):
            self.flush()
        else:
            self._commit_due = due

    def flush(self) -> bool:
        """Make everything durable now, then confirm submissions (ACCEPTED after the journal).

        Returns False if the journal could not be written: nothing is confirmed then; the
        changes stay buffered and the commit is retried with a growing delay.
        """
        self._commit_due = math.inf
        if not (self.unconfirmed or self.journal.dirty()):
            return True
        self._committed = self.now
        try:
            self.journal.commit()
        except JournalWriteError as exc:
            self._journal_failed(str(exc))
            return False
        if self.journal_problem is not None:
            log.warning("journal writable again after %.1fs; new submissions are accepted again",
                        self.now - self.journal_problem_since)
            self.journal_problem = None
            self._journal_retry = JOURNAL_RETRY
        if self.unconfirmed:
            # One ACCEPTED per client per batch, naming every job it confirms.
            batches: dict[bytes, list[bytes]] = {}
            for client, bid in self.unconfirmed:
                ids = batches.get(client)
                if ids is None:
                    batches[client] = [bid]
                else:
                    ids.append(bid)
            self.unconfirmed.clear()
            for client, ids in batches.items():
                self.send_client(client, protocol.encode_accepted(ids))
        return True

    def _journal_failed(self, why: str) -> None:
        """Keep running on what is in memory; refuse new work until the journal takes writes."""
        if self.journal_problem is None:
            self.journal_problem_since = self.now
            log.error("cannot write the journal: %s. Refusing new submissions; jobs already "
                      "confirmed keep running and their outcomes are written once it recovers. "
                      "Retrying.", why)
        elif why != self.journal_problem:
            log.error("journal still failing: %s", why)
        self.journal_problem = why
        self._journal_retry_at = self.now + self._journal_retry
        self._journal_retry = min(JOURNAL_RETRY_MAX, self._journal_retry * 2)
        self._commit_due = self._journal_retry_at

    def _tell(self, job: Job, client: bytes, how: int) -> None:
        """Send a finished job's outcome to one client (batched results: at end of turn)."""
        if how == BATCH and job.state == DONE:
            jobs = self.outbox.get(client)
            if jobs is None:
                self.outbox[client] = [job]
            else:
                jobs.append(job)
        elif how == PLAIN:
            payload = job.result if job.state == DONE else None
            self.send_client(client, protocol.encode_plain_reply(payload))
        elif job.state == DONE:
            self.send_client(client, protocol.encode_result(job.bid, job.result or [b""]))
        elif job.state == FAILED:
            self.send_client(client, protocol.encode_failed(job.bid, job.reason, job.error))
        else:
            self.send_client(client, protocol.encode_cancelled(job.bid))

    def cancel(self, job: Job) -> None:
        if job.state in FINAL:
            return
        if job.state == QUEUED:
            self._unqueue(job)
        self._finish(job, CANCELLED, protocol.FAIL_CANCELLED, "cancelled by a client")

    # ================================================================== dispatch
    def _unqueue(self, job: Job) -> None:
        """Take a queued job out of its queue in O(1); its entry is skipped later."""
        if self.recovering.pop(job.id, None) is not None:
            return
        job.qtoken += 1
        self._dec_depth(job.queue)

    def _dec_depth(self, queue: str) -> None:
        left = self.depth[queue] - 1
        if left:
            self.depth[queue] = left
        else:  # nothing live left: forget the queue and its stale entries
            del self.depth[queue]
            self.pending.pop(queue, None)

    def _head(self, queue: str) -> Job | None:
        """The oldest live job of a queue, dropping stale entries on the way."""
        d = self.pending.get(queue)
        while d:
            token, job = d[0]
            if job.qtoken == token:
                return job
            d.popleft()
        return None

    def _take(self, job: Job) -> None:
        """Remove a live job from its queue for dispatch."""
        job.qtoken += 1
        self._dec_depth(job.queue)

    def _enqueue(self, job: Job, front: bool) -> None:
        job.state = QUEUED
        job.worker = None
        if front:  # a retry or a give-back: the journal must know the attempt count
            self.journal.attempted(job)
        ready = self.ready.get(job.queue)
        while ready:
            w = self._pick(ready, job) if job.tried else next(iter(ready.values()))
            if self.now - w.last_seen <= w.expiry:
                self._assign(job, w)
                return
            # Idle but silent past its expiry (dead; the sweep has not run yet): never
            # hand it a job, which would only burn a try.
            self.counters.lost_workers += 1
            self._drop_worker(w, "stopped answering")
            ready = self.ready.get(job.queue)
        q = self.pending.get(job.queue)
        if q is None:
            q = self.pending[job.queue] = deque()
        job.qtoken += 1
        if front:
            q.appendleft((job.qtoken, job))
        else:
            q.append((job.qtoken, job))
        self.depth[job.queue] = self.depth.get(job.queue, 0) + 1

    @staticmethod
    def _pick(ready: dict[bytes, WorkerRec], job: Job) -> WorkerRec:
        """Prefer a ready worker that has not tried this job yet (bounded scan)."""
        first = None
        for i, w in enumerate(ready.values()):
            if first is None:
                first = w
            if w.name not in job.tried:
                return w
            if i >= RETRY_SCAN:
                break
        assert first is not None
        return first

    def _assign(self, job: Job, w: WorkerRec) -> None:
        self._unready(w)
        job.attempt += 1
        job.state = RUNNING
        job.worker = w
        if not job.started:
            job.started = self.wall
        job.tried.append(w.name)
        self._start_clock(job)
        token = self.tokens.next()
        if job.tokens is None:
            job.tokens = {token: job.attempt}
        else:
            job.tokens[token] = job.attempt
        w.job = job
        w.job_id = job.id
        w.attempt = job.attempt
        w.token = token
        w.since = self.now
        self.journal.attempted(job)
        self.send_worker(
            w.wid,
            protocol.encode_job(job.bid, job.attempt, job.timeout, token, job.payload or [b""]),
        )

    def _start_clock(self, job: Job) -> None:
        """The attempt's deadline: in-flight group of its timeout, and the earliest wake."""
        job.deadline = deadline = self.now + job.timeout
        group = self.inflight.get(job.timeout)
        if group is None:
            group = self.inflight[job.timeout] = OrderedDict()
        group[job.id] = job
        if deadline < self._earliest:
            self._earliest = deadline

    def _unready(self, w: WorkerRec) -> None:
        if w.ready:
            w.ready = False
            for q in w.queues:
                ready = self.ready.get(q)
                if ready is not None:
                    ready.pop(w.wid, None)
                    if not ready:
                        del self.ready[q]

    def _make_ready(self, w: WorkerRec) -> bool:
        """The worker asked for a job: give it the oldest waiting one it serves (True), or
        park it (False)."""
        best: Job | None = None
        for q in w.queues:
            head = self._head(q)
            if head is not None and (best is None or head.seq < best.seq):
                best = head
        if best is not None:
            job = best
            if (job.tried and w.name in job.tried and self.depth[job.queue] > 1
                    and self.serving.get(job.queue, 0) > 1):
                # Leave a retry for another worker when this one already failed it and
                # there is other work for this one (a bounded look further down).
                for i, (token, other) in enumerate(self.pending[job.queue]):
                    if other is not job and other.qtoken == token:
                        job = other
                        break
                    if i >= RETRY_SCAN:
                        break
            self._take(job)
            self._assign(job, w)
            return True
        w.ready = True
        for q in w.queues:
            ready = self.ready.get(q)
            if ready is None:
                ready = self.ready[q] = {}
            ready[w.wid] = w
        return False

    def _stop_running(self, job: Job) -> None:
        group = self.inflight.get(job.timeout)
        if group is not None and group.pop(job.id, None) is not None and not group:
            del self.inflight[job.timeout]

    def _attempt_failed(self, job: Job, reason: str, error: str) -> None:
        """The current attempt is over without a result: retry, or fail after the last try."""
        self._stop_running(job)
        if error:
            job.error = error
        if job.attempt >= job.tries:
            self._finish(job, FAILED, reason, job.error or reason)
        else:
            self.counters.retried += 1
            self._enqueue(job, front=True)

    def _finish(self, job: Job, state: str, reason: str = "", error: str = "") -> None:
        if job.state == RUNNING:
            self._stop_running(job)
        job.state = state
        job.worker = None
        job.tokens = None  # no attempt of an ended job can change it
        job.finished = self.wall
        job.reason = reason
        if error:
            job.error = error
        job.payload = None  # the result is what matters now; free the input
        if state == DONE:
            self.counters.done += 1
        elif state == FAILED:
            self.counters.failed += 1
            self.recent_failures.append(self._failure_record(job))
        else:
            self.counters.cancelled += 1
        self.journal.finished(job)
        for client, how in job.waiters:
            self._tell(job, client, how)
        job.waiters = []
        self.finished[job.id] = job

    @staticmethod
    def _failure_record(job: Job) -> dict[str, Any]:
        summary = (job.error or "").strip().split("\n", 1)[0]  # an error text's first line
        return {"id": job.id, "queue": job.queue, "reason": job.reason,
                "error": summary[:500], "attempts": job.attempt, "at": job.finished}

    # ================================================================== workers
    def on_worker(self, wid: bytes, frames: list[bytes]) -> None:
        try:
            msg = protocol.decode_worker(frames)
        except ProtocolError as exc:
            self.count_bad("workers", exc)
            if exc.reason == "unsupported version":
                self._tell_old_version(wid, frames, exc)
            elif frames and frames[0].startswith(b"RWW3 HELLO"):
                # A worker whose HELLO is refused would otherwise wait for a WELCOME forever.
                self._tell_refused_hello(wid, exc)
            return
        w = self.workers.get(wid)
        kind = type(msg)
        if w is not None:
            w.last_seen = self.now
            if kind is protocol.WorkerResult:
                self._worker_result(w, msg)
            elif kind is protocol.Heartbeat:
                pass
            elif kind is protocol.WorkerError:
                self._worker_error(w, msg)
            elif kind is protocol.Hello:
                self._supersede(w, msg, "re-registered")
                self._hello(wid, msg)
            elif kind is protocol.Return:
                self._worker_return(w, msg)
            elif kind is protocol.Vacate:
                self._vacate(msg.slot)
            else:  # Bye: a job it holds crossed its goodbye and was never started
                self._give_back(w)
                self._drop_worker(w, "said goodbye")
        elif kind is protocol.Hello:
            self._hello(wid, msg)
        elif kind is protocol.Vacate:
            self._vacate(msg.slot)  # a pool, which never registers, says a child died
        elif kind is not protocol.Bye:
            # Not registered (typically: this broker restarted, or ZeroMQ reconnected the
            # worker's socket under a new routing id). Nothing it says counts until it has
            # registered; a worker keeps its answer and sends it again after its HELLO.
            if kind is not protocol.Heartbeat:
                self.count_bad("workers", ProtocolError(
                    f"{frames[0].split(b' ', 2)[1].decode()} from an unregistered worker"))
            self.send_worker(wid, protocol.encode_disconnect("unknown worker, say HELLO"))

    def _tell_refused_hello(self, wid: bytes, exc: ProtocolError) -> None:
        """Say why a HELLO was refused (at most once a second: the worker will say it again)."""
        if self.now - self._hello_told < 1.0:
            return
        self._hello_told = self.now
        self.send_worker(wid, protocol.encode_disconnect(f"HELLO refused: {exc}"))

    def _tell_old_version(self, wid: bytes, frames: list[bytes], exc: ProtocolError) -> None:
        """Tell a worker of another protocol version why it is ignored (at most once a second:
        it reconnects when told, and must not spin)."""
        if self.now - self._version_told < 1.0:
            return
        self._version_told = self.now
        version = frames[0][:4]
        self.send_worker(wid, protocol.encode_disconnect(
            f"{exc}; upgrade respworkers on this worker to the broker's version {__version__}",
            version))

    def _hello(self, wid: bytes, msg: protocol.Hello) -> None:
        w = WorkerRec(wid, msg.queues, msg.info, self.now)
        beat = msg.info.get("heartbeat")
        if isinstance(beat, bool) or not isinstance(beat, (int, float)):
            beat = 0.0
        # A worker may beat more slowly than the broker, within reason.
        interval = min(max(self.cfg.heartbeat, beat), MAX_WORKER_HEARTBEAT)
        w.expiry = interval * self.cfg.liveness
        if w.slot is not None:
            self._replace_slot(w, msg)
        self.workers[wid] = w
        for q in w.queues:
            self.serving[q] = self.serving.get(q, 0) + 1
        self.send_worker(wid, self._welcome)
        if msg.job_id is None:
            self._make_ready(w)
            return
        # Re-registering mid-job (the broker restarted under it, or its link dropped): it
        # holds this job. It is not made ready until it answers.
        w.job_id = msg.job_id
        w.attempt = msg.attempt
        w.token = msg.token
        job = self.jobs.get(msg.job_id)
        if job is None or job.state in FINAL:
            return  # its answer will match its claim and be dropped, uncounted
        tokens = job.tokens
        if tokens is None or tokens.get(msg.token) != msg.attempt:
            # Not an attempt this broker (or its journal) sent: a forgery, or a dispatch
            # that a broker crash kept out of the journal. Its answer will be dropped.
            self.count_bad("workers", ProtocolError(
                "HELLO claiming an attempt with a wrong token", msg.job_id))
            return
        w.job = job
        holder = job.worker
        if job.state == RUNNING and (holder is None or self.workers.get(holder.wid) is not holder):
            job.worker = w  # the same process, reconnected with its job in hand
        elif job.state == QUEUED:
            self._unqueue(job)
            job.attempt = max(job.attempt, msg.attempt)
            job.state = RUNNING
            job.worker = w
            self._start_clock(job)
            if not job.tried or job.tried[-1] != w.name:
                job.tried.append(w.name)
            self.journal.attempted(job)

    def _replace_slot(self, w: WorkerRec, msg: protocol.Hello) -> None:
        """A pool slot has a new process, or the same one reconnected on a new socket.

        A restarted child replaces its dead predecessor at once (its attempt failed:
        a crash counts as a try) instead of after the heartbeat expiry. A process that
        reconnects holding the same attempt keeps it. Slots are secret (a pool picks
        them at random and the broker never shows them), so only the pool's own
        processes can take one over.
        """
        old_wid = self.slots.get(w.slot)  # type: ignore[arg-type]
        old = self.workers.get(old_wid) if old_wid is not None else None
        if old is not None and old.wid != w.wid:
            self._supersede(old, msg, "was replaced by a new process")
        self.slots[w.slot] = w.wid  # type: ignore[index]

    def _vacate(self, slot: str) -> None:
        """A pool saw the process in ``slot`` die: fail its attempt now, not at heartbeat expiry."""
        wid = self.slots.get(slot)
        w = self.workers.get(wid) if wid is not None else None
        if w is not None:
            self.counters.lost_workers += 1
            self._drop_worker(w, "died (its pool saw it exit)")

    def _supersede(self, old: WorkerRec, msg: protocol.Hello, why: str) -> None:
        """Drop a record a new HELLO replaces. If the HELLO claims the very attempt the old
        record holds, the attempt moves to the new record instead of failing."""
        if (msg.job_id is not None and old.job_id == msg.job_id and old.attempt == msg.attempt
                and old.token == msg.token):
            self._release(old)
        self._drop_worker(old, why)

    @staticmethod
    def _release(w: WorkerRec) -> None:
        w.job = None
        w.job_id = None
        w.attempt = 0
        w.token = b""

    def _after_job(self, w: WorkerRec, job_id: bytes, attempt: int, ready: bool) -> None:
        """A worker that says ``ready`` gets the next job; one that does not is leaving.

        The JOB, or else an ACK, tells the worker its answer was applied: it keeps the
        answer (to send again after a reconnect) until then.
        """
        w.stopping = not ready
        if not (ready and self._make_ready(w)):
            self.send_worker(w.wid, protocol.encode_ack(job_id, attempt))

    def _holds(self, w: WorkerRec, job_id: str, attempt: int, token: bytes, what: str) -> bool:
        if w.job_id == job_id and w.attempt == attempt and w.token == token:
            return True
        self.count_bad(
            "workers", ProtocolError(f"{what} for a job the worker does not hold", job_id)
        )
        return False

    def _close_attempt(self, w: WorkerRec) -> Job | None:
        """The worker answered or gave back its attempt: it holds nothing now, and the
        attempt's token can no longer be used."""
        job = w.job
        if job is not None and job.tokens is not None:
            job.tokens.pop(w.token, None)
        self._release(w)
        return job

    def _worker_result(self, w: WorkerRec, msg: protocol.WorkerResult) -> None:
        if not self._holds(w, msg.job_id, msg.attempt, msg.token, "RESULT"):
            return
        w.done += 1
        job = self._close_attempt(w)
        if job is not None:
            self._complete(job, w, msg.payload)
        self._after_job(w, msg.job_id.encode(), msg.attempt, msg.ready)

    def _complete(self, job: Job, w: WorkerRec, payload: list[bytes]) -> None:
        state = job.state
        if state in FINAL:
            self.counters.duplicates += 1
            return
        if state == QUEUED:  # a timed-out attempt answered before its retry started
            self._unqueue(job)
            self.counters.late += 1
        elif job.worker is not w:
            self.counters.late += 1
        job.result = payload
        self._finish(job, DONE)

    def _worker_error(self, w: WorkerRec, msg: protocol.WorkerError) -> None:
        if not self._holds(w, msg.job_id, msg.attempt, msg.token, "ERROR"):
            return
        w.failed += 1
        holder = w.job is not None and w.job.worker is w
        job = self._close_attempt(w)
        if job is not None and job.state not in FINAL:
            if holder and job.state == RUNNING:
                self._attempt_failed(job, protocol.FAIL_ERROR, msg.error)
            else:  # an older attempt of a job already retried: keep its error for inspect
                job.error = msg.error
        self._after_job(w, msg.job_id.encode(), msg.attempt, msg.ready)

    def _worker_return(self, w: WorkerRec, msg: protocol.Return) -> None:
        """A worker forced to stop hands its job back; this attempt does not count as a try."""
        if not self._holds(w, msg.job_id, msg.attempt, msg.token, "RETURN"):
            return
        self._give_back(w)
        w.stopping = True

    def _give_back(self, w: WorkerRec) -> None:
        holder = w.job is not None and w.job.worker is w
        job = self._close_attempt(w)
        if job is not None and job.state == RUNNING and holder:
            self._stop_running(job)
            job.attempt -= 1
            job.tried.pop()
            self._enqueue(job, front=True)

    def revoke_worker(self, wid: bytes) -> None:
        """Its key was revoked: forget it now. Its job goes back to the queue, uncharged
        (the job is not at fault), and nothing it sends is listened to any more."""
        w = self.workers.get(wid)
        if w is not None:
            self._give_back(w)
            self._drop_worker(w, "had its key revoked")

    def _drop_worker(self, w: WorkerRec, why: str) -> None:
        """Forget a worker; its current attempt, if any, failed (a crash counts as a try).

        The attempt's token stays valid: a worker that comes back with it (HELLO naming
        the job) may still deliver its answer while the job is unfinished.
        """
        if self.workers.get(w.wid) is not w:
            return
        del self.workers[w.wid]
        for q in w.queues:
            left = self.serving[q] - 1
            if left:
                self.serving[q] = left
            else:
                del self.serving[q]
        if w.slot is not None and self.slots.get(w.slot) == w.wid:
            del self.slots[w.slot]
        self._unready(w)
        job = w.job
        if job is not None and job.state == RUNNING and job.worker is w:
            self._attempt_failed(
                job, protocol.FAIL_LOST, f"worker {w.name} {why} while running attempt {w.attempt}"
            )
        w.job = None

    # ================================================================== timers
    def tick(self) -> float:
        """Expire attempts and silent workers, send heartbeats; return when to tick next."""
        now = self.now
        if self.recovering and now >= self.recover_at:
            # Nobody claimed them: they were running, so they go first, oldest first.
            for job in sorted(self.recovering.values(), key=lambda j: j.seq, reverse=True):
                self._enqueue(job, front=True)
            self.recovering.clear()
        for timeout in list(self.inflight):
            group = self.inflight.get(timeout)
            while group:
                job = next(iter(group.values()))
                if job.deadline > now:
                    break
                holder = job.worker
                self._attempt_failed(
                    job, protocol.FAIL_TIMEOUT,
                    f"no answer within {job.timeout:g}s (attempt {job.attempt} of {job.tries}"
                    f" on {holder.name if holder else '?'})",
                )
        # Over every group as it is now: a retry dispatched above may have started a group
        # (or refilled one) that the loop did not look at. O(distinct time limits).
        self._earliest = min((next(iter(g.values())).deadline for g in self.inflight.values()),
                             default=math.inf)
        if now >= self._next_beat:
            self._next_beat = now + self.cfg.heartbeat
            self._heartbeat(now)
        return self.next_wake()

    def next_wake(self) -> float:
        """When :meth:`tick` is due: O(1), from a lower bound kept as deadlines are set."""
        wake = min(self._next_beat, self._earliest, self._commit_due)
        if self.recovering and self.recover_at < wake:
            wake = self.recover_at
        return wake

    def _heartbeat(self, now: float) -> None:
        beat = protocol.HEARTBEAT_FRAMES
        dead = [w for w in self.workers.values() if now - w.last_seen > w.expiry]
        for w in dead:  # first, so no job of a dead worker is handed to another dead one
            self._unready(w)
        for w in dead:
            self.counters.lost_workers += 1
            log.warning("worker %s silent for %.1fs: dropping it", w.name, now - w.last_seen)
            self._drop_worker(w, "stopped answering")
        for wid in self.workers:
            self.send_worker(wid, beat)
        self._expire_finished()
        c = self.counters
        self.rates.append((now, c.submitted, c.done, c.failed))
        while len(self.rates) > 2 and now - self.rates[0][0] > RATE_WINDOW:
            self.rates.popleft()

    def _expire_finished(self) -> None:
        horizon = self.wall - self.cfg.retention
        limit = self.cfg.max_retained
        finished = self.finished
        while finished:
            job = next(iter(finished.values()))
            if job.finished > horizon and len(finished) <= limit:
                break
            finished.popitem(last=False)
            if self.jobs.get(job.id) is job:
                del self.jobs[job.id]
            self.journal.forget(job)

    # ================================================================== status
    def snapshot(self) -> dict[str, Any]:
        now, wall = self.now, self.wall
        queues: dict[str, dict[str, int]] = {}

        def entry(name: str) -> dict[str, int]:
            e = queues.get(name)
            if e is None:
                e = queues[name] = {"queued": 0, "running": 0, "workers": 0, "idle": 0}
            return e

        for name, n in self.depth.items():
            entry(name)["queued"] = n
        for job in self.recovering.values():  # held back after a restart: queued too
            entry(job.queue)["queued"] += 1
        workers = []
        for w in self.workers.values():
            for q in w.queues:
                e = entry(q)
                e["workers"] += 1
                e["idle"] += w.ready
            if w.job is not None and w.job.state == RUNNING and w.job.worker is w:
                entry(w.job.queue)["running"] += 1
            workers.append({
                "id": w.wid.hex(),
                "name": w.name,
                "host": w.info.get("host"),
                "pid": w.info.get("pid"),
                "queues": list(w.queues),
                "state": w.state,
                "job": w.job_id,
                "attempt": w.attempt or None,
                "busy_for": round(now - w.since, 3) if w.job_id is not None else None,
                "done": w.done,
                "failed": w.failed,
                "last_seen": round(now - w.last_seen, 3),
                "registered": round(now - w.registered, 3),
            })
        rates: dict[str, float] = {"submitted": 0.0, "done": 0.0, "failed": 0.0}
        if len(self.rates) >= 2:
            t0, s0, d0, f0 = self.rates[0]
            t1, s1, d1, f1 = self.rates[-1]
            if t1 > t0:
                dt = t1 - t0
                rates = {"submitted": (s1 - s0) / dt, "done": (d1 - d0) / dt, "failed": (f1 - f0) / dt}
        return {
            "broker": {
                "id": self.broker_id,
                "version": __version__,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": self.started_wall,
                "uptime": round(wall - self.started_wall, 3),
                "endpoints": self.endpoints,
                "defaults": {"timeout": self.cfg.timeout, "tries": self.cfg.tries},
                "accepting": self.accepting,
                "journal": {**self.journal.describe(), "problem": self.journal_problem,
                            "problem_for": round(now - self.journal_problem_since, 1)
                            if self.journal_problem else None},
            },
            "workers": workers,
            "queues": queues,
            "queued": sum(self.depth.values()) + len(self.recovering),
            "in_flight": sum(len(g) for g in self.inflight.values()),
            "retained": len(self.finished),
            "totals": self.counters.as_dict(),
            "rates": {k: round(v, 2) for k, v in rates.items()},
            "bad_messages": dict(self.bad),
            "recent_failures": list(self.recent_failures),
            "time": wall,
        }
