"""A client's side of the protocol, without I/O: what it waits for, what it sends, when it
pings and resyncs, and what each client call does. The blocking
:class:`~respworkers.client.Client` and the asyncio :class:`~respworkers.aio.Client` drive
the same code: they only move frames between a socket and this, and wait.

Three parts: :class:`Link` is the connection's liveness (first contact, pings, the broker's
id and limits, when replies may have been lost), :class:`Session` the bookkeeping (each
unfinished job's SUBMIT frames until its outcome, outcomes not yet collected, answers to
QUERY and CANCEL) and the messages that follow from both, in :attr:`Session.outbox`, and
:class:`Calls` every client method as a generator that yields :class:`Wait` whenever it
must hear from the broker, and checks its arguments first (:class:`InvalidArgument`).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Generator, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, TypeVar, Union

from . import protocol
from .errors import (
    BrokerUnavailable,
    InvalidArgument,
    InvalidType,
    JobFailed,
    ProtocolError,
    Refused,
)
from .options import OPTION_FIELDS, job_options

#: Seconds between liveness pings while waiting for results.
PING_INTERVAL = 1.0
#: How often a waiting client looks at its connection (handshakes, pings) between replies.
WATCH_INTERVAL = 0.1
#: How often a client looks for the broker's first answer (or a failed handshake).
CONTACT_INTERVAL = 0.05
#: The states a job can be in (docs/protocol.md, section 11), for ``jobs(state=...)``.
JOB_STATES = ("scheduled", "queued", "running", "done", "failed", "cancelled", "expired")
#: The fields of a job given as a mapping to ``submit_many``: ``submit``'s arguments.
JOB_FIELDS = ("payload", "id", "queue", "timeout", "tries", *OPTION_FIELDS)


# Job ids: 32 random hex digits (like uuid4().hex, which costs a system call and an object
# per id: a tenth of a client's CPU per submitted job), shared by the threads of a process.
_IDS = protocol.RandomHex()
_IDS_LOCK = threading.Lock()


def _forget_ids() -> None:
    global _IDS_LOCK
    _IDS_LOCK = threading.Lock()
    _IDS.forget()  # never the parent's ids again


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_ids)


def new_job_id() -> str:
    with _IDS_LOCK:
        return _IDS.next().decode()


@dataclass
class JobResult:
    """How one job ended.

    ``status`` is ``done`` (``frames`` holds the result), ``failed`` (``reason`` is the last
    attempt's: ``timeout``, ``error`` or ``worker-lost``; ``error`` the text, whose first line
    is the summary), ``cancelled``, ``expired`` (not started before its ``expires``),
    ``refused`` (``reason`` is the broker's code: ``full``, ``limit``, ``journal``,
    ``shutdown``; ``error`` its text) or ``unknown`` (the broker does not know the id: never
    submitted, or forgotten after its retention).
    """

    id: str
    status: str
    frames: list[bytes] | None = None
    reason: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "done"

    @property
    def payload(self) -> bytes:
        """The result as one bytes value (frames joined); raises if the job did not succeed."""
        if self.frames is None:
            raise JobFailed(self.id, self.status if not self.reason else self.reason, self.error)
        return b"".join(self.frames)

    def as_dict(self) -> dict[str, Any]:
        """For JSON: a result as ``result`` (its frames joined) when that is UTF-8 text, else
        as ``result_b64`` (standard base64); with several frames also ``result_frames_b64``,
        each frame in base64. A job without a result has ``reason`` and ``error``."""
        import base64

        out: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.frames is not None:
            data = b"".join(self.frames)
            try:
                out["result"] = data.decode()
            except UnicodeDecodeError:
                out["result_b64"] = base64.b64encode(data).decode("ascii")
            if len(self.frames) > 1:
                out["result_frames_b64"] = [base64.b64encode(f).decode("ascii") for f in self.frames]
        else:
            out["reason"] = self.reason
            out["error"] = self.error
        return out


@dataclass
class Pending:
    frames: list[bytes]  # the SUBMIT message, for re-sending after a broker restart; [] if attached
    confirmed: bool = False


class Reply:
    """Where the reply to one request (JOBS, REQUEUE, PURGE) lands; also the key a call
    waiting for it is woken by."""

    __slots__ = ("value", "done")

    def __init__(self) -> None:
        self.value: Any = None
        self.done = False


class _Key:
    """A wake-up key that no job id can equal."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


#: Woken by every outcome (calls waiting for any of many jobs: ``results``).
OUTCOMES = _Key("any outcome")


