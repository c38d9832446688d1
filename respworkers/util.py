"""Small tools several processes need: a rate limit for log lines and a wake-up pipe."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Any


class RateLimit:
    """True at most once per ``interval`` seconds: for log lines and replies that a peer
    could otherwise provoke as fast as it can send."""

    __slots__ = ("interval", "_last")

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._last = -math.inf

    def allow(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now - self._last < self.interval:
            return False
        self._last = now
        return True


class RateLimitedLog:
    """A logger's warnings, at most one line per interval (the rest are counted elsewhere)."""

    __slots__ = ("log", "limit")

    def __init__(self, log: logging.Logger, interval: float = 1.0) -> None:
        self.log = log
        self.limit = RateLimit(interval)

    def warning(self, msg: str, *args: Any, now: float | None = None) -> None:
        if self.limit.allow(now):
            self.log.warning(msg, *args)


class WakePipe:
    """A non-blocking pipe that wakes a poll: written by signal handlers (Python's C-level
    handler writes the signal number at once, even while the main thread sits in a long C
    call) or by another thread."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        #: Something may be in the pipe: set by :meth:`wake` and by Python-level signal
        #: handlers (the C-level one writes the pipe before they run), so that a reader
        #: that checks often can skip the system call when nothing happened.
        self.pending = False

    def fileno(self) -> int:
        return self.read_fd

    def wake(self, byte: bytes = b"x") -> None:
        try:
            os.write(self.write_fd, byte)
        except OSError:  # full (a wake-up is already pending) or closed
            pass
        self.pending = True  # after the write: a drain in between must not hide the byte

    def drain(self) -> bytes:
        self.pending = False
        try:
            return os.read(self.read_fd, 4096)
        except OSError:
            return b""

    def catch_signals(self) -> None:
        """Make signal delivery write the signal's number here (needs Python handlers too)."""
        signal.set_wakeup_fd(self.write_fd)

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            try:
                os.close(fd)
            except OSError:
                pass
