"""Log output for every ``rw`` command: human-readable text, or one JSON object per line.

JSON lines are for log shippers and ``jq``: each has ``time`` (ISO 8601 UTC, ms),
``level``, ``logger``, ``message`` and ``pid``, then whatever structured fields the log
call passed with ``extra={...}`` (``job``, ``attempt``, ``worker``, ``queue``, ``reason``,
...), and ``exc`` with the traceback text when there is one. Fields come from the call,
not from parsing the message, so a line can be selected by job id without regular
expressions.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s [%(process)d] %(name)s %(levelname)s %(message)s"

#: Attributes every LogRecord has: anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}


def iso_time(wall: float) -> str:
    """A Unix time as ISO 8601 UTC to the millisecond: 2026-01-31T09:15:02.125Z."""
    seconds = int(wall)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
            + f".{int((wall - seconds) * 1000):03d}Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():  # extra={...}; None: does not apply
            if key not in _STANDARD and key not in out and value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        return json.dumps(out, default=str, ensure_ascii=False)


def check_format(value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in FORMATS:
        raise ValueError('must be "text" (for people) or "json" (one object per line)')
    return value.lower()


def setup(level: str | int, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send this process's log records to stderr (or ``stream``) in ``fmt``, replacing any
    earlier setup (a spawned worker process sets itself up again; a forked one inherits this)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()) if isinstance(level, str) else level)
