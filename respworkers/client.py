"""The Python client: submit jobs, wait for results, ask about and cancel jobs.

One DEALER socket with a fixed routing id, so a reconnect keeps the broker's
replies flowing to us. The client keeps each unfinished job's payload until its
outcome arrives: if the broker restarts, unconfirmed jobs are sent again and
confirmed ones are asked for (WAIT), and the job id makes either safe to repeat.
A Client is not thread-safe; use one per thread.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Union

import zmq

from . import protocol, sockets
from .config import DEFAULT_CLIENTS, DEFAULT_STATUS
from .errors import BrokerUnavailable, JobFailed, ProtocolError, Refused
from .security import (
    ClientKeys,
    client_keys,
    handshake_events,
    handshake_failure,
    secure_client,
    watch_handshakes,
)

if TYPE_CHECKING:
    from .config import ClientConfig

Payload = Union[bytes, bytearray, memoryview, str, list, tuple]

#: Seconds between liveness pings while waiting for results.
PING_INTERVAL = 1.0
#: How often a waiting client looks at its connection (handshakes, pings) between replies.
WATCH_INTERVAL = 0.1


@dataclass
class JobResult:
    """How one job ended.

    ``status`` is ``done`` (``frames`` holds the result), ``failed`` (``reason`` is the last
    attempt's: ``timeout``, ``error`` or ``worker-lost``; ``error`` the text), ``cancelled``,
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
        out: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.frames is not None:
            text = b"".join(self.frames)
            try:
                out["result"] = text.decode()
            except UnicodeDecodeError:
                out["result_hex"] = text.hex()
        else:
            out["reason"] = self.reason
            out["error"] = self.error
        return out


@dataclass
class _Pending:
    frames: list[bytes]  # the SUBMIT message, for re-sending after a broker restart
    confirmed: bool = False


def new_job_id() -> str:
    return uuid.uuid4().hex


class Client:
    """Submit jobs to a broker and collect their outcomes.

    Args:
        broker: the broker's clients endpoint.
        status: the broker's status endpoint (for :meth:`status`).
        request_timeout: seconds to wait for the broker's first answer before
            :class:`BrokerUnavailable`; after the first contact the client rides
            out broker restarts instead of giving up.
    """

    def __init__(
        self,
        broker: str = DEFAULT_CLIENTS,
        *,
        status: str = DEFAULT_STATUS,
        request_timeout: float = 5.0,
        keys: ClientKeys | None = None,
        ctx: zmq.Context | None = None,
    ) -> None:
        self.broker = broker
        self.status_endpoint = status
        self.request_timeout = request_timeout
        self.keys = keys
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, b"rwc-" + uuid.uuid4().bytes)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        secure_client(self.sock, keys)
        self._monitor = watch_handshakes(self.sock)
        self.sock.connect(broker)
        self.limits: dict[str, Any] = {}  # the broker's, from its PONG
        self.starting = False  # the last PONG said the broker is still loading its journal
        self._handshakes = 0
        self._closed = False
        self._told_silent = False
        self._pending: dict[str, _Pending] = {}
        self._done: dict[str, JobResult] = {}
        # Answers to QUERY and CANCEL, kept only while a request for that id waits for one.
        self._replies: dict[tuple[bytes, str], protocol.Reply] = {}
        self._asking: set[str] = set()
        self._broker_id: str | None = None
        self._last_heard = 0.0  # monotonic time of the broker's last message; 0 = never
        self._last_ping = 0.0
        self._last_watch = 0.0  # when _check_broker last looked at handshakes and pings
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        self.on_event: Callable[[str], None] | None = None  # progress notes, e.g. reconnects
        # Learn the broker's id before any job is confirmed: a later PONG with another
        # id means the broker restarted, and we ask again about every unfinished job.
        self._last_ping = time.monotonic()
        self._pings = 1
        self.sock.send_multipart(protocol.encode_ping())

    @classmethod
    def from_config(cls, cfg: ClientConfig, **kw: Any) -> Client:
        """A client for the ``[client]`` section of a config (endpoints, keys, timeout)."""
        return cls(cfg.broker, status=cfg.status, request_timeout=cfg.request_timeout,
                   keys=client_keys(cfg.secret_key, cfg.broker_key, "client"), **kw)

    # ----------------------------------------------------------------- context manager
    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # Leaving on an error: do not wait, and do not hide the error with another.
        self.close(timeout=0.0 if exc_type is not None else None, check=exc_type is None)

    def close(self, timeout: float | None = None, check: bool = True) -> None:
        """Close the connection, having delivered what was submitted.

        Jobs submitted but not yet confirmed by the broker (ACCEPTED: journaled) are waited
        for, up to ``timeout`` seconds (default ``request_timeout``); if some are still not
        confirmed then, raises :class:`BrokerUnavailable` naming them (with ``check``): they
        may never have reached the broker, and submitting them again (same ids) is safe.
        The broker is told that this client no longer waits for the jobs still unfinished,
        which keep running; fetch their outcomes later with :meth:`result` from any client.
        """
        if self._closed:
            return
        self._closed = True
        unconfirmed: list[str] = []
        try:
            wait = self.request_timeout if timeout is None else timeout
            unconfirmed = [j for j, p in self._pending.items() if not p.confirmed]
            if unconfirmed and self._last_heard:
                try:
                    self.wait_confirmed(unconfirmed, timeout=wait)
                except TimeoutError:
                    pass
                unconfirmed = [j for j in unconfirmed
                               if j in self._pending and not self._pending[j].confirmed]
            waiting = [j for j, p in self._pending.items() if p.confirmed] if self.limits else []
            try:
                self._send_ids(protocol.encode_unwait, waiting, sockets.NOBLOCK)
            except zmq.Again:
                pass
        finally:
            self.sock.disable_monitor()
            self._monitor.close(0)
            # Deliver the UNWAITs if the link is up; never hang the process on a dead broker.
            self.sock.close(linger=int(min(1.0, self.request_timeout) * 1000))
        if check and unconfirmed:
            shown = ", ".join(unconfirmed[:5]) + (" ..." if len(unconfirmed) > 5 else "")
            raise BrokerUnavailable(
                f"{len(unconfirmed)} submitted job(s) not confirmed by the broker at {self.broker} "
                f"before close: {shown}; they may not have reached it (submitting them again with "
                "the same ids is safe)")

    # ----------------------------------------------------------------- submitting
    def submit(
        self,
        payload: Payload,
        *,
        id: str | None = None,
        queue: str = protocol.DEFAULT_QUEUE,
        timeout: float | None = None,
        tries: int | None = None,
    ) -> str:
        """Send one job and return its id at once; collect it with :meth:`result`.

        Raises ValueError, before sending anything, for an id, queue, time limit, number
        of tries or size the broker would refuse (its limits are learnt on first contact).
        """
        job = {"payload": payload, "id": id, "queue": queue, "timeout": timeout, "tries": tries}
        return self.submit_many([job])[0]  # one job goes as a plain SUBMIT

    def submit_many(self, jobs: Iterable[Payload | Mapping[str, Any]]) -> list[str]:
        """Send many jobs in few messages (SUBMITS); return their ids in order.

        Each job is a payload, or a mapping of :meth:`submit`'s arguments (``payload``,
        ``id``, ``queue``, ``timeout``, ``tries``). Every job is checked before any is
        sent. Results of these jobs may arrive batched, which costs the broker (and
        this client) far less per job than one message each.
        """
        ids: list[str] = []
        todo: list[tuple[str, list[bytes]]] = []
        fresh: set[str] = set()
        for job in jobs:
            spec = dict(job) if isinstance(job, Mapping) else {"payload": job}
            job_id = spec.pop("id", None) or new_job_id()
            frames = self.validate(spec.pop("payload"), id=job_id, **spec)
            ids.append(job_id)
            if job_id not in self._pending and job_id not in fresh:
                fresh.add(job_id)
                todo.append((job_id, frames))
        for job_id, frames in todo:
            self._done.pop(job_id, None)
            self._pending[job_id] = _Pending(frames)
        self._send_submits([frames for _, frames in todo])
        return ids

    def _budgets(self) -> tuple[int, int]:
        """(payload bytes, frame bytes) one message may carry: the broker takes jobs whose
        payloads add up to max_message_size, and libzmq closes the connection of a peer
        sending any frame (a command line too) over max_message_size + 1024, unanswered."""
        if not self.limits:
            self._first_contact()  # learn the limits before the first batch
        limit = self.limits.get("max_message_size")
        payload = limit if isinstance(limit, int) else 64 << 20
        return payload, payload + 1024 - 64

    def _send_submits(self, submits: list[list[bytes]]) -> None:
        """SUBMIT frames of many jobs in as few messages as the broker's limits allow."""
        budget, line_budget = self._budgets()
        batch: list[list[bytes]] = []
        size, line = 0, 16
        for frames in submits:
            job_size = sum(map(len, frames)) - len(frames[0])
            job_line = len(frames[0]) - 4  # "<id> <queue> <ms> <tries> <frames>" and a space
            if batch and (len(batch) == protocol.MAX_BATCH or size + job_size > budget
                          or line + job_line > line_budget):
                self._send_batch(batch)
                batch, size, line = [], 0, 16
            batch.append(frames)
            size += job_size
            line += job_line
        if batch:
            self._send_batch(batch)

    def _send_ids(self, encode: Callable[[list[str]], list[bytes]], ids: list[str],
                  flags: int | None = None) -> None:
        """WAIT or UNWAIT for many ids, in as few messages as the limits allow."""
        if not ids:
            return
        line_budget = self._budgets()[1]
        chunk: list[str] = []
        line = 16
        for job_id in ids + [""]:
            if chunk and (not job_id or len(chunk) == protocol.MAX_BATCH
                          or line + len(job_id.encode()) + 1 > line_budget):
                if flags is None:
                    self._send(encode(chunk))
                else:
                    sockets.send(self.sock, encode(chunk), flags)
                chunk, line = [], 16
            if job_id:
                chunk.append(job_id)
                line += len(job_id.encode()) + 1

    def _send_batch(self, batch: list[list[bytes]]) -> None:
        self._send(batch[0] if len(batch) == 1 else protocol.encode_submits(batch))

    def validate(
        self,
        payload: Payload,
        *,
        id: str,
        queue: str = protocol.DEFAULT_QUEUE,
        timeout: float | None = None,
        tries: int | None = None,
    ) -> list[bytes]:
        """Check a job against the protocol and the broker's limits; return its SUBMIT frames."""
        job_id = id
        protocol.check_job_id(job_id.encode())
        protocol.check_queue(queue.encode())
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if tries is not None and (isinstance(tries, bool) or not isinstance(tries, int) or tries < 1):
            raise ValueError(f"tries must be a whole number >= 1, got {tries!r}")
        if not self.limits:
            self._first_contact()
        for value, key, unit in ((timeout, "max_timeout", "s"), (tries, "max_tries", "")):
            limit = self.limits.get(key)
            if value is not None and isinstance(limit, (int, float)) and value > limit:
                raise ValueError(f"job {job_id!r}: {key[4:]} {value:g}{unit} is over the "
                                 f"broker's {key} of {limit:g}{unit}")
        frames = protocol.encode_submit(
            job_id, queue, timeout, tries, protocol.as_frames(payload, "a payload"))
        limit = self.limits.get("max_message_size")
        size = sum(map(len, frames[1:]))
        if isinstance(limit, int) and size > limit:
            raise ValueError(f"job {job_id!r}: payload of {size} bytes is over the broker's "
                             f"max_message_size of {limit} bytes")
        return frames

    def attach(self, job_id: str) -> None:
        """Follow a job submitted elsewhere (another process, an earlier run)."""
        self._attach_many([job_id])

    def _attach_many(self, job_ids: list[str]) -> None:
        fresh = []
        for job_id in job_ids:
            protocol.check_job_id(job_id.encode())
            if job_id not in self._pending and job_id not in self._done:
                self._pending[job_id] = _Pending([], confirmed=True)
                fresh.append(job_id)
        self._send_ids(protocol.encode_wait, fresh)

    def wait_confirmed(self, job_ids: Iterable[str], timeout: float | None = None) -> None:
        """Return once the broker has confirmed (journaled) these jobs, or they ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for job_id in job_ids:
            while (p := self._pending.get(job_id)) is not None and not p.confirmed:
                self._wait_step(deadline)

    def _send(self, frames: list[bytes]) -> None:
        """Send without ever blocking forever: read replies while the pipe is full."""
        while True:
            try:
                sockets.send(self.sock, frames, sockets.NOBLOCK)
                return
            except zmq.Again:
                self._pump(0.05, want_out=True)

    # ----------------------------------------------------------------- waiting
    def result(self, job_id: str, timeout: float | None = None) -> bytes:
        """Wait for one job and return its result; raise :class:`JobFailed` otherwise."""
        outcome = self.outcome(job_id, timeout)
        if outcome.status == "refused":
            raise Refused(job_id, outcome.reason, outcome.error)
        return outcome.payload

    def outcome(self, job_id: str, timeout: float | None = None) -> JobResult:
        """Wait for one job and return how it ended (without raising on failure)."""
        if job_id not in self._pending and job_id not in self._done:
            self.attach(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while job_id not in self._done:
            self._wait_step(deadline)
        return self._done.pop(job_id)

    def results(self, job_ids: Iterable[str] | None = None, timeout: float | None = None
                ) -> Iterator[JobResult]:
        """Yield outcomes as they arrive (any order) until every named job has ended."""
        wanted = set(self._pending) | set(self._done) if job_ids is None else set(job_ids)
        self._attach_many([j for j in wanted if j not in self._pending and j not in self._done])
        deadline = None if timeout is None else time.monotonic() + timeout
        while wanted:
            ready = [j for j in self._done if j in wanted]  # O(arrived), not O(wanted)
            for job_id in ready:
                wanted.discard(job_id)
                yield self._done.pop(job_id)
            if wanted:
                self._wait_step(deadline)

    def run(self, payload: Payload, **options: Any) -> bytes:
        """Submit one job and wait for its result."""
        return self.result(self.submit(payload, **options))

    def map(self, payloads: Iterable[Payload], **options: Any) -> list[bytes]:
        """Submit many jobs, wait for all, return their results in input order."""
        ids = self.submit_many({"payload": p, **options} for p in payloads)
        got = {r.id: r for r in self.results(ids)}
        return [got[i].payload for i in ids]

    def _wait_step(self, deadline: float | None) -> None:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise TimeoutError("timed out waiting for job results")
        step = PING_INTERVAL if deadline is None else min(PING_INTERVAL, deadline - now)
        self._pump(step)
        self._check_broker()

    def _first_contact(self) -> None:
        """Wait for the answer to our first ping: the broker's id and limits."""
        while self._last_heard == 0.0:
            self._pump(0.05)
            self._check_broker()

    def _check_broker(self) -> None:
        """Ping while waiting; before first contact, give up after ``request_timeout``."""
        now = time.monotonic()
        if self._last_heard and now - self._last_watch < WATCH_INTERVAL:
            return  # called after every batch of replies: the checks below need not be
        self._last_watch = now
        succeeded, why = handshake_events(self._monitor, self.broker, self.keys)
        if succeeded:
            reconnected = self._handshakes > 0
            self._handshakes += succeeded
            if reconnected and self._pending:
                self._resync()  # replies sent while we were away may be lost
        if self._last_heard == 0.0:
            if why:
                raise BrokerUnavailable(why)
            if now - self._last_ping > self.request_timeout:
                raise BrokerUnavailable(
                    f"no answer from the broker at {self.broker} within {self.request_timeout:g}s"
                    " (is `rw broker` running there?)"
                )
            return
        if now - self._last_ping >= PING_INTERVAL:
            self._last_ping = now
            self._pings += 1
            self._send(protocol.encode_ping())
            if now - self._last_heard > 3 * PING_INTERVAL + 1 and self.on_event and not self._told_silent:
                self._told_silent = True  # once per silence, not at every ping
                self.on_event(f"broker at {self.broker} not answering; waiting for it")

    # ----------------------------------------------------------------- receiving
    def _pump(self, timeout: float, want_out: bool = False) -> None:
        ms = max(0, int(timeout * 1000))
        if want_out:
            if not self.sock.poll(ms, zmq.POLLIN | zmq.POLLOUT) & zmq.POLLIN:
                return
        elif not self._poller.poll(ms):  # one Poller for the client's life: cheaper
            return
        while True:
            try:
                frames = sockets.recv(self.sock, sockets.NOBLOCK)
            except zmq.Again:
                return
            self._handle(frames)

    def _handle(self, frames: list[bytes]) -> None:
        try:
            reply = protocol.decode_reply(frames)
        except ProtocolError:
            return  # a bad reply is ignored; the wait goes on
        # Pings went unanswered for a while: outcomes sent meanwhile may have been
        # dropped (or the broker restarted). Ask again once we hear from it.
        cut_off = bool(self._last_heard) and self._last_ping - self._last_heard > 2 * PING_INTERVAL
        self._last_heard = time.monotonic()
        self._told_silent = False
        cmd = reply.command
        if cmd == protocol.ACCEPTED:
            pending = self._pending
            for job_id in (reply.job_id, *(f.decode("utf-8", "replace") for f in reply.frames)):
                p = pending.get(job_id)
                if p is not None:
                    p.confirmed = True
        elif cmd == protocol.RESULT:
            self._finish(JobResult(reply.job_id, "done", reply.frames))
        elif cmd == protocol.RESULTS:
            for job_id, frames in reply.batch or ():
                self._finish(JobResult(job_id, "done", frames))
        elif cmd == protocol.FAILED:
            reason, error = (f.decode("utf-8", "replace") for f in reply.frames)
            self._finish(JobResult(reply.job_id, "failed", None, reason, error))
        elif cmd == protocol.CANCELLED:
            self._finish(JobResult(reply.job_id, "cancelled", None, "cancelled"))
        elif cmd == protocol.REFUSED:
            code, text = (f.decode("utf-8", "replace") for f in reply.frames)
            self._finish(JobResult(reply.job_id, "refused", None, code, text))
        elif cmd == protocol.PONG:
            try:
                broker_id, limits = protocol.decode_pong(reply)
            except ProtocolError:
                return
            # A broker loading a large journal answers pings but nothing else yet: wait.
            self.starting = bool(limits.pop("starting", False))
            if self.starting and self.on_event:
                self.on_event("the broker is starting (loading its journal); waiting")
            self.limits = limits
            if self._broker_id is not None and broker_id != self._broker_id:
                cut_off = True  # the broker restarted
            elif self._broker_id is None and self._pings > 1:
                cut_off = True  # our first ping may have died with an earlier broker
            self._broker_id = broker_id
        elif cmd == protocol.RESYNC:
            cut_off = True  # the broker dropped outcomes for us while we did not read
        elif cmd == protocol.UNKNOWN:
            p = self._pending.get(reply.job_id)
            if p is not None and p.frames:
                self._send(p.frames)  # the broker lost it (no journal): submit again
            elif p is not None:
                self._pending.pop(reply.job_id)
                self._done[reply.job_id] = JobResult(
                    reply.job_id, "unknown", None, "unknown", "the broker does not know this job")
            if reply.job_id in self._asking:
                self._replies[(cmd, reply.job_id)] = reply
        elif reply.job_id in self._asking:  # INFO, for a QUERY or CANCEL still waiting
            self._replies[(cmd, reply.job_id)] = reply
        if cut_off and self._pending:
            self._resync()

    def _finish(self, result: JobResult) -> None:
        # Only jobs we still wait for: a repeated outcome (after a resync) is dropped here,
        # so each result reaches the caller exactly once.
        if result.id in self._pending:  # stored before it leaves _pending: an interrupt
            self._done[result.id] = result  # in between must not lose it
            del self._pending[result.id]

    def _resync(self) -> None:
        """A new broker answered: re-send what it may not have, ask about the rest."""
        if self.on_event:
            self.on_event("reconnected to the broker; asking about unfinished jobs")
        # Batched: after a long silence thousands of jobs may be unfinished, and one
        # message each would add to whatever load made the broker slow to answer.
        waits = [j for j, p in self._pending.items() if p.confirmed or not p.frames]
        resubmits = [p.frames for p in self._pending.values() if not (p.confirmed or not p.frames)]
        self._send_ids(protocol.encode_wait, waits)
        self._send_submits(resubmits)

    # ----------------------------------------------------------------- inspect and cancel
    def _request(self, command: bytes, job_id: str) -> dict[str, Any] | None:
        protocol.check_job_id(job_id.encode())
        self._asking.add(job_id)
        try:
            return self._await_reply(command, job_id)
        finally:
            self._asking.discard(job_id)
            self._replies.pop((protocol.INFO, job_id), None)
            self._replies.pop((protocol.UNKNOWN, job_id), None)

    def _await_reply(self, command: bytes, job_id: str) -> dict[str, Any] | None:
        self._send(protocol.encode_job_ref(command, job_id))
        deadline = time.monotonic() + self.request_timeout
        while True:
            for cmd in (protocol.INFO, protocol.UNKNOWN):
                reply = self._replies.pop((cmd, job_id), None)
                if reply is not None:
                    return reply.info if cmd == protocol.INFO else None
            now = time.monotonic()
            if now >= deadline:
                if self.starting and now - self._last_heard < 3 * PING_INTERVAL:
                    deadline = now + self.request_timeout  # it answers pings: loading its journal
                else:
                    raise BrokerUnavailable(
                        f"no answer from the broker at {self.broker} within {self.request_timeout:g}s")
            self._pump(min(deadline - now, PING_INTERVAL))
            self._check_broker()

    def query(self, job_id: str) -> dict[str, Any] | None:
        """The job's state as the broker knows it, or None if it does not know the id."""
        return self._request(protocol.QUERY, job_id)

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a job; returns its state afterwards, or None if the id is unknown."""
        return self._request(protocol.CANCEL, job_id)

    def status(self) -> dict[str, Any]:
        return fetch_status(self.status_endpoint, self.request_timeout, self.ctx, self.keys)


def fetch_status(endpoint: str, timeout: float = 5.0, ctx: zmq.Context | None = None,
                 keys: ClientKeys | None = None) -> dict[str, Any]:
    """Ask a broker's status endpoint for one snapshot (a fresh REQ each time, never stuck)."""
    ctx = ctx or zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    secure_client(sock, keys)
    monitor = watch_handshakes(sock)
    try:
        sock.connect(endpoint)
        sock.send_multipart(protocol.encode_status_request()[1:])  # REQ adds the delimiter
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            why = handshake_failure(monitor, endpoint, keys)
            raise BrokerUnavailable(why or (
                f"no answer from the broker's status endpoint {endpoint} within {timeout:g}s"
                " (is `rw broker` running, and is this its status endpoint?)"
            ))
        return protocol.decode_snapshot(sock.recv_multipart())
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