class Link:
    """Is the broker there, which broker is it, and may replies have been lost?"""

    def __init__(self, endpoint: str, request_timeout: float, now: float) -> None:
        self.endpoint = endpoint
        self.request_timeout = request_timeout
        self.broker_id: str | None = None
        self.limits: dict[str, Any] = {}  # the broker's, from its PONG
        self.starting = False  # the last PONG said the broker is still loading its journal
        self.last_heard = 0.0  # monotonic time of the broker's last message; 0 = never
        self.last_ping = now  # the first PING goes out when the session starts
        self.pings = 1
        self.handshakes = 0
        self.last_watch = 0.0
        self.told_silent = False

    def heard(self, now: float) -> bool:
        """A message arrived. True if pings had gone unanswered for a while: outcomes sent
        meanwhile may have been dropped (or the broker restarted)."""
        cut_off = bool(self.last_heard) and self.last_ping - self.last_heard > 2 * PING_INTERVAL
        self.last_heard = now
        self.told_silent = False
        return cut_off

    def pong(self, pong: protocol.Pong) -> bool:
        """True if this PONG shows a broker that may not know what we sent."""
        self.starting = pong.starting
        self.limits = pong.limits
        changed = self.broker_id is not None and pong.broker_id != self.broker_id  # a restart
        first_lost = self.broker_id is None and self.pings > 1  # our first ping may have died
        self.broker_id = pong.broker_id
        return changed or first_lost

    def unavailable(self, now: float, why: str | None) -> str | None:
        """Before first contact: why to give up (a refused handshake, or no answer in time)."""
        if self.last_heard:
            return None
        if why:
            return why
        if now - self.last_ping > self.request_timeout:
            return (f"no answer from the broker at {self.endpoint} within "
                    f"{self.request_timeout:g}s (is `rw broker` running there?)")
        return None

    def ping_due(self, now: float) -> bool:
        if self.last_heard and now - self.last_ping >= PING_INTERVAL:
            self.last_ping = now
            self.pings += 1
            return True
        return False

    def silence(self, now: float) -> str | None:
        """A note, once per silence, when the broker stopped answering pings."""
        if self.last_heard and now - self.last_heard > 3 * PING_INTERVAL + 1 and not self.told_silent:
            self.told_silent = True
            return f"broker at {self.endpoint} not answering; waiting for it"
        return None

    def waits_for_start(self, now: float) -> bool:
        """The broker answers pings but is still loading its journal: keep waiting."""
        return self.starting and now - self.last_heard < 3 * PING_INTERVAL

    def budgets(self) -> tuple[int, int]:
        """(payload bytes, frame bytes) one message may carry: the broker takes jobs whose
        payloads add up to max_message_size, and libzmq closes the connection of a peer
        sending any frame (a command line too) over max_message_size + 1024, unanswered."""
        limit = self.limits.get("max_message_size")
        payload = limit if isinstance(limit, int) else 64 << 20
        return payload, payload + 1024 - 64


