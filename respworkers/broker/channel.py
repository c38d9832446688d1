"""What the broker holds for each client on its way out: a bounded amount, whatever the client does.

The clients socket sends with ``ROUTER_MANDATORY`` and a small send high-water mark, so
a client that does not read makes a send fail at once (``zmq.Again``) instead of
growing the broker's memory without bound. Such messages wait here, in order, as
references (a result's bytes are the ones the broker retains anyway) and go out as
the client reads again. A client that falls further behind than :data:`MAX_BACKLOG`
messages loses them and is sent RESYNC once it reads again: it then asks (WAIT) for
the outcomes it still waits for, which the broker retains.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable

import zmq

from .. import protocol, sockets

#: Messages libzmq may queue for one client before a send to it fails (the socket's SNDHWM).
SEND_HWM = 64
#: Messages, and bytes of their frames, kept in the broker's memory for one client once its
#: socket queue is full. Mostly results the broker retains anyway: what they cost is references.
MAX_BACKLOG = 10_000
MAX_BACKLOG_BYTES = 64 << 20

RawSend = Callable[[bytes, list[bytes]], bool]


def router_sender(sock: zmq.Socket[Any]) -> RawSend:
    """``send(routing id, frames) -> sent``: False if the peer's queue is full (nothing
    was sent); a peer that is not connected is dropped silently (True), as ROUTER does."""
    send = sockets.raw_send
    more = sockets.SNDMORE
    first = sockets.SNDMORE | sockets.NOBLOCK  # a full queue blocks unless asked not to
    again = zmq.Again
    error = zmq.ZMQError

    def send_to(rid: bytes, frames: list[bytes]) -> bool:
        try:
            send(sock, rid, first)  # with ROUTER_MANDATORY only this frame can fail
        except again:
            return False
        except error:  # EHOSTUNREACH: not connected (gone, or reconnecting)
            return True
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            send(sock, frame, more if i < last else 0)
        return True

    return send_to


class ClientChannel:
    """Sends to clients in order, never blocking and never holding more than a bounded amount."""

    def __init__(self, raw_send: RawSend) -> None:
        self._raw = raw_send
        self._backlog: dict[bytes, deque[list[bytes]]] = {}
        self._bytes: dict[bytes, int] = {}
        self._resync: set[bytes] = set()
        self.overflows = 0  #: times a client fell so far behind that it was told to resync
        self.deferred = 0  #: messages that waited here for a slow client

    def send(self, rid: bytes, frames: list[bytes]) -> None:
        backlog = self._backlog.get(rid)
        if backlog is None:
            if rid in self._resync or self._raw(rid, frames):
                return
            backlog = self._backlog[rid] = deque()
            self._bytes[rid] = 0
        size = self._bytes[rid] + sum(map(len, frames))
        if len(backlog) >= MAX_BACKLOG or size > MAX_BACKLOG_BYTES:
            # Too far behind: drop what waits and have it ask again once it reads.
            del self._backlog[rid], self._bytes[rid]
            self._resync.add(rid)
            self.overflows += 1
            return
        backlog.append(frames)
        self._bytes[rid] = size
        self.deferred += 1

    def pending(self) -> bool:
        return bool(self._backlog or self._resync)

    def flush(self) -> None:
        """Send what waits, for every client that can take it now (once per loop turn)."""
        raw = self._raw
        for rid in list(self._backlog):
            backlog = self._backlog[rid]
            while backlog and raw(rid, backlog[0]):
                self._bytes[rid] -= sum(map(len, backlog.popleft()))
            if not backlog:
                del self._backlog[rid], self._bytes[rid]
        for rid in list(self._resync):
            if raw(rid, protocol.RESYNC_FRAMES):
                self._resync.discard(rid)

    def describe(self) -> dict[str, int]:
        return {"slow_clients": len(self._backlog), "backlog": sum(map(len, self._backlog.values())),
                "deferred": self.deferred, "overflows": self.overflows,
                "resync_pending": len(self._resync)}
