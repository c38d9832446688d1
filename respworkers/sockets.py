"""Fast multipart send/receive: pyzmq's backend socket calls with plain int flags.

pyzmq's friendly ``send_multipart``/``recv_multipart`` combine ``enum.Flag`` values for
every frame, which costs more than moving a small frame through libzmq. Every hot
path (the broker loop, the worker, the client) sends and receives through here.

Receiving reads each frame as a ``zmq.Frame`` and asks it whether more follow: asking
the socket (``getsockopt(RCVMORE)``) makes pyzmq build an enum per call, which costs twice
what receiving the frame does.
"""

from __future__ import annotations

from typing import Any, Callable

import zmq

_send = zmq.backend.Socket.send
raw_send = _send  #: one frame, int flags: (socket, frame, flags)
_recv = zmq.backend.Socket.recv
_poll = zmq.backend.zmq_poll
SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
POLLIN = int(zmq.POLLIN)


def readable(sock: zmq.Socket[Any]) -> bool:
    """Whether a message waits on ``sock``, without waiting (libzmq's poll with timeout 0:
    cheaper than pyzmq's Poller, and than getsockopt(EVENTS), which builds an enum)."""
    return bool(_poll([(sock, POLLIN)], 0))


def ready(items: list[tuple[Any, int]]) -> list[tuple[Any, int]]:
    """Which of ``items`` ((socket, POLLIN) pairs) have input now, in one call."""
    return _poll(items, 0)


def send(sock: zmq.Socket[Any], frames: list[bytes], flags: int = 0) -> None:
    """Send ``frames`` as one message; with NOBLOCK, raises zmq.Again before sending any."""
    last = len(frames) - 1
    more = SNDMORE | flags
    for i, frame in enumerate(frames):
        _send(sock, frame, more if i < last else flags)


def recv(sock: zmq.Socket[Any], flags: int = 0) -> list[bytes]:
    """Receive one whole message (raises zmq.Again with NOBLOCK when there is none)."""
    frame = _recv(sock, flags, False)
    parts = [frame.bytes]
    while frame.more:
        frame = _recv(sock, flags, False)
        parts.append(frame.bytes)
    return parts


def router_sender(sock: zmq.Socket[Any]) -> Callable[[bytes, list[bytes]], None]:
    """``send(routing_id, frames)`` for a ROUTER socket; ``frames`` is not modified."""

    def send_to(rid: bytes, frames: list[bytes]) -> None:
        _send(sock, rid, SNDMORE)
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            _send(sock, frame, SNDMORE if i < last else 0)

    return send_to


def router_recv(sock: zmq.Socket[Any]) -> tuple[bytes, list[bytes]]:
    """(routing id, frames) of one message waiting on a ROUTER; raises zmq.Again if none."""
    frame = _recv(sock, NOBLOCK, False)
    rid = frame.bytes
    frames = []
    while frame.more:
        frame = _recv(sock, NOBLOCK, False)
        frames.append(frame.bytes)
    return rid, frames