class Session:
    """Bookkeeping and the messages it calls for; the caller sends :attr:`outbox` in order."""

    def __init__(self, endpoint: str, request_timeout: float, now: float) -> None:
        self.link = Link(endpoint, request_timeout, now)
        self.pending: dict[str, Pending] = {}
        self.done: dict[str, JobResult] = {}
        # How many calls wait for each job's outcome: with several (asyncio tasks, threads)
        # the outcome stays in ``done`` until the last of them has taken it.
        self.claims: dict[str, int] = {}
        # Answers to QUERY and CANCEL, kept only while a request for that id waits for one.
        self.answers: dict[str, protocol.Info | protocol.Unknown] = {}
        self.asking: set[str] = set()
        self.outbox: deque[list[bytes]] = deque([protocol.encode_ping()])
        self.on_event: Callable[[str], None] | None = None  # progress notes, e.g. reconnects
        # Jobs' progress, for those being watched: the latest, and what each iterating
        # ``watch`` call has not seen yet (one queue per call).
        self.progress: dict[str, dict[str, Any]] = {}
        self.listeners: dict[str, list[deque[dict[str, Any]]]] = {}
        self.watching: set[str] = set()
        self.on_progress: Callable[[str, dict[str, Any]], None] | None = None
        # Requests answered by one reply of their own kind (JOBS, REQUEUE, PURGE, PAUSE,
        # RESUME, DRAIN): the broker
        # answers a client's requests in order, so replies fill the oldest slot of the kind.
        self.requests: dict[type, deque[Reply]] = {}
        # Called with what changed (a job id, a Reply, OUTCOMES) by a client that wakes only
        # the calls waiting for that (the asyncio client); None: nobody needs telling.
        self.on_touch: Callable[[Hashable], None] | None = None
        self._handlers: dict[type, Callable[[Any], bool]] = {
            protocol.Accepted: self._accepted,
            protocol.Result: self._result,
            protocol.Results: self._results,
            protocol.Failed: self._failed,
            protocol.Cancelled: self._cancelled,
            protocol.Expired: self._expired,
            protocol.Progress: self._progress,
            protocol.JobsPage: self._admin_reply,
            protocol.Requeued: self._admin_reply,
            protocol.Purged: self._admin_reply,
            protocol.Paused: self._admin_reply,
            protocol.Resumed: self._admin_reply,
            protocol.Draining: self._admin_reply,
            protocol.Refused: self._refused,
            protocol.Info: self._answer,
            protocol.Unknown: self._unknown,
            protocol.Pong: self._pong,
            protocol.Resync: self._resync_asked,
            protocol.Invalid: self._invalid,
        }

    def _note(self, text: str) -> None:
        if self.on_event is not None:
            self.on_event(text)

    # ------------------------------------------------------------------ calls waiting
    def claim(self, job_id: str) -> None:
        """A call waits for this job's outcome."""
        self.claims[job_id] = self.claims.get(job_id, 0) + 1

    def unclaim(self, job_id: str) -> None:
        """A call stopped waiting without taking the outcome (timeout, cancelled, closed)."""
        n = self.claims.get(job_id, 0) - 1
        if n > 0:
            self.claims[job_id] = n
        else:
            self.claims.pop(job_id, None)

    def take(self, job_id: str) -> JobResult:
        """The outcome, for one claiming call: it leaves ``done`` with the last of them, so
        every call waiting for the same job gets it, and each exactly once."""
        n = self.claims.get(job_id, 0)
        if n > 1:
            self.claims[job_id] = n - 1
            return self.done[job_id]
        self.claims.pop(job_id, None)
        return self.done.pop(job_id)

    # ------------------------------------------------------------------ submitting
    def check(self, payload: Any, job_id: Any, queue: Any = protocol.DEFAULT_QUEUE,
              what: str | None = None, **options: Any) -> list[bytes]:
        """A job's SUBMIT frames, checked against the protocol and the broker's limits (which
        must be known: the caller waits for first contact). ``options`` are those of
        :func:`respworkers.options.job_options`. Raises :class:`InvalidArgument` naming
        what is wrong, after ``what`` (default: the job's id)."""
        job_id = check_job_id(job_id, "id")
        if what is None:
            what = f"job {job_id!r}"
        where = f"{what}: " if what else ""
        queue = check_queue(queue, "queue", what)
        unknown = [k for k in options if k not in JOB_FIELDS or k in ("payload", "id", "queue")]
        if unknown:
            raise InvalidArgument(f"{where}unknown option {unknown[0]!r} (options: "
                                  f"{', '.join(JOB_FIELDS[3:])})", str(unknown[0]))
        opts = job_options(**options, what=what)
        limits = self.link.limits
        for value, key, unit in ((opts.timeout, "max_timeout", "s"), (opts.tries, "max_tries", "")):
            limit = limits.get(key)
            if value is not None and isinstance(limit, (int, float)) and value > limit:
                raise InvalidArgument(f"{where}{key[4:]} {value:g}{unit} is over the "
                                      f"broker's {key} of {limit:g}{unit}", key[4:])
        try:
            frames = protocol.encode_submit(job_id, queue, opts, protocol.as_frames(payload, "payload"))
        except TypeError as exc:
            raise InvalidType(f"{where}{exc}", "payload") from None
        limit = limits.get("max_message_size")
        size = sum(map(len, frames[1:]))
        if isinstance(limit, int) and size > limit:
            raise InvalidArgument(f"{where}payload of {size} bytes is over the broker's "
                                  f"max_message_size of {limit} bytes", "payload")
        return frames

    def submit(self, jobs: list[tuple[str, list[bytes]]]) -> None:
        """Track checked jobs (not those already waited for) and queue their SUBMITs."""
        fresh: dict[str, list[bytes]] = {}
        for job_id, frames in jobs:
            if job_id not in self.pending and job_id not in fresh:
                fresh[job_id] = frames
        for job_id, frames in fresh.items():
            self.done.pop(job_id, None)
            self.pending[job_id] = Pending(frames)
        self._submits(list(fresh.values()))

    def _submits(self, submits: list[list[bytes]]) -> None:
        """SUBMIT frames of many jobs in as few messages as the broker's limits allow."""
        budget, line_budget = self.link.budgets()
        batch: list[list[bytes]] = []
        size, line = 0, 16
        for frames in submits:
            job_size = sum(map(len, frames)) - len(frames[0])
            job_line = len(frames[0]) - 4  # "<id> <queue> <ms> <tries> <frames>" and a space
            if batch and (len(batch) == protocol.MAX_BATCH or size + job_size > budget
                          or line + job_line > line_budget):
                self._batch(batch)
                batch, size, line = [], 0, 16
            batch.append(frames)
            size += job_size
            line += job_line
        if batch:
            self._batch(batch)

    def _batch(self, batch: list[list[bytes]]) -> None:
        self.outbox.append(batch[0] if len(batch) == 1 else protocol.encode_submits(batch))

    def ids(self, encode: Callable[[list[str]], list[bytes]], ids: list[str]) -> None:
        """WAIT or UNWAIT for many ids, in as few messages as the limits allow."""
        line_budget = self.link.budgets()[1]
        chunk: list[str] = []
        line = 16
        for job_id in ids:
            size = len(job_id.encode()) + 1
            if chunk and (len(chunk) == protocol.MAX_BATCH or line + size > line_budget):
                self.outbox.append(encode(chunk))
                chunk, line = [], 16
            chunk.append(job_id)
            line += size
        if chunk:
            self.outbox.append(encode(chunk))

    def attach(self, job_ids: Iterable[str]) -> None:
        """Follow jobs submitted elsewhere (another process, an earlier run): WAIT for them."""
        fresh = []
        for job_id in job_ids:
            protocol.check_job_id(job_id.encode())
            if job_id not in self.pending and job_id not in self.done:
                self.pending[job_id] = Pending([], confirmed=True)
                fresh.append(job_id)
        self.ids(protocol.encode_wait, fresh)

    def unconfirmed(self, job_ids: Iterable[str] | None = None) -> list[str]:
        ids = self.pending if job_ids is None else job_ids
        return [j for j in ids if (p := self.pending.get(j)) is not None and not p.confirmed]

    # ------------------------------------------------------------------ receiving
    def received(self, frames: list[bytes], now: float) -> None:
        """A message from the broker; what it calls for is queued in :attr:`outbox`."""
        try:
            reply = protocol.decode_reply(frames)
        except ProtocolError:
            return  # a bad reply is ignored; the wait goes on
        cut_off = self.link.heard(now)
        if self._handlers[type(reply)](reply) or cut_off:
            self.resync()

    def _accepted(self, reply: protocol.Accepted) -> bool:
        pending = self.pending
        touch = self.on_touch
        for job_id in reply.job_ids:
            p = pending.get(job_id)
            if p is not None:
                p.confirmed = True
                if touch is not None:
                    touch(job_id)
        return False

    def _ended(self, result: JobResult) -> bool:
        # Only jobs we still wait for: a repeated outcome (after a resync) is dropped here,
        # so each result reaches the caller exactly once. Stored before it leaves
        # pending, so that an interrupt in between cannot lose it.
        if result.id in self.pending:
            self.done[result.id] = result
            del self.pending[result.id]
            if self.watching:
                self.watching.discard(result.id)
                self.progress.pop(result.id, None)
            touch = self.on_touch
            if touch is not None:
                touch(result.id)
                touch(OUTCOMES)
        return False

    def _result(self, reply: protocol.Result) -> bool:
        return self._ended(JobResult(reply.job_id, "done", reply.frames))

    def _results(self, reply: protocol.Results) -> bool:
        for job_id, frames in reply.entries:
            self._ended(JobResult(job_id, "done", frames))
        return False

    def _failed(self, reply: protocol.Failed) -> bool:
        return self._ended(JobResult(reply.job_id, "failed", None, reply.reason, reply.error))

    def _cancelled(self, reply: protocol.Cancelled) -> bool:
        return self._ended(JobResult(reply.job_id, "cancelled", None, "cancelled"))

    def _expired(self, reply: protocol.Expired) -> bool:
        return self._ended(JobResult(reply.job_id, "expired", None, "expired",
                                     "not started before it expired"))

    def _progress(self, reply: protocol.Progress) -> bool:
        job_id = reply.job_id
        if job_id in self.watching:
            self.progress[job_id] = reply.progress
            for news in self.listeners.get(job_id, ()):
                news.append(reply.progress)
            if self.on_touch is not None:
                self.on_touch(job_id)
            if self.on_progress is not None:
                self.on_progress(job_id, reply.progress)
        return False

    def _admin_reply(self, reply: protocol.JobsPage | protocol.Requeued | protocol.Purged
                     | protocol.Paused | protocol.Resumed | protocol.Draining) -> bool:
        slots = self.requests.get(type(reply))
        if slots:
            slot = slots.popleft()
            slot.value, slot.done = reply, True
            if self.on_touch is not None:
                self.on_touch(slot)
        return False

    def request(self, reply_type: type, frames: list[bytes]) -> Reply:
        """Send a request answered by one ``reply_type``; the reply lands in the slot returned."""
        slot = Reply()
        self.requests.setdefault(reply_type, deque()).append(slot)
        self.outbox.append(frames)
        return slot

    def forget(self, reply_type: type, slot: Reply) -> None:
        """A request given up on (no answer in time; perhaps lost in a broker restart): its
        slot must not take the reply to the next request of its kind, and every one after."""
        slots = self.requests.get(reply_type)
        if slots and slot in slots:
            slots.remove(slot)

    def watch(self, job_id: str) -> None:
        """Follow a job's progress (WATCH), and wait for its outcome (WAIT) if not already."""
        protocol.check_job_id(job_id.encode())
        self.watching.add(job_id)
        self.outbox.append(protocol.encode_watch(job_id))
        if job_id not in self.pending and job_id not in self.done:
            self.attach([job_id])

    def listen(self, job_id: str) -> deque[dict[str, Any]]:
        """Watch a job, its reports going to the queue returned (one per iterating call)."""
        news: deque[dict[str, Any]] = deque(maxlen=10_000)
        self.listeners.setdefault(job_id, []).append(news)
        self.watch(job_id)
        return news

    def unlisten(self, job_id: str, news: deque[dict[str, Any]]) -> None:
        queues = self.listeners.get(job_id)
        if queues is not None:
            queues[:] = [q for q in queues if q is not news]
            if not queues:
                del self.listeners[job_id]

    def _refused(self, reply: protocol.Refused) -> bool:
        return self._ended(JobResult(reply.job_id, "refused", None, reply.code, reply.text))

    def _answer(self, reply: protocol.Info | protocol.Unknown) -> bool:
        if reply.job_id in self.asking:
            self.answers[reply.job_id] = reply
            if self.on_touch is not None:
                self.on_touch(reply.job_id)
        return False

    def _unknown(self, reply: protocol.Unknown) -> bool:
        p = self.pending.get(reply.job_id)
        if p is not None and p.frames:
            self.outbox.append(p.frames)  # the broker lost it (no journal): submit again
        elif p is not None:
            self._ended(JobResult(
                reply.job_id, "unknown", None, "unknown", "the broker does not know this job"))
        return self._answer(reply)

    def _pong(self, reply: protocol.Pong) -> bool:
        restarted = self.link.pong(reply)
        if reply.starting:  # a broker loading a large journal answers pings but nothing else yet
            self._note("the broker is starting (loading its journal); waiting")
        return restarted

    def _resync_asked(self, reply: protocol.Resync) -> bool:
        return True  # the broker dropped outcomes for us while we did not read

    def _invalid(self, reply: protocol.Invalid) -> bool:
        """The broker could not read something this client sent (it checks every job first,
        so client and broker disagree on the protocol): say so, never wait in silence."""
        raise ProtocolError("message refused by the broker", f"{reply.reason} (is this client's "
                            "respworkers the broker's version?)")

    def resync(self) -> None:
        """A broker that may not know what we sent: re-send what it may not have, ask about
        the rest. Batched: after a long silence thousands of jobs may be unfinished, and one
        message each would add to whatever load made the broker slow to answer."""
        if not self.pending:
            return
        self._note("reconnected to the broker; asking about unfinished jobs")
        waits = [j for j, p in self.pending.items() if p.confirmed or not p.frames]
        resubmits = [p.frames for p in self.pending.values() if not (p.confirmed or not p.frames)]
        self.ids(protocol.encode_wait, waits)
        self._submits(resubmits)
        for job_id in self.watching:
            if job_id in self.pending:
                self.outbox.append(protocol.encode_watch(job_id))

    # ------------------------------------------------------------------ the connection
    def poll_interval(self) -> float:
        """The longest a waiting client may sit in one poll before it looks at the connection
        again (:meth:`tick`): short until the broker first answered, then the ping interval."""
        return PING_INTERVAL if self.link.last_heard else CONTACT_INTERVAL

    def tick(self, now: float, handshakes: Callable[[], tuple[int, str | None]]) -> None:
        """After each wait for the broker: :meth:`keep_alive`, at most every WATCH_INTERVAL once
        the broker has answered (not after every reply: reading the handshake monitor costs).
        ``handshakes`` reads the monitor: (successes, why the last failure failed)."""
        link = self.link
        if link.last_heard and now - link.last_watch < WATCH_INTERVAL:
            return
        link.last_watch = now
        succeeded, why = handshakes()
        self.keep_alive(now, succeeded, why)

    def keep_alive(self, now: float, handshakes: int, why: str | None) -> None:
        """Every WATCH_INTERVAL while waiting: handshakes seen, pings, giving up before first
        contact (raises BrokerUnavailable)."""
        link = self.link
        if handshakes:
            reconnected = link.handshakes > 0
            link.handshakes += handshakes
            if reconnected:
                self.resync()  # replies sent while we were away may be lost
        gone = link.unavailable(now, why)
        if gone:
            raise BrokerUnavailable(gone)
        if link.ping_due(now):
            self.outbox.append(protocol.encode_ping())
            note = link.silence(now)
            if note:
                self._note(note)

    def ask(self, command: bytes, job_id: str) -> None:
        """QUERY or CANCEL; the answer lands in :attr:`answers`."""
        protocol.check_job_id(job_id.encode())
        self.asking.add(job_id)
        self.answers.pop(job_id, None)
        self.outbox.append(protocol.encode_job_ref(command, job_id))

    def answered(self, job_id: str) -> protocol.Info | protocol.Unknown | None:
        return self.answers.get(job_id)

    def stop_asking(self, job_id: str) -> None:
        self.asking.discard(job_id)
        self.answers.pop(job_id, None)
        if self.on_touch is not None:
            self.on_touch(job_id)  # another call may wait for its turn to ask about this job

    def closing(self) -> None:
        """Tell the broker we no longer wait for the jobs still unfinished (UNWAIT)."""
        if self.link.limits:
            self.ids(protocol.encode_unwait, [j for j, p in self.pending.items() if p.confirmed])


