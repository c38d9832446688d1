"""The Python client: submit jobs, wait for results, ask about and cancel jobs.

One DEALER socket with a fixed routing id, so a reconnect keeps the broker's replies
flowing to us. What to send and what the replies mean is :mod:`respworkers.session`'s
business; this module moves frames and waits. A Client is not thread-safe; use one per
thread.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Callable, Union

import zmq

from . import protocol, sockets
from .config import DEFAULT_CLIENTS, DEFAULT_STATUS
from .errors import BrokerUnavailable, Refused
from .security import (
    ClientKeys,
    client_keys,
    handshake_events,
    handshake_failure,
    secure_client,
    watch_handshakes,
)
from .session import PING_INTERVAL, WATCH_INTERVAL, JobResult, Session

if TYPE_CHECKING:
    from .config import ClientConfig

__all__ = ["Client", "JobResult", "fetch_status", "new_job_id"]

Payload = Union[bytes, bytearray, memoryview, str, "list[Any]", "tuple[Any, ...]"]


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
        ctx: zmq.Context[Any] | None = None,
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
        self._closed = False
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        # Its first PING (queued at once) teaches us the broker's id and limits before any
        # job is confirmed: a later PONG with another id means the broker restarted.
        self.session = Session(broker, request_timeout, time.monotonic())
        self._flush()

    @property
    def limits(self) -> dict[str, Any]:
        """The broker's limits, from its PONG (empty before first contact)."""
        return self.session.link.limits

    @property
    def on_event(self) -> Callable[[str], None] | None:
        """Called with progress notes (reconnects, a silent broker)."""
        return self.session.on_event

    @on_event.setter
    def on_event(self, callback: Callable[[str], None] | None) -> None:
        self.session.on_event = callback

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
        session = self.session
        unconfirmed: list[str] = []
        try:
            wait = self.request_timeout if timeout is None else timeout
            unconfirmed = session.unconfirmed()
            if unconfirmed and session.link.last_heard:
                try:
                    self.wait_confirmed(unconfirmed, timeout=wait)
                except TimeoutError:
                    pass
                unconfirmed = session.unconfirmed(unconfirmed)
            session.outbox.clear()
            session.closing()
            self._flush(block=False)
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
        priority: int | None = None,
        delay: float | timedelta | None = None,
        eta: datetime | float | None = None,
        expires: float | timedelta | datetime | None = None,
        tenant: str | None = None,
        backoff: float | None = None,
        backoff_max: float | None = None,
    ) -> str:
        """Send one job and return its id at once; collect it with :meth:`result`.

        Options (each None: the broker's default): ``timeout`` seconds one attempt may take;
        ``tries``; ``priority`` 0..9 (9 first; 5 by default); ``delay`` seconds or ``eta`` a
        time before which it does not run; ``expires`` seconds from now or a time by which it
        must have started, else it ends ``expired``; ``tenant``, whose job it is (tenants
        take turns within a queue); ``backoff``/``backoff_max`` seconds before a retry
        (doubling per attempt, with jitter).

        Raises ValueError, before sending anything, for an id, queue, option or size the
        broker would refuse (its limits are learnt on first contact).
        """
        job = {"payload": payload, "id": id, "queue": queue, "timeout": timeout, "tries": tries,
               "priority": priority, "delay": delay, "eta": eta, "expires": expires,
               "tenant": tenant, "backoff": backoff, "backoff_max": backoff_max}
        return self.submit_many([job])[0]  # one job goes as a plain SUBMIT

    def submit_many(self, jobs: Iterable[Payload | Mapping[str, Any]]) -> list[str]:
        """Send many jobs in few messages (SUBMITS); return their ids in order.

        Each job is a payload, or a mapping of :meth:`submit`'s arguments (``payload``,
        ``id``, ``queue`` and the options). Every job is checked before any is
        sent. Results of these jobs may arrive batched, which costs the broker (and
        this client) far less per job than one message each.
        """
        checked: list[tuple[str, list[bytes]]] = []
        for job in jobs:
            spec: dict[str, Any] = dict(job) if isinstance(job, Mapping) else {"payload": job}
            job_id = str(spec.pop("id", None) or new_job_id())
            checked.append((job_id, self.validate(spec.pop("payload"), id=job_id, **spec)))
        self.session.submit(checked)
        self._flush()
        return [job_id for job_id, _ in checked]

    def validate(
        self, payload: Payload, *, id: str, queue: str = protocol.DEFAULT_QUEUE, **options: Any,
    ) -> list[bytes]:
        """Check a job against the protocol and the broker's limits; return its SUBMIT frames."""
        if not self.session.link.last_heard:
            self._first_contact()
        return self.session.check(payload, id, queue, **options)

    def attach(self, job_id: str) -> None:
        """Follow a job submitted elsewhere (another process, an earlier run)."""
        self._attach_many([job_id])

    def _attach_many(self, job_ids: list[str]) -> None:
        if job_ids:
            if not self.session.link.last_heard:
                self._first_contact()  # the limits bound how many ids one WAIT may carry
            self.session.attach(job_ids)
            self._flush()

    def wait_confirmed(self, job_ids: Iterable[str], timeout: float | None = None) -> None:
        """Return once the broker has confirmed (journaled) these jobs, or they ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = self.session.pending
        for job_id in job_ids:
            while (p := pending.get(job_id)) is not None and not p.confirmed:
                self._wait_step(deadline)

    # ----------------------------------------------------------------- waiting
    def result(self, job_id: str, timeout: float | None = None) -> bytes:
        """Wait for one job and return its result; raise :class:`JobFailed` otherwise."""
        outcome = self.outcome(job_id, timeout)
        if outcome.status == "refused":
            raise Refused(job_id, outcome.reason, outcome.error)
        return outcome.payload

    def outcome(self, job_id: str, timeout: float | None = None) -> JobResult:
        """Wait for one job and return how it ended (without raising on failure)."""
        session = self.session
        if job_id not in session.pending and job_id not in session.done:
            self.attach(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while job_id not in session.done:
            self._wait_step(deadline)
        return session.done.pop(job_id)

    def results(self, job_ids: Iterable[str] | None = None, timeout: float | None = None
                ) -> Iterator[JobResult]:
        """Yield outcomes as they arrive (any order) until every named job has ended."""
        session = self.session
        wanted = set(session.pending) | set(session.done) if job_ids is None else set(job_ids)
        self._attach_many([j for j in wanted if j not in session.pending and j not in session.done])
        deadline = None if timeout is None else time.monotonic() + timeout
        done = session.done
        while wanted:
            ready = [j for j in done if j in wanted]  # O(arrived), not O(wanted)
            for job_id in ready:
                wanted.discard(job_id)
                yield done.pop(job_id)
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

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield the job's progress reports as its worker sends them, until it ends (then
        collect the outcome with :meth:`outcome`). Also see :attr:`on_progress`."""
        session = self.session
        session.watch(job_id)
        self._flush()
        deadline = None if timeout is None else time.monotonic() + timeout
        news = session.progress_news
        while True:
            while news:
                watched, report = news.popleft()
                if watched == job_id:
                    yield report
                # reports of other watched jobs went to on_progress already
            if job_id in session.done:
                return
            self._wait_step(deadline)

    def follow_progress(self, job_id: str) -> None:
        """Ask for the job's progress reports without iterating :meth:`watch`: each goes to
        :attr:`on_progress` as it arrives, while this client waits for anything."""
        self.session.watch(job_id)
        self._flush()

    @property
    def on_progress(self) -> Callable[[str, dict[str, Any]], None] | None:
        """Called with (job id, report) for every progress report of a watched job."""
        return self.session.on_progress

    @on_progress.setter
    def on_progress(self, callback: Callable[[str, dict[str, Any]], None] | None) -> None:
        self.session.on_progress = callback

    # ----------------------------------------------------------------- operators' requests
    def jobs(self, state: str | None = None, queue: str | None = None, limit: int = 100
             ) -> list[dict[str, Any]]:
        """Jobs the broker holds, newest first: id, queue, state, attempt, tries, priority,
        tenant, age and the error's first line (pages are fetched as needed)."""
        found: list[dict[str, Any]] = []
        cursor: int | None = 0
        while cursor is not None and len(found) < limit:
            page = self._admin(protocol.JobsPage, protocol.encode_list_jobs(
                {"state": state, "queue": queue, "limit": min(1000, limit - len(found)),
                 "cursor": cursor})).page
            if page.get("error"):
                raise ValueError(page["error"])
            found.extend(page.get("jobs", []))
            cursor = page.get("cursor")
        return found[:limit]

    def requeue(self, job_ids: Iterable[str]) -> dict[str, Any]:
        """Run failed, cancelled or expired jobs again under the same ids (fresh tries).
        Returns {"requeued": [...], "unknown": [...], "skipped": {id: why}}."""
        ids = list(dict.fromkeys(job_ids))
        report: dict[str, Any] = {"requeued": [], "unknown": [], "skipped": {}}
        for i in range(0, len(ids), protocol.MAX_BATCH):
            for j in ids[i:i + protocol.MAX_BATCH]:
                protocol.check_job_id(j.encode())
            got = self._admin(protocol.Requeued,
                              protocol.encode_requeue(ids[i:i + protocol.MAX_BATCH])).report
            report["requeued"] += got.get("requeued", [])
            report["unknown"] += got.get("unknown", [])
            report["skipped"].update(got.get("skipped", {}))
        return report

    def purge(self, queue: str) -> int:
        """Cancel every job waiting in ``queue`` (queued or scheduled); how many were."""
        protocol.check_queue(queue.encode())
        total = 0
        while True:
            purged = self._admin(protocol.Purged, protocol.encode_purge(queue))
            total += int(purged.cancelled)
            if not purged.left or not purged.cancelled:
                return total

    def pause(self, queue: str) -> protocol.Paused:
        """Dispatch nothing from ``queue`` until :meth:`resume`; it keeps taking jobs. The
        reply says how many jobs wait in it and whether this call paused it (``changed``)."""
        protocol.check_queue(queue.encode())
        reply: protocol.Paused = self._admin(protocol.Paused, protocol.encode_pause(queue))
        return reply

    def resume(self, queue: str) -> protocol.Resumed:
        """Dispatch from ``queue`` again; idle workers get its jobs at once (``dispatched``)."""
        protocol.check_queue(queue.encode())
        reply: protocol.Resumed = self._admin(protocol.Resumed, protocol.encode_resume(queue))
        return reply

    def drain(self, workers: Iterable[str] = (), *, hosts: Iterable[str] = (),
              everyone: bool = False) -> dict[str, Any]:
        """Ask workers (names as ``rw status`` shows them, every worker of ``hosts``, or
        ``everyone``) to finish the job in hand and leave, as on SIGTERM. Returns
        {"asked": [{"name", "job"}], "unknown": [names and hosts that matched none]}."""
        frames = protocol.encode_drain(list(dict.fromkeys(workers)), list(dict.fromkeys(hosts)),
                                       everyone)
        protocol.decode_client(frames)  # a bad selector is the caller's mistake: ProtocolError
        reply: protocol.Draining = self._admin(protocol.Draining, frames)
        return reply.report

    def _admin(self, reply_type: type, frames: list[bytes]) -> Any:
        if not self.session.link.last_heard:
            self._first_contact()
        slot = self.session.request(reply_type, frames)
        self._flush()
        deadline = time.monotonic() + self.request_timeout
        while not slot:
            now = time.monotonic()
            if now >= deadline:
                if not self.session.link.waits_for_start(now):
                    raise BrokerUnavailable(f"no answer from the broker at {self.broker} "
                                            f"within {self.request_timeout:g}s")
                deadline = now + self.request_timeout
            self._pump(min(deadline - now, PING_INTERVAL))
            self._keep_alive()
        return slot[0]

    # ----------------------------------------------------------------- inspect and cancel
    def query(self, job_id: str) -> dict[str, Any] | None:
        """The job's state as the broker knows it, or None if it does not know the id."""
        return self._request(protocol.QUERY, job_id)

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a job; returns its state afterwards, or None if the id is unknown."""
        return self._request(protocol.CANCEL, job_id)

    def _request(self, command: bytes, job_id: str) -> dict[str, Any] | None:
        session = self.session
        session.ask(command, job_id)
        try:
            self._flush()
            deadline = time.monotonic() + self.request_timeout
            while (answer := session.answered(job_id)) is None:
                now = time.monotonic()
                if now >= deadline:
                    if not session.link.waits_for_start(now):
                        raise BrokerUnavailable(f"no answer from the broker at {self.broker} "
                                                f"within {self.request_timeout:g}s")
                    deadline = now + self.request_timeout  # it answers pings: loading its journal
                self._pump(min(deadline - now, PING_INTERVAL))
                self._keep_alive()
            return answer.info if isinstance(answer, protocol.Info) else None
        finally:
            session.stop_asking(job_id)

    def status(self) -> dict[str, Any]:
        return fetch_status(self.status_endpoint, self.request_timeout, self.ctx, self.keys)

    # ----------------------------------------------------------------- I/O
    def _wait_step(self, deadline: float | None) -> None:
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise TimeoutError("timed out waiting for job results")
        self._pump(PING_INTERVAL if deadline is None else min(PING_INTERVAL, deadline - now))
        self._keep_alive()

    def _first_contact(self) -> None:
        """Wait for the answer to our first ping: the broker's id and limits."""
        while not self.session.link.last_heard:
            self._pump(0.05)
            self._keep_alive()

    def _keep_alive(self) -> None:
        """Handshakes, pings, and giving up before first contact: not after every reply."""
        link = self.session.link
        now = time.monotonic()
        if link.last_heard and now - link.last_watch < WATCH_INTERVAL:
            return
        link.last_watch = now
        succeeded, why = handshake_events(self._monitor, self.broker, self.keys)
        self.session.keep_alive(now, succeeded, why)
        self._flush()

    def _flush(self, block: bool = True) -> None:
        """Send what the session has queued, in order (reading replies while the pipe is full)."""
        outbox = self.session.outbox
        while outbox:
            frames = outbox.popleft()
            while True:
                try:
                    sockets.send(self.sock, frames, sockets.NOBLOCK)
                    break
                except zmq.Again:
                    if not block:
                        outbox.clear()
                        return
                    self._pump(0.05, want_out=True)

    def _pump(self, timeout: float, want_out: bool = False) -> None:
        ms = max(0, int(timeout * 1000))
        if want_out:
            if not self.sock.poll(ms, zmq.POLLIN | zmq.POLLOUT) & zmq.POLLIN:
                return
        elif not self._poller.poll(ms):  # one Poller for the client's life: cheaper
            return
        received = self.session.received
        while True:
            try:
                frames = sockets.recv(self.sock, sockets.NOBLOCK)
            except zmq.Again:
                break
            received(frames, time.monotonic())
        if not want_out:
            self._flush()


def fetch_status(endpoint: str, timeout: float = 5.0, ctx: zmq.Context[Any] | None = None,
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
