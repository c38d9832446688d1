"""The Python client: submit jobs, wait for results, ask about and cancel jobs.

One DEALER socket with a fixed routing id, so a reconnect keeps the broker's replies
flowing to us. What each call sends, waits for and means is :mod:`respworkers.session`'s
business (the asyncio client in :mod:`respworkers.aio` runs the same code); this module
moves frames and waits.

Threads: a :class:`Client` is not thread-safe. Its calls must not overlap: use it from one
thread, or hand it between threads with a lock or a queue in between. Iterating
:meth:`Client.results` or :meth:`Client.watch` is a call in progress between items, but
other calls from the same thread may come in between. :class:`ThreadSafeClient` may be
called from any number of threads at once, over one connection.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Callable, TypeVar, Union

import zmq

from . import protocol, sockets
from .config import DEFAULT_CLIENTS, DEFAULT_STATUS
from .errors import BrokerUnavailable, ClientClosed, InvalidArgument
from .security import (
    ClientKeys,
    client_keys,
    handshake_events,
    handshake_failure,
    secure_client,
    watch_handshakes,
)
from .session import (
    PING_INTERVAL,
    Call,
    Calls,
    JobResult,
    Session,
    Stream,
    Wait,
    check_request_timeout,
    check_wait,
    new_job_id,
    not_confirmed,
)
from .util import WakePipe

if TYPE_CHECKING:
    from .config import ClientConfig

__all__ = ["Client", "JobResult", "ThreadSafeClient", "fetch_status", "new_job_id"]

Payload = Union[bytes, bytearray, memoryview, str, "list[Any]", "tuple[Any, ...]"]
T = TypeVar("T")
C = TypeVar("C", bound="ClientBase")


SocketKind = Callable[[zmq.Context[Any], int], zmq.Socket[Any]]


def open_dealer(ctx: zmq.Context[Any], broker: str, keys: ClientKeys | None,
                kind: SocketKind = zmq.Socket) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
    """A client's DEALER, connected, and the monitor of its handshakes. The routing id is
    fixed for the client's life: after a reconnect the broker's replies still reach it.

    ``ctx`` must be a plain zmq.Context (the monitor is read without awaiting); ``kind``
    makes the socket (zmq.asyncio.Socket for the asyncio client). The socket made is the
    one to close: a second Python object over the same libzmq socket would not know it was
    closed, and could close another socket later allocated at the same address."""
    if not isinstance(broker, str) or not broker:
        raise InvalidArgument(f"broker must be an endpoint such as tcp://host:7781, got {broker!r}",
                              "broker")
    sock = kind(ctx, zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"rwc-" + uuid.uuid4().bytes)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    secure_client(sock, keys)
    monitor = watch_handshakes(sock)
    try:
        sock.connect(broker)
    except zmq.ZMQError as exc:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        raise InvalidArgument(f"broker {broker!r}: {exc}", "broker") from None
    return sock, monitor


class ClientBase:
    """What both clients (blocking and asyncio) hold besides their socket: the endpoints,
    the session and its calls, and the callbacks."""

    _monitor: zmq.Socket[Any]  # the handshake monitor of the subclass's socket

    def __init__(self, broker: str, status: str, request_timeout: float,
                 keys: ClientKeys | None) -> None:
        self.broker = broker
        self.status_endpoint = status
        self.request_timeout = check_request_timeout(request_timeout)
        self.keys = keys
        self._closed = False
        # Its first PING (queued at once) teaches us the broker's id and limits before any
        # job is confirmed: a later PONG with another id means the broker restarted.
        self.session = Session(broker, self.request_timeout, time.monotonic())
        self.calls = Calls(self.session)

    @classmethod
    def from_config(cls: type[C], cfg: ClientConfig, **kw: Any) -> C:
        """A client for the ``[client]`` section of a config (endpoints, keys, timeout)."""
        return cls(cfg.broker, status=cfg.status, request_timeout=cfg.request_timeout,
                   keys=client_keys(cfg.secret_key, cfg.broker_key, "client"), **kw)

    @property
    def closed(self) -> bool:
        return self._closed

    def _close_socket(self, sock: zmq.Socket[Any]) -> None:
        """The last step of closing either client: the monitor, then the socket, lingering
        to deliver the UNWAITs if the link is up but never hanging on a dead broker."""
        sock.disable_monitor()
        self._monitor.close(0)
        sock.close(linger=int(min(1.0, self.request_timeout) * 1000))

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

    @property
    def on_progress(self) -> Callable[[str, dict[str, Any]], None] | None:
        """Called with (job id, report) for every progress report of a watched job."""
        return self.session.on_progress

    @on_progress.setter
    def on_progress(self, callback: Callable[[str, dict[str, Any]], None] | None) -> None:
        self.session.on_progress = callback

    def _handshakes(self) -> tuple[int, str | None]:
        return handshake_events(self._monitor, self.broker, self.keys)

    def _closed_error(self) -> ClientClosed:
        return ClientClosed(f"the client of {self.broker} is closed")


class Client(ClientBase):
    """Submit jobs to a broker and collect their outcomes.

    Args:
        broker: the broker's clients endpoint.
        status: the broker's status endpoint (for :meth:`status`).
        request_timeout: seconds to wait for the broker's first answer before
            :class:`BrokerUnavailable`; after the first contact the client rides
            out broker restarts instead of giving up.

    Not thread-safe: calls must not overlap (see :class:`ThreadSafeClient`). Every bad
    argument raises :class:`~respworkers.errors.InvalidArgument` (a ValueError) naming it,
    before anything is sent.
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
        super().__init__(broker, status, request_timeout, keys)
        self.ctx = ctx or zmq.Context.instance()
        self.sock, self._monitor = open_dealer(self.ctx, broker, keys)
        self._poller = zmq.Poller()  # one for the client's life: cheaper
        self._poller.register(self.sock, zmq.POLLIN)
        self._flush()

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
        Calls made afterwards raise :class:`~respworkers.errors.ClientClosed`.
        """
        if self._closed:
            return
        check_wait(timeout)
        unconfirmed: list[str] = []
        try:
            unconfirmed = self._drive(self.calls.close(timeout), flush=False)
        finally:
            self._closed = True
            self._shutdown()
        if check and unconfirmed:
            raise not_confirmed(self.broker, unconfirmed)

    def _shutdown(self) -> None:
        try:
            self._flush(block=False)  # the UNWAITs, if the pipe takes them
        finally:
            self._close_socket(self.sock)

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

        Raises :class:`~respworkers.errors.InvalidArgument` (a ValueError), before sending
        anything, for an id, queue, option or size the broker would refuse (its limits are
        learnt on first contact).
        """
        return self._call(self.calls.submit(payload, {
            "id": id, "queue": queue, "timeout": timeout, "tries": tries, "priority": priority,
            "delay": delay, "eta": eta, "expires": expires, "tenant": tenant, "backoff": backoff,
            "backoff_max": backoff_max}))

    def submit_many(self, jobs: Iterable[Payload | Mapping[str, Any]]) -> list[str]:
        """Send many jobs in few messages (SUBMITS); return their ids in order.

        Each job is a payload, or a mapping of :meth:`submit`'s arguments (``payload``,
        ``id``, ``queue`` and the options). Every job is checked before any is
        sent. Results of these jobs may arrive batched, which costs the broker (and
        this client) far less per job than one message each.
        """
        return self._call(self.calls.submit_many(jobs))

    def validate(
        self, payload: Payload, *, id: str, queue: str = protocol.DEFAULT_QUEUE, **options: Any,
    ) -> list[bytes]:
        """Check a job against the protocol and the broker's limits; return its SUBMIT frames."""
        return self._call(self.calls.validate(payload, id, queue, options))

    def attach(self, job_id: str) -> None:
        """Follow a job submitted elsewhere (another process, an earlier run)."""
        self._call(self.calls.attach_one(job_id))

    def wait_confirmed(self, job_ids: Iterable[str], timeout: float | None = None) -> None:
        """Return once the broker has confirmed (journaled) these jobs, or they ended."""
        self._call(self.calls.wait_confirmed(job_ids, timeout))

    # ----------------------------------------------------------------- waiting
    def result(self, job_id: str, timeout: float | None = None) -> bytes:
        """Wait for one job and return its result; raise :class:`JobFailed` otherwise."""
        return self._call(self.calls.result(job_id, timeout))

    def outcome(self, job_id: str, timeout: float | None = None) -> JobResult:
        """Wait for one job and return how it ended (without raising on failure)."""
        return self._call(self.calls.outcome(job_id, timeout))

    def results(self, job_ids: Iterable[str] | None = None, timeout: float | None = None
                ) -> Iterator[JobResult]:
        """Yield outcomes as they arrive (any order) until every named job has ended
        (None: every job this client waits for)."""
        return self._iterate(self.calls.results(job_ids, timeout))

    def run(self, payload: Payload, **options: Any) -> bytes:
        """Submit one job (options as :meth:`submit`'s) and wait for its result."""
        return self._call(self.calls.run(payload, options))

    def map(self, payloads: Iterable[Payload], **options: Any) -> list[bytes]:
        """Submit many jobs, wait for all, return their results in input order."""
        return self._call(self.calls.map(payloads, options))

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Yield the job's progress reports as its worker sends them, until it ends (then
        collect the outcome with :meth:`outcome`). Also see :attr:`on_progress`."""
        return self._iterate(self.calls.watch(job_id, timeout))

    def follow_progress(self, job_id: str) -> None:
        """Ask for the job's progress reports without iterating :meth:`watch`: each goes to
        :attr:`on_progress` as it arrives, while this client waits for anything."""
        self._call(self.calls.follow_progress(job_id))

    # ----------------------------------------------------------------- operators' requests
    def jobs(self, state: str | None = None, queue: str | None = None, limit: int = 100
             ) -> list[dict[str, Any]]:
        """Jobs the broker holds, newest first: id, queue, state, attempt, tries, priority,
        tenant, age and the error's first line (pages are fetched as needed)."""
        return self._call(self.calls.jobs(state, queue, limit))

    def requeue(self, job_ids: Iterable[str]) -> dict[str, Any]:
        """Run failed, cancelled or expired jobs again under the same ids (fresh tries).
        Returns {"requeued": [...], "unknown": [...], "skipped": {id: why}}."""
        return self._call(self.calls.requeue(job_ids))

    def purge(self, queue: str) -> int:
        """Cancel every job waiting in ``queue`` (queued or scheduled); how many were."""
        return self._call(self.calls.purge(queue))

    def pause(self, queue: str) -> protocol.Paused:
        """Dispatch nothing from ``queue`` until :meth:`resume`; it keeps taking jobs. The
        reply says how many jobs wait in it and whether this call paused it (``changed``)."""
        return self._call(self.calls.pause(queue))

    def resume(self, queue: str) -> protocol.Resumed:
        """Dispatch from ``queue`` again; idle workers get its jobs at once (``dispatched``)."""
        return self._call(self.calls.resume(queue))

    def drain(self, workers: Iterable[str] = (), *, hosts: Iterable[str] = (),
              everyone: bool = False) -> dict[str, Any]:
        """Ask workers (names as ``rw status`` shows them, every worker of ``hosts``, or
        ``everyone``) to finish the job in hand and leave, as on SIGTERM. Returns
        {"asked": [{"name", "job"}], "unknown": [names and hosts that matched none]}."""
        return self._call(self.calls.drain(workers, hosts, everyone))

    # ----------------------------------------------------------------- inspect and cancel
    def query(self, job_id: str) -> dict[str, Any] | None:
        """The job's state as the broker knows it, or None if it does not know the id."""
        return self._call(self.calls.ask(protocol.QUERY, job_id))

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a job; returns its state afterwards, or None if the id is unknown."""
        return self._call(self.calls.ask(protocol.CANCEL, job_id))

    def status(self) -> dict[str, Any]:
        """One snapshot of the broker's status endpoint (a fresh socket each time)."""
        if self._closed:
            raise self._closed_error()
        return fetch_status(self.status_endpoint, self.request_timeout, self.ctx, self.keys)

    # ----------------------------------------------------------------- running calls
    def _call(self, call: Call[T], flush: bool = True) -> T:
        """Run one call to its end (the entry point of every method)."""
        return self._drive(call, flush)

    def _drive(self, call: Call[T], flush: bool = True) -> T:
        try:
            if self._closed:
                raise self._closed_error()
            while True:
                try:
                    step = call.send(None)
                except StopIteration as stop:
                    if flush:
                        self._flush()
                    value: T = stop.value
                    return value
                self._wait(step)
        finally:
            call.close()

    def _iterate(self, stream: Stream[T]) -> Iterator[T]:
        try:
            for item in stream:
                if isinstance(item, Wait):
                    self._wait(item)
                else:
                    yield item
        finally:
            stream.close()

    # ----------------------------------------------------------------- I/O
    def _wait(self, step: Wait) -> None:
        """Send what is queued, read replies until one comes or it is time to look at the
        connection (or the step's deadline), then look at it."""
        if self._closed:
            raise self._closed_error()
        self._flush()
        limit = self.session.poll_interval()
        if step.deadline is not None:
            limit = min(limit, step.deadline - time.monotonic())
        self._pump(limit)
        self._keep_alive()

    def _keep_alive(self) -> None:
        """Handshakes, pings, and giving up before first contact: not after every reply."""
        self.session.tick(time.monotonic(), self._handshakes)
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

    def _poll(self, ms: int, want_out: bool) -> bool:
        """Wait up to ``ms`` for a reply (``want_out``: or for room to send); True if one came."""
        if want_out:
            return bool(self.sock.poll(ms, zmq.POLLIN | zmq.POLLOUT) & zmq.POLLIN)
        return bool(self._poller.poll(ms))

    def _pump(self, timeout: float, want_out: bool = False) -> None:
        if not self._poll(max(0, int(timeout * 1000)), want_out):
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