# ======================================================================= arguments
def check_job_id(value: Any, argument: str = "job_id") -> str:
    """A job id as the protocol takes it (1..200 bytes of printable UTF-8, no whitespace)."""
    if not isinstance(value, str):
        raise InvalidType(f"{argument} must be a str, got {type(value).__name__}", argument)
    try:
        return protocol.check_job_id(value.encode())
    except UnicodeEncodeError:
        raise InvalidArgument(f"{argument} {value!r} is not valid UTF-8 text", argument) from None
    except ProtocolError as exc:
        raise InvalidArgument(f"{argument}: {exc.detail}", argument) from None


def check_job_ids(values: Any, argument: str = "job_ids") -> list[str]:
    """Job ids, each checked, without repeats, in order. A single str is refused: iterating
    it would ask for one job per character."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InvalidType(f"{argument} must be an iterable of job ids (a list), got "
                          f"{type(values).__name__}", argument)
    return list(dict.fromkeys(check_job_id(v, argument) for v in values))


def _names(values: Any, argument: str) -> list[str]:
    """Worker names or hosts for DRAIN: strings, without repeats. A single str is refused."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InvalidArgument(f"{argument} must be a list of names, got {values!r}", argument)
    out = list(dict.fromkeys(values))
    if not all(isinstance(v, str) and v for v in out):
        raise InvalidArgument(f"{argument} must be non-empty strings, got {out!r}", argument)
    return out


