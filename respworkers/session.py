"""A client's side of the protocol, without I/O: what it waits for, what it sends, when it
pings and resyncs. The blocking :class:`~respworkers.client.Client` drives it (and so can an
asyncio client): they only move frames between a socket and this.

Two parts: :class:`Link` is the connection's liveness (first contact, pings, the broker's
id and limits, when replies may have been lost), :class:`Session` the bookkeeping (each
unfinished job's SUBMIT frames until its outcome, outcomes not yet collected, answers to
QUERY and CANCEL) and the messages that follow from both, in :attr:`Session.outbox`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

from . import protocol
from .errors import BrokerUnavailable, JobFailed, ProtocolError

#: Seconds between liveness pings while waiting for results.
PING_INTERVAL = 1.0
#: How often a waiting client looks at its connection (handshakes, pings) between replies.
WATCH_INTERVAL = 0.1


@dataclass
class JobResult:
    """How one job ended.

    ``status`` is ``done`` (``frames`` holds the result), ``failed`` (``reason`` is the last
    attempt's: ``timeout``, ``error`` or ``worker-lost``; ``error`` the text, whose first line
    is the summary), ``cancelled``, ``refused`` (``reason`` is the broker's code: ``full``,
    ``limit``, ``journal``, ``shutdown``; ``error`` its text) or ``unknown`` (the broker does
    not know the id: never submitted, or forgotten after its retention).
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
        # Answers to QUERY and CANCEL, kept only while a request for that id waits for one.
        self.answers: dict[str, protocol.Info | protocol.Unknown] = {}
        self.asking: set[str] = set()
        self.outbox: deque[list[bytes]] = deque([protocol.encode_ping()])
        self.on_event: Callable[[str], None] | None = None  # progress notes, e.g. reconnects
        # Jobs' progress, for those being watched: the latest, and what arrived since looked at.
        self.progress: dict[str, dict[str, Any]] = {}
        self.progress_news: deque[tuple[str, dict[str, Any]]] = deque(maxlen=10_000)
        self.watching: set[str] = set()
        self.on_progress: Callable[[str, dict[str, Any]], None] | None = None
        # Requests answered by one reply of their own kind (JOBS, REQUEUE, PURGE, PAUSE,
        # RESUME, DRAIN): the broker
        # answers a client's requests in order, so replies fill the oldest slot of the kind.
        self.requests: dict[type, deque[list[Any]]] = {}
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

    # ------------------------------------------------------------------ submitting
    def check(self, payload: Any, job_id: str, queue: str = protocol.DEFAULT_QUEUE,
              **options: Any) -> list[bytes]:
        """A job's SUBMIT frames, checked against the protocol and the broker's limits (which
        must be known: the caller waits for first contact). ``options`` are those of
        :func:`respworkers.options.job_options`."""
        from .options import job_options

        protocol.check_job_id(job_id.encode())
        protocol.check_queue(queue.encode())
        opts = job_options(**options, what=f"job {job_id!r}")
        limits = self.link.limits
        for value, key, unit in ((opts.timeout, "max_timeout", "s"), (opts.tries, "max_tries", "")):
            limit = limits.get(key)
            if value is not None and isinstance(limit, (int, float)) and value > limit:
                raise ValueError(f"job {job_id!r}: {key[4:]} {value:g}{unit} is over the "
                                 f"broker's {key} of {limit:g}{unit}")
        frames = protocol.encode_submit(
            job_id, queue, opts, protocol.as_frames(payload, "a payload"))
        limit = limits.get("max_message_size")
        size = sum(map(len, frames[1:]))
        if isinstance(limit, int) and size > limit:
            raise ValueError(f"job {job_id!r}: payload of {size} bytes is over the broker's "
                             f"max_message_size of {limit} bytes")
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
        for job_id in reply.job_ids:
            p = pending.get(job_id)
            if p is not None:
                p.confirmed = True
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
        if reply.job_id in self.watching:
            self.progress[reply.job_id] = reply.progress
            self.progress_news.append((reply.job_id, reply.progress))
            if self.on_progress is not None:
                self.on_progress(reply.job_id, reply.progress)
        return False

    def _admin_reply(self, reply: protocol.JobsPage | protocol.Requeued | protocol.Purged
                     | protocol.Paused | protocol.Resumed | protocol.Draining) -> bool:
        slots = self.requests.get(type(reply))
        if slots:
            slots.popleft().append(reply)
        return False

    def request(self, reply_type: type, frames: list[bytes]) -> list[Any]:
        """Send a request answered by one ``reply_type``; the reply lands in the list returned."""
        slot: list[Any] = []
        self.requests.setdefault(reply_type, deque()).append(slot)
        self.outbox.append(frames)
        return slot

    def watch(self, job_id: str) -> None:
        """Follow a job's progress (WATCH), and wait for its outcome (WAIT) if not already."""
        protocol.check_job_id(job_id.encode())
        self.watching.add(job_id)
        self.outbox.append(protocol.encode_watch(job_id))
        if job_id not in self.pending and job_id not in self.done:
            self.attach([job_id])

    def _refused(self, reply: protocol.Refused) -> bool:
        return self._ended(JobResult(reply.job_id, "refused", None, reply.code, reply.text))

    def _answer(self, reply: protocol.Info | protocol.Unknown) -> bool:
        if reply.job_id in self.asking:
            self.answers[reply.job_id] = reply
        return False

    def _unknown(self, reply: protocol.Unknown) -> bool:
        p = self.pending.get(reply.job_id)
        if p is not None and p.frames:
            self.outbox.append(p.frames)  # the broker lost it (no journal): submit again
        elif p is not None:
            del self.pending[reply.job_id]
            self.done[reply.job_id] = JobResult(
                reply.job_id, "unknown", None, "unknown", "the broker does not know this job")
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

    def closing(self) -> None:
        """Tell the broker we no longer wait for the jobs still unfinished (UNWAIT)."""
        if self.link.limits:
            self.ids(protocol.encode_unwait, [j for j, p in self.pending.items() if p.confirmed])