class ThreadSafeClient(Client):
    """A :class:`Client` that any number of threads may call at once, over one connection.

    Calls run concurrently: a thread waiting for a result does not hold up another that
    submits. One lock guards the session; the socket is used by one thread at a time (the
    one whose turn it is to wait for the broker; the others wait for its news), and no
    lock is held while it polls. Results, ``results()`` and ``watch()`` iterators and
    ``close()`` work from any thread; a job's outcome reaches every call waiting for it.
    Closing it makes the calls still waiting raise :class:`~respworkers.errors.ClientClosed`.
    The callbacks (:attr:`on_event`, :attr:`on_progress`) run in whichever thread is reading
    at the time, with the lock held: they must return quickly and must not call the client
    (that raises RuntimeError).
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        self._lock = threading.Lock()
        self._news = threading.Condition(self._lock)
        self._io: int | None = None  # the thread using the socket, if any
        self._wake = WakePipe()  # tells that thread there is something to send, or to stop
        try:
            with self._lock:
                super().__init__(*args, **kw)
        except BaseException:
            self._wake.close()
            raise
        self._poller.register(self._wake.read_fd, zmq.POLLIN)
        self._poller_out = zmq.Poller()
        self._poller_out.register(self.sock, zmq.POLLIN | zmq.POLLOUT)
        self._poller_out.register(self._wake.read_fd, zmq.POLLIN)

    def __enter__(self) -> ThreadSafeClient:
        return self

    def _entering(self) -> None:
        if self._io == threading.get_ident():
            raise RuntimeError("a ThreadSafeClient's callbacks (on_event, on_progress) run with "
                               "its lock held and must not call it")

    def _call(self, call: Call[T], flush: bool = True) -> T:
        try:
            self._entering()
        except RuntimeError:
            call.close()
            raise
        with self._lock:
            return self._drive(call, flush)

    def _iterate(self, stream: Stream[T]) -> Iterator[T]:
        # The lock is held while the stream runs, not while the caller has an item.
        try:
            while True:
                self._entering()
                with self._lock:
                    while True:
                        try:
                            item = next(stream)
                        except StopIteration:
                            return
                        if not isinstance(item, Wait):
                            break
                        self._wait(item)
                yield item
        finally:
            with self._lock:
                stream.close()

    def close(self, timeout: float | None = None, check: bool = True) -> None:
        self._entering()
        with self._lock:
            super().close(timeout, check)

    def _shutdown(self) -> None:
        me = threading.get_ident()
        while self._io is not None and self._io != me:  # a thread in a poll: let it finish
            self._wake.wake()
            self._news.wait(0.05)
        self._io = me
        try:
            super()._shutdown()
        finally:
            self._io = None
            self._news.notify_all()  # waiting calls see the client closed
            self._wake.close()

    def _wait(self, step: Wait) -> None:  # the lock is held
        if self._closed:
            raise self._closed_error()
        if self._io is not None:  # another thread reads: it notifies after each of its steps
            if self.session.outbox:
                self._wake.wake()  # it sends what this call queued
            limit = PING_INTERVAL
            if step.deadline is not None:
                limit = max(0.0, min(limit, step.deadline - time.monotonic()))
            self._news.wait(limit)
            if self._closed:
                raise self._closed_error()
            return
        self._io = threading.get_ident()
        try:
            super()._wait(step)
        finally:
            self._io = None
            self._news.notify_all()

    def _flush(self, block: bool = True) -> None:  # the lock is held
        if not self.session.outbox or (self._closed and self._io is None):
            return
        me = threading.get_ident()
        if self._io is not None:
            if self._io == me:
                super()._flush(block)
            elif self.session.outbox:
                self._wake.wake()  # the reading thread sends it at once
            return
        self._io = me
        try:
            super()._flush(block)
        finally:
            self._io = None
            self._news.notify_all()

    def _poll(self, ms: int, want_out: bool) -> bool:
        """Poll without the lock (other threads' calls go on meanwhile); woken early when one
        of them queued something to send."""
        poller = self._poller_out if want_out else self._poller
        self._lock.release()
        try:
            ready = dict(poller.poll(ms))
        finally:
            self._lock.acquire()
        if self._wake.read_fd in ready:
            self._wake.drain()
        return bool(ready.get(self.sock, 0) & zmq.POLLIN)


def fetch_status(endpoint: str, timeout: float = 5.0, ctx: zmq.Context[Any] | None = None,
                 keys: ClientKeys | None = None) -> dict[str, Any]:
    """Ask a broker's status endpoint for one snapshot (a fresh REQ each time, never stuck)."""
    sock, monitor = status_request(endpoint, ctx or zmq.Context.instance(), keys, zmq.Socket)
    try:
        ready = bool(sock.poll(int(timeout * 1000), zmq.POLLIN))
        return status_answer(sock, monitor, endpoint, timeout, keys, ready)
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)


def status_request(endpoint: str, ctx: zmq.Context[Any], keys: ClientKeys | None,
                   kind: SocketKind) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
    """A REQ (made by ``kind``, as in :func:`open_dealer`) that has sent the status request,
    and its handshake monitor."""
    sock = kind(ctx, zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    secure_client(sock, keys)
    monitor = watch_handshakes(sock)
    try:
        sock.connect(endpoint)
        # REQ adds the delimiter; the backend's calls, whether the socket is asyncio's or not
        sockets.send(sock, protocol.encode_status_request()[1:])
    except BaseException:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        raise
    return sock, monitor


def status_answer(sock: zmq.Socket[Any], monitor: zmq.Socket[Any], endpoint: str, timeout: float,
                  keys: ClientKeys | None, ready: bool) -> dict[str, Any]:
    """The snapshot, once the poll said whether it came (``ready``) within ``timeout``."""
    if not ready:
        why = handshake_failure(monitor, endpoint, keys)
        raise BrokerUnavailable(why or (
            f"no answer from the broker's status endpoint {endpoint} within {timeout:g}s"
            " (is `rw broker` running, and is this its status endpoint?)"
        ))
    return protocol.decode_snapshot(sockets.recv(sock, sockets.NOBLOCK))