def check_queue(value: Any, argument: str = "queue", what: str = "") -> str:
    """A queue name: 1..64 characters of ``[A-Za-z0-9._-]``."""
    where = f"{what}: " if what else ""
    if not isinstance(value, str):
        raise InvalidType(f"{where}{argument} must be a str, got {type(value).__name__}", argument)
    try:
        return protocol.check_queue(value.encode())
    except (ProtocolError, UnicodeEncodeError):
        raise InvalidArgument(f"{where}{argument} {value!r} is not a queue name (1..64 of "
                              "[A-Za-z0-9._-])", argument) from None


def check_wait(value: Any, argument: str = "timeout") -> float | None:
    """How long a call may wait: None (no limit) or seconds, 0 or more."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InvalidArgument(f"{argument} must be None or a number of seconds, got {value!r}",
                              argument)
    if value < 0:
        raise InvalidArgument(f"{argument} must be 0 or more seconds, got {value!r}", argument)
    return None if math.isinf(value) else float(value)


def check_request_timeout(value: Any) -> float:
    """A client's ``request_timeout``: seconds, more than 0."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value <= 0):
        raise InvalidArgument(f"request_timeout must be a number of seconds greater than 0, "
                              f"got {value!r}", "request_timeout")
    return float(value)


def _deadline(timeout: Any, argument: str = "timeout") -> float | None:
    wait = check_wait(timeout, argument)
    return None if wait is None else time.monotonic() + wait


