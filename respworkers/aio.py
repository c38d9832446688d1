"""The asyncio client: :class:`Client`, the blocking client's methods as coroutines.

It runs the same calls as :class:`respworkers.Client` (:class:`respworkers.session.Calls`
over one :class:`~respworkers.session.Session`), so it checks, resyncs across broker
restarts, delivers each outcome once and confirms on close exactly as that one does. Only
the waiting differs: one task reads the socket (pyzmq's ``zmq.asyncio`` poll) while any
call waits, and wakes just the calls that its news concerns (a job id, a request),
so thousands of concurrent awaits on one client cost little each.

Not thread-safe: use a client from the thread of the event loop it was first used in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Hashable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Callable, TypeVar, cast

import zmq
import zmq.asyncio

from . import protocol, sockets
from .client import ClientBase, JobResult, Payload, open_dealer, status_answer, status_request
from .config import DEFAULT_CLIENTS, DEFAULT_STATUS
from .errors import RespWorkersError
from .session import Call, Stream, Wait, check_wait, not_confirmed

if TYPE_CHECKING:
    from .security import ClientKeys

__all__ = ["Client", "JobResult"]

T = TypeVar("T")

#: Messages read in one go before other tasks get a turn.
READ_BATCH = 1000


class Client(ClientBase):
    """Submit jobs to a broker and await their outcomes; as :class:`respworkers.Client`,
    whose docstrings say what each method does.

    Any number of tasks may await calls on one client at once (several may wait for the
    same job: each gets its outcome). ``ctx`` may be a ``zmq.Context`` or a
    ``zmq.asyncio.Context``. A client belongs to one event loop and is not thread-safe.
    Closing it (``close()`` or leaving ``async with``) waits until the broker has
    confirmed what was submitted, as the blocking client does; calls still waiting then
    raise :class:`~respworkers.errors.ClientClosed`.
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
        base = ctx or zmq.Context.instance()
        if isinstance(base, zmq.asyncio.Context):  # the handshake monitor is read without awaiting
            base = zmq.Context.shadow(base.underlying)
        self.ctx: zmq.Context[Any] = base
        # An asyncio socket, to await its poll; frames move through respworkers.sockets,
        # which calls the backend's send and recv directly, as the blocking client does.
        self.sock, self._monitor = open_dealer(base, broker, keys, zmq.asyncio.Socket)
        self._poll: Callable[[int, int], Awaitable[int]] = cast(Any, self.sock).poll
        # Calls waiting, by what wakes them (see Wait.on; None: any message), each in the
        # order they began to wait (a dict as an ordered set): woken in that order.
        self._waiters: dict[Hashable | None, dict[asyncio.Future[None], None]] = {}
        self._reader: asyncio.Task[None] | None = None
        self.session.on_touch = self._touch
        self._send()  # the first PING now: request_timeout counts from here, as for Client

    # ----------------------------------------------------------------- context manager
    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        # Leaving on an error: do not wait, and do not hide the error with another.
        await self.close(timeout=0.0 if exc_type is not None else None, check=exc_type is None)

    async def close(self, timeout: float | None = None, check: bool = True) -> None:
        """As :meth:`respworkers.Client.close`: wait (``timeout``, default
        ``request_timeout``) until the broker has confirmed every job submitted, raise
        :class:`~respworkers.errors.BrokerUnavailable` naming those it did not (with
        ``check``), tell it this client no longer waits for the rest, close. Calls still
        waiting in other tasks then raise :class:`~respworkers.errors.ClientClosed`."""
        if self._closed:
            return
        check_wait(timeout)
        unconfirmed: list[str] = []
        try:
            unconfirmed = await self._call(self.calls.close(timeout), send=False)
        finally:
            self._closed = True
            self._shutdown()
        if check and unconfirmed:
            raise not_confirmed(self.broker, unconfirmed)

    def _shutdown(self) -> None:
        try:
            self._send(drop=True)  # the UNWAITs, if the pipe takes them
        finally:
            self._fail_all(self._closed_error())
            if self._reader is not None:
                self._reader.cancel()
                self._reader = None
            self._close_socket(self.sock)

    # ----------------------------------------------------------------- submitting
    async def submit(
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
        """Send one job and return its id (see :meth:`respworkers.Client.submit`)."""
        return await self._call(self.calls.submit(payload, {
            "id": id, "queue": queue, "timeout": timeout, "tries": tries, "priority": priority,
            "delay": delay, "eta": eta, "expires": expires, "tenant": tenant, "backoff": backoff,
            "backoff_max": backoff_max}))

    async def submit_many(self, jobs: Iterable[Payload | Mapping[str, Any]]) -> list[str]:
        """Send many jobs in few messages; their ids in order. Every job is checked first."""
        return await self._call(self.calls.submit_many(jobs))

    async def validate(
        self, payload: Payload, *, id: str, queue: str = protocol.DEFAULT_QUEUE, **options: Any,
    ) -> list[bytes]:
        """Check a job against the protocol and the broker's limits; its SUBMIT frames."""
        return await self._call(self.calls.validate(payload, id, queue, options))

    async def attach(self, job_id: str) -> None:
        """Follow a job submitted elsewhere (another process, an earlier run)."""
        await self._call(self.calls.attach_one(job_id))

    async def wait_confirmed(self, job_ids: Iterable[str], timeout: float | None = None) -> None:
        """Return once the broker has confirmed (journaled) these jobs, or they ended."""
        await self._call(self.calls.wait_confirmed(job_ids, timeout))

    # ----------------------------------------------------------------- waiting
    async def result(self, job_id: str, timeout: float | None = None) -> bytes:
        """The job's result; raises :class:`~respworkers.errors.JobFailed` otherwise."""
        return await self._call(self.calls.result(job_id, timeout))

    async def outcome(self, job_id: str, timeout: float | None = None) -> JobResult:
        """How the job ended (without raising on failure)."""
        return await self._call(self.calls.outcome(job_id, timeout))

    def results(self, job_ids: Iterable[str] | None = None, timeout: float | None = None
                ) -> AsyncIterator[JobResult]:
        """``async for`` the outcomes as they arrive (any order) until every named job has
        ended (None: every job this client waits for). Arguments are checked at once."""
        return self._iterate(self.calls.results(job_ids, timeout))

    async def run(self, payload: Payload, **options: Any) -> bytes:
        """Submit one job (options as :meth:`submit`'s) and await its result."""
        return await self._call(self.calls.run(payload, options))

    async def map(self, payloads: Iterable[Payload], **options: Any) -> list[bytes]:
        """Submit many jobs, await all, return their results in input order."""
        return await self._call(self.calls.map(payloads, options))

    def watch(self, job_id: str, timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """``async for`` the job's progress reports until it ends; then :meth:`outcome`."""
        return self._iterate(self.calls.watch(job_id, timeout))

    async def follow_progress(self, job_id: str) -> None:
        """Send the job's progress reports to :attr:`on_progress` while this client waits."""
        await self._call(self.calls.follow_progress(job_id))

    # ----------------------------------------------------------------- operators' requests
    async def jobs(self, state: str | None = None, queue: str | None = None, limit: int = 100
                   ) -> list[dict[str, Any]]:
        """Jobs the broker holds, newest first (see :meth:`respworkers.Client.jobs`)."""
        return await self._call(self.calls.jobs(state, queue, limit))

    async def requeue(self, job_ids: Iterable[str]) -> dict[str, Any]:
        """Run failed, cancelled or expired jobs again under the same ids."""
        return await self._call(self.calls.requeue(job_ids))

    async def purge(self, queue: str) -> int:
        """Cancel every job waiting in ``queue``; how many were."""
        return await self._call(self.calls.purge(queue))

    async def pause(self, queue: str) -> protocol.Paused:
        """Dispatch nothing from ``queue`` until :meth:`resume`."""
        return await self._call(self.calls.pause(queue))

    async def resume(self, queue: str) -> protocol.Resumed:
        """Dispatch from ``queue`` again."""
        return await self._call(self.calls.resume(queue))

    async def drain(self, workers: Iterable[str] = (), *, hosts: Iterable[str] = (),
                    everyone: bool = False) -> dict[str, Any]:
        """Ask workers to finish the job in hand and leave (see Client.drain)."""
        return await self._call(self.calls.drain(workers, hosts, everyone))

    async def query(self, job_id: str) -> dict[str, Any] | None:
        """The job's state as the broker knows it, or None if it does not know the id."""
        return await self._call(self.calls.ask(protocol.QUERY, job_id))

    async def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a job; its state afterwards, or None if the id is unknown."""
        return await self._call(self.calls.ask(protocol.CANCEL, job_id))

    async def status(self) -> dict[str, Any]:
        """One snapshot of the broker's status endpoint (a fresh socket each time)."""
        if self._closed:
            raise self._closed_error()
        sock, monitor = status_request(self.status_endpoint, self.ctx, self.keys,
                                       zmq.asyncio.Socket)
        try:
            ready = bool(await cast(Any, sock).poll(int(self.request_timeout * 1000), zmq.POLLIN))
            return status_answer(sock, monitor, self.status_endpoint, self.request_timeout,
                                 self.keys, ready)
        finally:
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)

    # ----------------------------------------------------------------- running calls
    async def _call(self, call: Call[T], send: bool = True) -> T:
        try:
            if self._closed:
                raise self._closed_error()
            while True:
                try:
                    step = call.send(None)
                except StopIteration as stop:
                    if send and not self._send():
                        self._start_reader()  # it sends the rest when the pipe has room
                    value: T = stop.value
                    return value
                await self._wait(step)
        finally:
            call.close()

    async def _iterate(self, stream: Stream[T]) -> AsyncIterator[T]:
        try:
            while True:
                try:
                    item = next(stream)
                except StopIteration:
                    return
                if isinstance(item, Wait):
                    await self._wait(item)
                else:
                    yield item
        finally:
            stream.close()

    async def _wait(self, step: Wait) -> None:
        """Until the reader has news about ``step.on``, or the step's deadline."""
        if self._closed:
            raise self._closed_error()
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()
        key = step.on
        self._waiters.setdefault(key, {})[woken] = None
        timer = None
        if step.deadline is not None:
            timer = loop.call_later(max(0.0, step.deadline - time.monotonic()), _wake, woken)
        self._send()
        self._start_reader()
        try:
            await woken
        finally:
            if timer is not None:
                timer.cancel()
            waiting = self._waiters.get(key)
            if waiting is not None:
                waiting.pop(woken, None)
                if not waiting:
                    del self._waiters[key]

    def _start_reader(self) -> None:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())

    def _touch(self, key: Hashable | None) -> None:
        """The session has news about ``key``: wake the calls waiting for it."""
        waiting = self._waiters.pop(key, None)
        if waiting:
            for woken in waiting:
                _wake(woken)

    def _fail_all(self, exc: BaseException) -> None:
        """Every call waiting now raises ``exc`` (as the blocking client raises it from the
        call that happens to be reading)."""
        for waiting in list(self._waiters.values()):
            for woken in waiting:
                if not woken.done():
                    woken.set_exception(exc)

    # ----------------------------------------------------------------- I/O
    async def _read(self) -> None:
        """While calls wait (or messages wait to be sent): send, read replies, and look at
        the connection (pings, resync, giving up before first contact) as the blocking
        client does between its polls."""
        session = self.session
        try:
            while not self._closed and (self._waiters or session.outbox):
                blocked = not self._send()
                flags = zmq.POLLIN | (zmq.POLLOUT if blocked else 0)
                ms = int(session.poll_interval() * 1000)
                try:
                    if await self._poll(ms, flags) & zmq.POLLIN:
                        self._receive()
                    session.tick(time.monotonic(), self._handshakes)
                except RespWorkersError as exc:  # no broker before first contact, INVALID
                    self._fail_all(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # no call may wait forever on a reader that died
            self._fail_all(exc)
        finally:
            if self._reader is asyncio.current_task():
                self._reader = None

    def _receive(self) -> None:
        received = self.session.received
        try:
            for _ in range(READ_BATCH):
                try:
                    frames = sockets.recv(self.sock, sockets.NOBLOCK)
                except zmq.Again:
                    break
                received(frames, time.monotonic())
        finally:
            self._touch(None)

    def _send(self, drop: bool = False) -> bool:
        """Send what the session has queued, without waiting; False if the pipe is full
        (the reader sends the rest when there is room; ``drop``: forget the rest)."""
        outbox = self.session.outbox
        while outbox:
            try:
                sockets.send(self.sock, outbox[0], sockets.NOBLOCK)
            except zmq.Again:
                if drop:
                    outbox.clear()
                return False
            outbox.popleft()
        return True


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)
