"""The broker's job transitions: submit, assign, finish, fail an attempt, give back,
answers and dispatch. docs/protocol.md sections 7 to 10 in code.

No sockets here: the server feeds decoded traffic in, and the core answers through two
callables, so it can be driven step by step in tests with a fake clock. Each concern it
uses has a module of its own: the job model (``model``), queues (``queues``), the worker
registry (``workers``), time limits (``deadlines``), the timetable and retry policy
(``timetable``, ``policy``), telling clients (``notify``), the group commit (``commits``,
over the ``journal``) and statistics (``stats``). What clients ask is routed in
``requests``, workers coming and going in ``registry``, what time does in ``timers``, and
a restart in ``recovery``. Every per-message path is O(1) in the number of jobs and
workers; what scans runs at the heartbeat tick.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable

from .. import __version__, protocol
from ..config import BrokerConfig
from ..errors import ProtocolError
from ..util import RateLimit
from . import recovery, registry, requests, stats, timers, trace
from .commits import GroupCommit
from .deadlines import Deadlines
from .journal import Journal, NullJournal
from .model import (
    DEFAULT_PRIORITY,
    DONE,
    ENDED,
    EXPIRED,
    FAILED,
    QUEUED,
    RUNNING,
    SCHEDULED,
    WAITING,
    Job,
    JobState,
    Waiter,
    Waiters,
)
from .notify import Notifier, SendFn
from .policy import RetryPolicy
from .queues import Queues
from .timetable import Due, Timetable
from .workers import RETRY_SCAN, WorkerRec, Workers

if TYPE_CHECKING:
    from .metrics import Recorder

log = logging.getLogger(__name__)

#: Jobs of a SUBMITS taken in between two looks at the clock (loop turns are bounded in time).
INTAKE_STEP = 64

PROTO, PLAIN, BATCH = Waiter.PROTO, Waiter.PLAIN, Waiter.BATCH


def _secs(value: float) -> str:
    """Seconds to the millisecond, never rounded so that two different values print alike."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


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
        self.accepting = True
        self.jobs: dict[str, Job] = {}  # every job held: unfinished and retained
        self.finished: OrderedDict[str, Job] = OrderedDict()  # retained, oldest end first
        self.queues = Queues(cfg.tenant_weights)
        self.workers = Workers(self.queues)
        self.deadlines = Deadlines()
        self.timetable = Timetable()
        self.policy = RetryPolicy(cfg)
        # Who holds each attempt that may still answer (its token): told to stop when the
        # job ends, so no worker keeps working for a job that is over.
        self.holders: dict[bytes, WorkerRec] = {}
        self.notifier = Notifier(send_client)
        self.commits = GroupCommit(self.journal, self.notifier, cfg.commit_interval)
        self.stats = stats.Stats()
        self.counters = self.stats.counters
        self.tokens = protocol.RandomHex()  # attempt tokens
        self.journal.bind(self.jobs)
        # Whether a job's steps are logged (trace): read once per heartbeat, not per step.
        self._debug = trace.log.isEnabledFor(logging.DEBUG)
        # Per-job observations for Prometheus ([broker] metrics), None when off: the hot
        # paths then pay one `is not None`.
        self.metrics: Recorder | None = None
        # Loop turns are bounded in time: the server sets when this turn's budget ends; a
        # batch of submissions still unfinished then is continued in the next turn.
        self.clock: Callable[[], float] = time.monotonic
        self.turn_ends = math.inf
        self._intake: deque[tuple[bytes, list[protocol.Submit], int]] = deque()
        self._seq = 0
        self._waiters: Waiters = ((b"", PROTO),)  # the last new job's (tuples: never changed)
        self._next_beat = 0.0
        self._told_version = RateLimit()  # a worker of another version is told why at most
        self._told_hello = RateLimit()  # once a second, and so is one whose HELLO is refused
        self._welcome = protocol.encode_welcome(
            self.broker_id, cfg.heartbeat, cfg.liveness, cfg.max_message_size)
        self.limits = {"max_message_size": cfg.max_message_size, "max_queued": cfg.max_queued,
                       "max_timeout": cfg.max_timeout, "max_tries": cfg.max_tries}

    # ------------------------------------------------------------------ restart
    def restore(self, stored: Iterable[Job], progress: Callable[[int], None] | None = None
                ) -> dict[str, int]:
        """Rebuild state from the journal after a restart (see recovery.restore)."""
        return recovery.restore(self, stored, progress)

    def start_recovery(self) -> None:
        """Open the window in which workers may claim held jobs (call when serving)."""
        self.queues.release_at = self.now + self.cfg.heartbeat * self.cfg.liveness

    def record_metrics(self, recorder: Recorder) -> None:
        """Observe queue waits, run times, ends and journal commits from now on."""
        self.metrics = self.commits.metrics = recorder

    # ------------------------------------------------------------------ clock
    def set_time(self, mono: float, wall: float) -> None:
        self.now = mono
        self.wall = wall

    def count_bad(self, where: str, exc: ProtocolError) -> None:
        self.stats.count_bad(where, exc, self.now)

    # ================================================================== clients
    def on_client(self, client: bytes, frames: list[bytes]) -> None:
        requests.handle(self, client, frames)

    def _take_in(self, client: bytes, jobs: list[protocol.Submit], start: int) -> None:
        """Submit a batch's jobs, in steps; past the turn's budget the rest waits for the next
        turn (in order, before anything else a client sent), so no turn runs long."""
        submit = self.submit
        clock = self.clock
        n = len(jobs)
        while start < n:
            end = min(n, start + INTAKE_STEP)
            for sub in jobs[start:end]:
                submit(client, sub, BATCH)
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

    def submit(self, client: bytes, sub: protocol.Submit, how: Waiter) -> None:
        """A new job, or the same id again: one id is one job, never run twice."""
        job = self.jobs.get(sub.job_id)
        if job is not None:
            self.counters.resubmitted += 1
            if how is not PLAIN:  # confirmed with this batch: never before the original is durable
                self.notifier.confirm_later(client, job)
            if job.state in ENDED:
                self.notifier.tell(job, client, how)
            else:
                Notifier.wait(job, client, how)
            return
        refusal = self._refusal(sub)
        if refusal is not None:
            self.counters.refused += 1
            if how is PLAIN:
                self.send_client(client, protocol.encode_plain_reply(None))
            else:
                self.send_client(client, protocol.encode_refused(sub.job_id, *refusal))
            return
        self._seq += 1
        cfg = self.cfg
        opts = sub.options
        if opts is protocol.NO_OPTIONS:  # the common case, kept short
            job = Job(sub.job_id, sub.queue, sub.payload, cfg.timeout, cfg.tries, self._seq,
                      self.wall)
        else:
            job = Job(sub.job_id, sub.queue, sub.payload, opts.timeout or cfg.timeout,
                      opts.tries or cfg.tries, self._seq, self.wall,
                      DEFAULT_PRIORITY if opts.priority is None else opts.priority,
                      opts.tenant or "")
            job.backoff, job.backoff_max = opts.backoff, opts.backoff_max
            if opts.expires is not None:
                job.expires_at = self.wall + opts.expires
                self.timetable.add(job.expires_at, Due.EXPIRE, job)
            if opts.delay:
                job.not_before = self.wall + opts.delay
        waiters = self._waiters
        if waiters[0][0] is not client or waiters[0][1] is not how:  # shared by a batch's jobs
            waiters = self._waiters = ((client, how),)
        job.waiters = waiters
        self.jobs[sub.job_id] = job
        self.counters.submitted += 1
        if self._debug:
            trace.accepted(job, opts)
        self.journal.submitted(job)
        if how is not PLAIN:
            self.notifier.confirm_later(client, job)
        if job.not_before:
            self._schedule(job)
        else:
            self._enqueue(job, front=False)

    def _refusal(self, sub: protocol.Submit) -> tuple[str, str] | None:
        """Why a new job cannot be accepted (code, text), or None. O(frames), no scans."""
        cfg = self.cfg
        if not self.accepting:
            return protocol.REFUSE_SHUTDOWN, "the broker is stopping"
        if self.commits.problem is not None:
            return protocol.REFUSE_JOURNAL, f"journal unavailable: {self.commits.problem}"
        opts = sub.options
        if opts.timeout is not None and opts.timeout > cfg.max_timeout:
            return (protocol.REFUSE_LIMIT, f"timeout {_secs(opts.timeout)}s is over the broker's "
                    f"max_timeout of {_secs(cfg.max_timeout)}s")
        if opts.tries is not None and opts.tries > cfg.max_tries:
            return (protocol.REFUSE_LIMIT,
                    f"tries {opts.tries} is over the broker's max_tries of {cfg.max_tries}")
        size = sum(map(len, sub.payload))
        if size > cfg.max_message_size:
            return (protocol.REFUSE_LIMIT, f"payload of {size} bytes is over the broker's "
                    f"max_message_size of {cfg.max_message_size} bytes")
        if len(self.jobs) - len(self.finished) >= cfg.max_queued:
            return (protocol.REFUSE_FULL,
                    f"broker full: {cfg.max_queued} jobs waiting or running (max_queued)")
        return None

    def wait(self, client: bytes, job_id: str, how: Waiter) -> None:
        requests.wait(self, client, job_id, how)

    def watch(self, client: bytes, job_id: str) -> None:
        """Send ``client`` the job's progress: what is known now, then each change."""
        requests.watch(self, client, job_id)

    def cancel(self, job: Job) -> None:
        """A waiting or running job ends cancelled; its running attempts are told to stop."""
        requests.cancel(self, job)

    def _unwait(self, job: Job) -> None:
        """Take a queued or scheduled job out of where it waits."""
        if job.state is QUEUED:
            self.queues.remove(job)
        elif job.state is SCHEDULED:
            self.queues.unschedule(job)

    def send_results(self) -> None:
        """End of a loop turn: batched results leave."""
        self.notifier.send_results()

    # ================================================================== workers
    def on_worker(self, wid: bytes, frames: list[bytes]) -> None:
        try:
            msg = protocol.decode_worker(frames)
        except ProtocolError as exc:
            self.count_bad("workers", exc)
            if exc.reason == "unsupported version":
                if self._told_version.allow(self.now):  # it reconnects when told: no spinning
                    self.send_worker(wid, protocol.encode_disconnect(
                        f"{exc}; upgrade respworkers on this worker to the broker's version "
                        f"{__version__}", frames[0][:4]))
            elif frames and frames[0].startswith(b"RWW3 HELLO") and self._told_hello.allow(self.now):
                # A worker whose HELLO is refused would otherwise wait for a WELCOME forever.
                self.send_worker(wid, protocol.encode_disconnect(f"HELLO refused: {exc}"))
            return
        w = self.workers.get(wid)
        if w is not None:
            w.last_seen = self.now
            if w.unacked is not None:  # it speaks while idle: confirm its answer now
                self.send_owed_ack(w)
            if isinstance(msg, (protocol.WorkerResult, protocol.WorkerError)):
                self._answered(w, msg)
            elif isinstance(msg, protocol.Answers):
                self._answers(w, msg.answers)
            elif isinstance(msg, protocol.Heartbeat):
                pass
            elif isinstance(msg, protocol.WorkerProgress):
                if self._holds(w, msg, "PROGRESS"):
                    self._progress(w, msg.progress)
            elif isinstance(msg, protocol.Hello):
                registry.supersede(self, w, msg, "re-registered")
                self.hello(wid, msg)
            elif isinstance(msg, protocol.Return):
                if w.held and not w.holds(msg.job_id, msg.attempt, msg.token):
                    self._return_held(w, msg)  # a prefetched job it will not start
                elif self._holds(w, msg, "RETURN"):
                    self.give_back(w)
                    if w.held:
                        self._promote(w)
                    w.stopping = True
            elif isinstance(msg, protocol.Vacate):
                self.vacate(msg.slot, msg.incarnation)
            else:  # Bye: a job it holds crossed its goodbye and was never started
                self.give_back(w)
                self.drop_worker(w, "said goodbye")
        elif isinstance(msg, protocol.Hello):
            self.hello(wid, msg)
        elif isinstance(msg, protocol.Vacate):
            self.vacate(msg.slot, msg.incarnation)  # a pool, which never registers
        elif not isinstance(msg, protocol.Bye):
            # Not registered (typically: this broker restarted, or ZeroMQ reconnected the
            # worker's socket under a new routing id). Nothing it says counts until it has
            # registered; a worker keeps its answer and sends it again after its HELLO.
            if not isinstance(msg, protocol.Heartbeat):
                self.count_bad("workers", ProtocolError(
                    f"{frames[0].split(b' ', 2)[1].decode()} from an unregistered worker"))
            self.send_worker(wid, protocol.encode_disconnect("unknown worker, say HELLO"))

    def hello(self, wid: bytes, msg: protocol.Hello) -> None:
        """Register a worker; then it is ready, or it holds the job it names (10.4)."""
        registry.hello(self, wid, msg)

    def vacate(self, slot: str, incarnation: str | None = None) -> None:
        registry.vacate(self, slot, incarnation)

    def _holds(self, w: WorkerRec, msg: protocol.WorkerResult | protocol.WorkerError
               | protocol.WorkerProgress | protocol.Return, what: str) -> bool:
        if w.holds(msg.job_id, msg.attempt, msg.token):
            return True
        self.count_bad("workers", ProtocolError(f"{what} for a job the worker does not hold",
                                                msg.job_id))
        return False

    def _close_attempt(self, w: WorkerRec) -> Job | None:
        """The worker answered or gave back its attempt: it holds nothing now, and the
        attempt's token can no longer be used."""
        job = w.job
        token = w.token
        if job is not None and job.tokens is not None:
            job.tokens.pop(token, None)
        holders = self.holders
        if holders.get(token) is w:
            del holders[token]
        w.release()
        return job

    def _answered(self, w: WorkerRec, msg: protocol.WorkerResult | protocol.WorkerError) -> None:
        """RESULT or ERROR from the worker holding that attempt: apply it, then the worker
        is ready (JOB, or ACK when nothing waits) or leaving (ACK)."""
        if self._apply(w, msg):
            self._then_ready(w, msg)

    def _answers(self, w: WorkerRec,
                 answers: list[protocol.WorkerResult | protocol.WorkerError]) -> None:
        """RESULTS from a prefetching worker: each answer in turn, then one refill (or ACK)
        as the last answer's ``ready`` says."""
        applied = False
        for msg in answers:
            applied = self._apply(w, msg) or applied
        if applied:
            self._then_ready(w, answers[-1])

    def _apply(self, w: WorkerRec, msg: protocol.WorkerResult | protocol.WorkerError) -> bool:
        """Apply one answer of the attempt the worker runs; False (counted) if it holds no
        such attempt. The next attempt it holds, if any, starts now (prefetch)."""
        ok = msg.__class__ is protocol.WorkerResult
        if not (w.token == msg.token and w.job_id == msg.job_id and w.attempt == msg.attempt):
            if (w.held and isinstance(msg, protocol.WorkerError) and msg.then == "abandoned"
                    and self._take_held(w, msg.job_id, msg.attempt, msg.token)[0]):
                w.answered += 1  # a prefetched job it dropped unstarted, as told (ABANDON)
                return True
            self._holds(w, msg, "RESULT" if ok else "ERROR")  # counts it
            return False
        w.answered += 1
        job = w.job
        holder = job is not None and job.worker is w
        if self.metrics is not None and job is not None:
            self.metrics.answered(job.queue, self.now - w.since)
        # An attempt the job no longer knows (it ended, or ended and was requeued since)
        # changes nothing: the job's live attempts are exactly its tokens.
        forged = w.forged
        live = job is not None and job.tokens is not None and w.token in job.tokens
        self._close_attempt(w)  # its token is spent now
        if w.held:
            self._promote(w)
        if not live:
            job = None
            if forged:
                self.count_bad("workers", ProtocolError(
                    f"{'RESULT' if ok else 'ERROR'} for an attempt with a wrong token",
                    msg.job_id))
        if isinstance(msg, protocol.WorkerResult):
            w.done += 1
            if job is not None:
                self._result(job, w, msg.payload)
            elif not forged:
                self.counters.duplicates += 1
                if self._debug:
                    trace.answer_dropped(msg.job_id, msg.attempt, w, "the job has ended")
        elif msg.then == "abandoned":  # it stopped as told (ABANDON): not an error
            if job is not None and job.state is RUNNING and holder:
                self._back_in_queue(job)  # cannot happen: only ended jobs are abandoned
        else:
            w.failed += 1
            if job is not None and job.state not in ENDED:
                if holder and job.state is RUNNING:
                    self.attempt_failed(job, protocol.FAIL_ERROR, msg.error, w,
                                        retry_after=msg.retry_after, last=msg.then == "fail")
                else:  # an older attempt of a job already retried: keep its error for inspect
                    job.error = msg.error
        return True

    def _then_ready(self, w: WorkerRec, msg: protocol.WorkerResult | protocol.WorkerError
                    ) -> None:
        w.stopping = not msg.ready
        # The JOB, or else an ACK, tells the worker its answer was applied: it keeps the
        # answer (to send again after a reconnect) until then. A draining worker that says
        # ready (DRAIN crossed its answer) gets no job: it is leaving.
        if not msg.ready or w.draining:
            self.send_worker(w.wid, protocol.encode_ack(msg.job_id.encode(), msg.attempt))
        elif not self._ready(w):
            # Parked idle: the ACK waits for the next message either side sends (a JOB
            # confirms it too), which saves an idle worker a wake-up per job.
            w.unacked = protocol.encode_ack(msg.job_id.encode(), msg.attempt)

    def _result(self, job: Job, w: WorkerRec, payload: list[bytes]) -> None:
        """First answer wins (9, item 4); later ones are duplicates."""
        if job.state in ENDED:
            self.counters.duplicates += 1
            return
        if job.state in WAITING:  # a timed-out attempt answered before its retry started
            self._unwait(job)
            self.counters.late += 1
        elif job.worker is not w:
            self.counters.late += 1
        job.result = payload
        self.finish(job, DONE, by=w)

    def give_back(self, w: WorkerRec) -> None:
        """The worker will not finish its attempt: the job goes first in its queue, and the
        attempt does not count as a try."""
        holder = w.job is not None and w.job.worker is w
        if w.forged:
            self.count_bad("workers", ProtocolError("RETURN of an attempt with a wrong token",
                                                    w.job_id or ""))
        job = self._close_attempt(w)
        if job is not None and job.state is RUNNING and holder:
            if self._debug:
                trace.given_back(job, w)
            self._back_in_queue(job)

    def _back_in_queue(self, job: Job) -> None:
        """A give-back: the attempt does not count, and the job goes first in its queue."""
        self.deadlines.stop(job)
        job.attempt -= 1
        job.tried = job.tried[:-1]
        self._enqueue(job, front=True)

    # ------------------------------------------------------------------ prefetch
    def _promote(self, w: WorkerRec) -> None:
        """Its running attempt was answered or given back: the next one it holds starts
        now (it runs them in order), and only now does that attempt's time limit run."""
        assert w.held is not None
        job, attempt, token = w.held.popleft()
        w.job, w.job_id, w.attempt, w.token, w.since = job, job.id, attempt, token, self.now
        if job.state is RUNNING and job.worker is w:
            self.deadlines.start(job, self.now)

    def _take_held(self, w: WorkerRec, job_id: str, attempt: int, token: bytes
                   ) -> tuple[bool, Job | None]:
        """Take an unstarted attempt out of what the worker holds (O(prefetch)); its token
        is spent. Whether it was held, and its job if that attempt is still the current one."""
        held = w.held
        assert held is not None
        for i, (job, n, tok) in enumerate(held):
            if tok == token and n == attempt and job.id == job_id:
                del held[i]
                if self.holders.get(token) is w:
                    del self.holders[token]
                if job.tokens is not None and job.tokens.pop(token, None) is not None \
                        and job.state is RUNNING and job.worker is w:
                    return True, job
                return True, None
        return False, None

    def _return_held(self, w: WorkerRec, msg: protocol.Return) -> None:
        """RETURN of a prefetched attempt (the worker is stopping, or its running job is
        long and others may take what waits behind it): back first in its queue, uncharged.
        The worker returns them newest first, so they keep their order. It is not marked
        stopping: it says so in its answer."""
        if any(entry[2] == msg.token for entry in w.held or ()):
            taken = self._take_held(w, msg.job_id, msg.attempt, msg.token)[1]
            if taken is not None:
                self._back_in_queue(taken)
            return
        self._holds(w, msg, "RETURN")  # counts it

    def withdraw_held(self, w: WorkerRec) -> None:
        """The worker is gone: the attempts it held but never started go back first in
        their queues, uncharged and in their order; their tokens are spent, so a late
        answer for one is stale."""
        held = w.held
        while held:
            job, attempt, token = held[-1]
            taken = self._take_held(w, job.id, attempt, token)[1]
            if taken is not None:
                self._back_in_queue(taken)

    def unstarted(self, job: Job) -> bool:
        """Whether the job's current attempt was prefetched by a worker that has not
        started it (it waits behind another job there)."""
        w = job.worker
        return (job.state is RUNNING and w is not None and bool(w.held) and w.job is not job
                and any(entry[0] is job for entry in w.held or ()))

    def uncharge(self, job: Job) -> None:
        """A prefetched attempt that never started ends with its job (cancel, expiry): it
        is not a try. Its token stays, so the worker is told to drop it (ABANDON)."""
        job.attempt -= 1
        job.tried = job.tried[:-1]

    def _fill(self, w: WorkerRec) -> bool:
        """Refill a prefetching worker in one JOBS: up to its free credits, but no more
        than its fair share of what waits (depth over the workers serving the queue), so
        that the end of a queue is spread one job at a time. False if it got nothing
        (parked as idle when it holds nothing either)."""
        held = w.held
        assert held is not None
        room = w.prefetch - len(held) - (w.job_id is not None)
        if room > 1:
            by_name = self.queues.by_name
            depth = serving = 0
            for name in w.queues:
                q = by_name.get(name)
                if q is not None and not q.paused:
                    depth += q.depth
                    if q.serving > serving:
                        serving = q.serving
            room = min(room, max(1, depth // max(1, serving)))
        batch: list[list[bytes]] = []
        while len(batch) < room:
            job = self._pick(w)
            if job is None:
                break
            self._assign(job, w, batch)
        if batch:
            self.send_worker(w.wid, protocol.encode_jobs(w.answered, batch))
            return True
        if w.job_id is None:
            self.workers.park(w)
        return False

    def _progress(self, w: WorkerRec, progress: dict[str, Any]) -> None:
        """The holder of an attempt says how far it got: latest wins; watchers are told."""
        job = w.job
        if job is None or job.state is not RUNNING or job.worker is not w:
            if w.forged:
                self.count_bad("workers", ProtocolError(
                    "PROGRESS for an attempt with a wrong token", w.job_id or ""))
            return  # an attempt that timed out reports nothing any more
        report = dict(progress)  # checked and bounded by the protocol decoder
        report["at"] = round(self.wall, 3)
        report["attempt"] = w.attempt
        job.progress = report
        self.journal.attempted(job)
        if job.watchers:
            frames = protocol.encode_progress(job.bid, report)
            for client in job.watchers:
                self.send_client(client, frames)

    def revoke_worker(self, wid: bytes) -> None:
        registry.revoke(self, wid)

    def drop_worker(self, w: WorkerRec, why: str) -> None:
        """Forget a worker; its current attempt, if any, failed (a crash counts as a try)."""
        registry.drop(self, w, why)

    # ================================================================== dispatch
    def _expired(self, job: Job) -> bool:
        """A waiting job past its expiry ends ``expired`` instead of running (checked at
        dispatch as well as by the timetable, which may be a turn late). A retry due after
        the expiry ends so too: stale work is not done."""
        if job.expires_at and job.expires_at <= self.wall and job.state is not RUNNING:
            self._unwait(job)
            self._expire(job)
            return True
        return False

    def _enqueue(self, job: Job, front: bool) -> None:
        """The job waits for a worker: an idle one now, else its queue (at the front of its
        priority for a retry or a give-back)."""
        job.state = QUEUED
        job.worker = None
        if front:  # a retry or a give-back: the journal must know the attempt count
            self.journal.attempted(job)
        if job.expires_at and job.expires_at <= self.wall:
            self._expire(job)  # not in its queue yet: nothing to take out
            return
        q = self.queues.get(job.queue)
        while q is not None and q.ready and not q.paused:
            w, untried = self.workers.pick(q, job)
            if not w.alive(self.now):
                # Idle but silent past its expiry (dead; the sweep has not run yet): never
                # hand it a job, which would only burn a try.
                self.counters.lost_workers += 1
                self.drop_worker(w, "stopped answering")
                q = self.queues.get(job.queue)
                continue
            if not untried and self.policy.waits_for_another(job, w.name, q, self.workers,
                                                             self.wall):
                break  # it waits for a worker that has not tried it (busy now)
            self._assign(job, w)
            return
        if front and job.tried and not job.retry_since:
            self.wait_for_untried(job)
        self.queues.push(job, front)

    def wait_for_untried(self, job: Job) -> None:
        """A retry waits a while for a worker that has not tried it (policy.py), then any
        worker may take it (Due.OFFER)."""
        job.retry_since = self.wall
        self.timetable.add(self.wall + self.policy.elsewhere_wait, Due.OFFER, job)

    def _ready(self, w: WorkerRec) -> bool:
        """The worker asked for a job: give it the next one it serves (True), or park it as
        idle (False). Of its queues: the highest priority first, then the oldest job."""
        if w.prefetch > 1:
            return self._fill(w)
        job = self._pick(w)
        if job is None:
            self.workers.park(w)
            return False
        self._assign(job, w)
        return True

    def _pick(self, w: WorkerRec) -> Job | None:
        """Take the next job for ``w`` out of its queues (None: nothing waits for it)."""
        by_name = self.queues.by_name
        while True:
            best: Job | None = None
            for name in w.queues:
                q = by_name.get(name)
                if q is None or not q.depth or q.paused:
                    continue
                job = q.head()
                if job is not None and job.tried and self.policy.waits_for_another(
                        job, w.name, q, self.workers, self.wall):
                    job = q.retry_for(w.name, RETRY_SCAN)  # leave it; take other work
                if job is not None and (best is None or (-job.priority, job.seq)
                                        < (-best.priority, best.seq)):
                    best = job
            if best is None:
                return None
            self.queues.taken(best)
            if best.expires_at and best.expires_at <= self.wall:
                self._expire(best)  # taken out of its queue already
                continue
            return best

    def offer_work(self, w: WorkerRec) -> bool:
        """An idle worker looks for work again (a queue it serves was resumed): True if it
        got a job, else it is parked again."""
        self.workers.unready(w)
        return self._ready(w)

    def send_owed_ack(self, w: WorkerRec) -> bool:
        """Send the ACK an idle worker is owed for its last answer, if any (True if sent)."""
        ack = w.unacked
        if ack is None:
            return False
        w.unacked = None
        self.send_worker(w.wid, ack)
        return True

    def send_owed_acks(self) -> None:
        """At a clean stop: idle workers are owed the ACK of their last answer (sent with
        their next message otherwise); without it they would wait for it to leave."""
        for w in self.workers.records.values():
            self.send_owed_ack(w)

    def drain_worker(self, w: WorkerRec) -> None:
        """``rw drain``: the worker finishes the job in hand and leaves (an idle one at once)."""
        registry.drain(self, w)

    def requeued(self, job: Job) -> None:
        """``rw requeue``: an ended job (reset by admin.requeue) waits to run again."""
        self._enqueue(job, front=False)

    def _expire(self, job: Job) -> None:
        """End a job that waits nowhere (taken out of its queue, or not in it yet) expired."""
        within = f"within {job.expires_at - job.created:g}s of submission"
        self.finish(job, EXPIRED, protocol.FAIL_EXPIRED,
                    f"attempt {job.attempt + 1} of {job.tries} not started {within}" if job.attempt
                    else f"not started {within}")

    def _offer(self, job: Job) -> None:
        """A retry waited long enough for a worker that had not tried it: any idle worker
        may take it now."""
        q = self.queues.get(job.queue)
        if q is None or q.paused:
            return  # resuming the queue hands it out
        for w in list(q.ready.values()):
            if w.alive(self.now):
                self.queues.remove(job)
                self._assign(job, w)
                return

    def _assign(self, job: Job, w: WorkerRec, batch: list[list[bytes]] | None = None) -> None:
        """Dispatch: a new attempt, with a new token and a deadline. To a prefetching
        worker that runs a job already, the attempt is held there (no deadline until it
        starts); its JOB goes in ``batch`` (the caller sends JOBS) or alone in a JOBS."""
        if w.ready:
            self.workers.unready(w)
        job.attempt += 1
        job.state = RUNNING
        job.worker = w
        if job.retry_since:
            job.retry_since = 0.0
        if not job.started:
            job.started = self.wall
            if self.metrics is not None:
                self.metrics.started(job.queue, self.wall - job.created)
        job.tried += (w.name,)
        token = self.tokens.next()
        if job.tokens is None:
            job.tokens = {token: job.attempt}
        else:
            job.tokens[token] = job.attempt
        self.holders[token] = w
        if w.held is not None and w.job_id is not None:
            w.held.append((job, job.attempt, token))  # waits behind the one it runs
        else:
            self.deadlines.start(job, self.now)
            w.job, w.job_id, w.attempt, w.token, w.since = job, job.id, job.attempt, token, self.now
        w.unacked = None  # the JOB (or JOBS, by its count) confirms its last answer
        self.journal.dispatched(job)
        if self._debug:
            trace.dispatched(job, w)
        frames = protocol.encode_job(
            job.bid, job.attempt, job.timeout, token, job.queue.encode(), job.priority, job.tries,
            job.created, job.payload or [b""])
        if batch is not None:
            batch.append(frames)
        elif w.held is not None:
            self.send_worker(w.wid, protocol.encode_jobs(w.answered, [frames]))
        else:
            self.send_worker(w.wid, frames)

    def _schedule(self, job: Job) -> None:
        """The job waits for its time (``not_before``): a delay, an eta or a retry's backoff."""
        job.state = SCHEDULED
        job.worker = None
        self.queues.schedule(job)
        self.timetable.add(job.not_before, Due.RUN, job)

    def attempt_failed(self, job: Job, reason: str, error: str, w: WorkerRec | None = None,
                       retry_after: float | None = None, last: bool = False) -> None:
        """The current attempt is over without a result: retry (now, or after the retry
        policy's delay), or fail after the last try or when the worker said no retry can help."""
        self.deadlines.stop(job)
        if error:
            job.error = error
        if last or job.attempt >= job.tries:
            self.finish(job, FAILED, reason, job.error or reason, by=w)
            return
        self.counters.retried += 1
        delay = self.policy.delay(job, w, retry_after)
        if self._debug:
            trace.retried(job, w, reason, delay, self.wall)
        if delay > 0:
            job.not_before = self.wall + delay
            self.journal.attempted(job)
            self._schedule(job)
        else:
            self._enqueue(job, front=True)

    def finish(self, job: Job, state: JobState, reason: str = "", error: str = "",
               by: WorkerRec | None = None) -> None:
        """The job has ended: record it, tell its waiters and the workers still running an
        attempt of it, keep it for retention. ``by``: the worker whose answer ended it."""
        if job.state is RUNNING:
            self.deadlines.stop(job)
        job.state = state
        job.worker = None
        if self._debug:  # before the abandons it causes
            trace.ended(job, reason, error or job.error or "", by)
        if job.tokens:
            for token, attempt in job.tokens.items():  # no worker keeps working for it
                w = self.holders.get(token)
                if w is not None and (w.token == token or w.held) and self.workers.registered(w):
                    self.counters.abandoned += 1
                    self.send_worker(w.wid, protocol.encode_abandon(job.bid, attempt, state.value))
                    if self._debug:
                        trace.abandoned(job.id, attempt, w, state.value)
        job.tokens = None  # no attempt of an ended job can change it
        job.finished = self.wall
        job.reason = reason
        if job.not_before:
            job.not_before = 0.0
        if job.retry_since:
            job.retry_since = 0.0
        if job.watchers is not None:
            job.watchers = None
        if error:
            job.error = error
        if state is DONE:
            job.payload = None  # the result is what matters now; free the input
            self.counters.done += 1
        elif state is FAILED:
            self.counters.failed += 1
            self.stats.failed(job)
        elif state is EXPIRED:
            self.counters.expired += 1
        else:
            self.counters.cancelled += 1
        self.journal.finished(job)
        self.notifier.ended(job)
        self.finished[job.id] = job
        if self.metrics is not None:
            self.metrics.finished(job.queue, state)

    # ================================================================== timers
    def tick(self) -> float:
        return timers.tick(self)

    def next_wake(self) -> float:
        return timers.next_wake(self)

    # ================================================================== commits, status
    def maybe_flush(self) -> None:
        """Group commit, once per loop turn (see commits.GroupCommit)."""
        self.commits.maybe(self.now)

    def flush(self) -> bool:
        """Make everything durable now, then confirm submissions; False if the journal failed."""
        return self.commits.now(self.now)

    def snapshot(self) -> dict[str, Any]:
        return stats.snapshot(self)