def job_spec(job: Any, where: str) -> tuple[str, Any, dict[str, Any]]:
    """(id, payload, the other fields) of a job given to ``submit_many``: a payload, or a
    mapping of ``submit``'s arguments. A job without an id gets a fresh random one; the
    fields include ``what``, how messages about the job name it (``where`` and the id the
    caller gave, if any)."""
    if isinstance(job, Mapping):
        unknown = [k for k in job if k not in JOB_FIELDS]
        if unknown:
            kind = "field" if where else "argument"
            raise InvalidArgument(f"{where}{': ' if where else ''}unknown {kind} {unknown[0]!r} "
                                  f"({kind}s: {', '.join(JOB_FIELDS)})", str(unknown[0]))
        if "payload" not in job:
            raise InvalidArgument(f"{where}: no 'payload'", "payload")
        spec = dict(job)
    else:
        spec = {"payload": job}
    job_id = spec.pop("id", None)
    if job_id is None:
        spec["what"] = where
        return new_job_id(), spec.pop("payload"), spec
    job_id = check_job_id(job_id, "id")
    spec["what"] = f"{where} (id {job_id!r})" if where else f"job {job_id!r}"
    return job_id, spec.pop("payload"), spec


# ======================================================================= calls
class Wait(NamedTuple):
    """A call must hear from the broker. The client does I/O (sending what the session
    queued, reading replies, pings) until ``deadline`` (time.monotonic(); None: no limit)
    or until there is news about ``on`` (a job id, a :class:`Reply`, :data:`OUTCOMES`;
    None: any message), then resumes the call, which looks again. A client may resume it
    sooner: a call never relies on being woken only for its own news."""

    deadline: float | None
    on: Hashable | None = None


T = TypeVar("T")
Call = Generator[Wait, None, T]
Stream = Generator[Union[Wait, T], None, None]


class Calls:
    """Every client method, without I/O: a generator that checks its arguments, queues what
    to send in the session's outbox, yields :class:`Wait` while it must hear from the
    broker, and returns the method's value. The blocking and the asyncio client run the
    same generators, so both check, wait, resync and give up alike; each only decides how
    to wait (a poll, an awaited future)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    # ------------------------------------------------------------------ waiting
    @staticmethod
    def _step(deadline: float | None, on: Hashable | None,
              what: str = "timed out waiting for job results") -> Call[None]:
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(what)
        yield Wait(deadline, on)

    def contact(self) -> Call[None]:
        """Until the broker's first answer (its id and limits). The session's keep-alive
        raises BrokerUnavailable when it does not come within ``request_timeout``."""
        while not self.session.link.last_heard:
            yield Wait(None, None)

    def _answer_deadline(self) -> float:
        """A request's deadline has passed: a new one while the broker says it is starting
        (loading its journal; it answers everything afterwards), else BrokerUnavailable."""
        link = self.session.link
        now = time.monotonic()
        if not link.waits_for_start(now):
            raise BrokerUnavailable(f"no answer from the broker at {link.endpoint} "
                                    f"within {link.request_timeout:g}s")
        return now + link.request_timeout

    # ------------------------------------------------------------------ submitting
    def submit_many(self, jobs: Any) -> Call[list[str]]:
        """Check every job first (nothing is sent if one is wrong), then queue them in as
        few SUBMITS messages as the broker's limits allow."""
        if isinstance(jobs, (str, bytes, Mapping)) or not isinstance(jobs, Iterable):
            raise InvalidType("jobs must be an iterable of jobs (payloads or mappings), got "
                              f"{type(jobs).__name__}", "jobs")
        return (yield from self._submit([job_spec(job, f"jobs[{n}]") for n, job in enumerate(jobs)]))

    def submit(self, payload: Any, fields: dict[str, Any]) -> Call[str]:
        ids = yield from self._submit([job_spec({"payload": payload, **fields}, "")])
        return ids[0]

    def _submit(self, specs: list[tuple[str, Any, dict[str, Any]]]) -> Call[list[str]]:
        if not self.session.link.last_heard:
            yield from self.contact()  # the broker's limits are part of the check
        check = self.session.check
        checked = [(job_id, check(payload, job_id, **spec)) for job_id, payload, spec in specs]
        self.session.submit(checked)
        return [job_id for job_id, _ in checked]

    def validate(self, payload: Any, job_id: Any, queue: Any, options: dict[str, Any]
                 ) -> Call[list[bytes]]:
        if not self.session.link.last_heard:
            yield from self.contact()
        return self.session.check(payload, job_id, queue, **options)

    def attach(self, job_ids: list[str]) -> Call[None]:
        """WAIT for jobs (checked ids) this client did not submit."""
        if job_ids:
            if not self.session.link.last_heard:
                yield from self.contact()  # the limits bound how many ids one WAIT may carry
            self.session.attach(job_ids)

    def attach_one(self, job_id: Any) -> Call[None]:
        yield from self.attach([check_job_id(job_id)])

    def wait_confirmed(self, job_ids: Any, timeout: Any) -> Call[None]:
        ids = check_job_ids(job_ids)
        yield from self._confirmed(ids, _deadline(timeout))

    def _confirmed(self, ids: list[str], deadline: float | None) -> Call[None]:
        pending = self.session.pending
        for job_id in ids:
            while (p := pending.get(job_id)) is not None and not p.confirmed:
                yield from self._step(deadline, job_id, "timed out waiting for the broker to "
                                      "confirm jobs")

    # ------------------------------------------------------------------ outcomes
    def outcome(self, job_id: Any, timeout: Any) -> Call[JobResult]:
        job_id = check_job_id(job_id)
        deadline = _deadline(timeout)
        session = self.session
        session.claim(job_id)
        taken = False
        try:
            if job_id not in session.pending and job_id not in session.done:
                yield from self.attach([job_id])
            while job_id not in session.done:
                yield from self._step(deadline, job_id)
            taken = True
            return session.take(job_id)
        finally:
            if not taken:
                session.unclaim(job_id)

    def result(self, job_id: Any, timeout: Any) -> Call[bytes]:
        outcome = yield from self.outcome(job_id, timeout)
        if outcome.status == "refused":
            raise Refused(outcome.id, outcome.reason, outcome.error)
        return outcome.payload

    def run(self, payload: Any, fields: dict[str, Any]) -> Call[bytes]:
        job_id = yield from self.submit(payload, fields)
        return (yield from self.result(job_id, None))

    def results(self, job_ids: Any, timeout: Any) -> Stream[JobResult]:
        """Outcomes as they arrive, until every named job (None: every job this client
        waits for or has an uncollected outcome of) has ended. Arguments are checked now,
        the waiting starts when iterated."""
        wanted = None if job_ids is None else set(check_job_ids(job_ids))
        return self._results(wanted, _deadline(timeout))

    def _results(self, wanted: set[str] | None, deadline: float | None) -> Stream[JobResult]:
        session = self.session
        if wanted is None:
            wanted = set(session.pending) | set(session.done)
        for job_id in wanted:
            session.claim(job_id)
        try:
            yield from self.attach([j for j in wanted if j not in session.pending
                                    and j not in session.done])
            done = session.done
            while wanted:
                for job_id in [j for j in done if j in wanted]:  # O(arrived), not O(wanted)
                    wanted.discard(job_id)
                    if job_id in done:
                        yield session.take(job_id)
                    else:  # submitted again meanwhile
                        session.unclaim(job_id)
                if wanted:
                    yield from self._step(deadline, OUTCOMES)
        finally:
            for job_id in wanted:
                session.unclaim(job_id)

    def map(self, payloads: Any, options: dict[str, Any]) -> Call[list[bytes]]:
        if "id" in options:
            raise InvalidArgument("map takes no id: every job would have the same one", "id")
        if isinstance(payloads, (str, bytes, Mapping)) or not isinstance(payloads, Iterable):
            raise InvalidType(f"payloads must be an iterable of payloads, got "
                              f"{type(payloads).__name__}", "payloads")
        ids = yield from self.submit_many([{**options, "payload": p} for p in payloads])
        got: dict[str, JobResult] = {}
        for item in self._results(set(ids), None):
            if isinstance(item, Wait):
                yield item
            else:
                got[item.id] = item
        return [got[i].payload for i in ids]

    def watch(self, job_id: Any, timeout: Any) -> Stream[dict[str, Any]]:
        """The job's progress reports until it ends (arguments checked now)."""
        return self._watch(check_job_id(job_id), _deadline(timeout))

    def _watch(self, job_id: str, deadline: float | None) -> Stream[dict[str, Any]]:
        session = self.session
        news = session.listen(job_id)
        try:
            while True:
                while news:
                    yield news.popleft()
                if job_id not in session.pending:  # ended (its outcome is in done, or taken)
                    return
                yield from self._step(deadline, job_id)
        finally:
            session.unlisten(job_id, news)

    def follow_progress(self, job_id: Any) -> Call[None]:
        yield from ()  # a call that never waits
        self.session.watch(check_job_id(job_id))

    # ------------------------------------------------------------------ questions
    def ask(self, command: bytes, job_id: Any) -> Call[dict[str, Any] | None]:
        """QUERY or CANCEL: INFO's JSON, or None for UNKNOWN. One question per job id at a
        time: the answers carry only the id, so a second one waits for the first."""
        job_id = check_job_id(job_id)
        session = self.session
        deadline = time.monotonic() + session.link.request_timeout
        while job_id in session.asking:
            if time.monotonic() >= deadline:
                deadline = self._answer_deadline()
            yield Wait(deadline, job_id)
        session.ask(command, job_id)
        try:
            deadline = time.monotonic() + session.link.request_timeout
            while (answer := session.answered(job_id)) is None:
                if time.monotonic() >= deadline:
                    deadline = self._answer_deadline()
                yield Wait(deadline, job_id)
            return answer.info if isinstance(answer, protocol.Info) else None
        finally:
            session.stop_asking(job_id)

    def _admin(self, reply_type: type, frames: list[bytes]) -> Call[Any]:
        session = self.session
        if not session.link.last_heard:
            yield from self.contact()
        slot = session.request(reply_type, frames)
        try:
            deadline = time.monotonic() + session.link.request_timeout
            while not slot.done:
                if time.monotonic() >= deadline:
                    deadline = self._answer_deadline()
                yield Wait(deadline, slot)
            return slot.value
        finally:
            if not slot.done:
                session.forget(reply_type, slot)

    def jobs(self, state: Any, queue: Any, limit: Any) -> Call[list[dict[str, Any]]]:
        if state is not None and state not in JOB_STATES:
            raise InvalidArgument(f"state must be one of {', '.join(JOB_STATES)} (or None), "
                                  f"got {state!r}", "state")
        if queue is not None:
            check_queue(queue)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidArgument(f"limit must be a whole number of at least 1, got {limit!r}",
                                  "limit")
        found: list[dict[str, Any]] = []
        cursor: int | None = 0
        while cursor is not None and len(found) < limit:
            reply = yield from self._admin(protocol.JobsPage, protocol.encode_list_jobs(
                {"state": state, "queue": queue, "limit": min(1000, limit - len(found)),
                 "cursor": cursor}))
            page = reply.page
            if page.get("error"):  # the broker's rules (checked above too)
                raise InvalidArgument(str(page["error"]), str(page["error"]).split()[0])
            found.extend(page.get("jobs", []))
            cursor = page.get("cursor")
        return found[:limit]

    def requeue(self, job_ids: Any) -> Call[dict[str, Any]]:
        ids = check_job_ids(job_ids)
        report: dict[str, Any] = {"requeued": [], "unknown": [], "skipped": {}}
        for i in range(0, len(ids), protocol.MAX_BATCH):
            reply = yield from self._admin(
                protocol.Requeued, protocol.encode_requeue(ids[i:i + protocol.MAX_BATCH]))
            got = reply.report
            report["requeued"] += got.get("requeued", [])
            report["unknown"] += got.get("unknown", [])
            report["skipped"].update(got.get("skipped", {}))
        return report

    def purge(self, queue: Any) -> Call[int]:
        queue = check_queue(queue)
        total = 0
        while True:
            purged = yield from self._admin(protocol.Purged, protocol.encode_purge(queue))
            total += int(purged.cancelled)
            if not purged.left or not purged.cancelled:
                return total

    def pause(self, queue: Any) -> Call[protocol.Paused]:
        queue = check_queue(queue)
        reply: protocol.Paused = yield from self._admin(protocol.Paused,
                                                        protocol.encode_pause(queue))
        return reply

    def resume(self, queue: Any) -> Call[protocol.Resumed]:
        queue = check_queue(queue)
        reply: protocol.Resumed = yield from self._admin(protocol.Resumed,
                                                         protocol.encode_resume(queue))
        return reply

    def drain(self, workers: Any, hosts: Any, everyone: Any) -> Call[dict[str, Any]]:
        names = _names(workers, "workers")
        places = _names(hosts, "hosts")
        if not isinstance(everyone, bool):
            raise InvalidArgument(f"everyone must be True or False, got {everyone!r}", "everyone")
        frames = protocol.encode_drain(names, places, everyone)
        try:
            protocol.decode_client(frames)  # the broker's rules for a selector
        except ProtocolError as exc:
            raise InvalidArgument(f"drain: {exc}", "workers") from None
        reply: protocol.Draining = yield from self._admin(protocol.Draining, frames)
        return reply.report

    # ------------------------------------------------------------------ closing
    def close(self, timeout: Any) -> Call[list[str]]:
        """Wait (``timeout``, default ``request_timeout``) until the broker has confirmed
        every job submitted; then queue UNWAIT for those still unfinished (the caller sends
        it without waiting). Returns the ids still not confirmed."""
        session = self.session
        wait = check_wait(timeout)
        if wait is None:
            wait = session.link.request_timeout if timeout is None else math.inf
        unconfirmed = session.unconfirmed()
        if unconfirmed and session.link.last_heard:
            try:
                yield from self._confirmed(unconfirmed, time.monotonic() + wait)
            except TimeoutError:
                pass
            unconfirmed = session.unconfirmed(unconfirmed)
        session.outbox.clear()
        session.closing()
        return unconfirmed


def not_confirmed(endpoint: str, unconfirmed: list[str]) -> BrokerUnavailable:
    """What close() raises for jobs the broker did not confirm."""
    shown = ", ".join(unconfirmed[:5]) + (" ..." if len(unconfirmed) > 5 else "")
    return BrokerUnavailable(
        f"{len(unconfirmed)} submitted job(s) not confirmed by the broker at {endpoint} "
        f"before close: {shown}; they may not have reached it (submitting them again with "
        "the same ids is safe)")
