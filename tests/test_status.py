"""Rendering for humans (pure: rich renderables printed to a string, no sockets)."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console

from respworkers.status import duration, render_job, size

pytestmark = pytest.mark.timeout(10)


def text_of(renderable: object) -> str:
    console = Console(file=io.StringIO(), width=120, color_system=None)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


@pytest.mark.parametrize("seconds, shown", [
    (0.05, "0.05 s"), (5.0, "5 s"), (10.377, "10.4 s"), (60.0, "1 min"), (63.2, "1 min 3 s"),
    (3661, "1 h 1 min"), (7500, "2 h 5 min"), (3 * 86400 + 4 * 3600, "3 d 4 h"),
])
def test_durations_have_units(seconds: float, shown: str) -> None:
    assert duration(seconds) == shown


@pytest.mark.parametrize("n, shown", [
    (0, "0 bytes"), (1, "1 byte"), (1023, "1023 bytes"), (1536, "1.5 KiB"), (3 << 20, "3.0 MiB"),
])
def test_sizes_have_units(n: int, shown: str) -> None:
    assert size(n) == shown


def test_job_info_reads_as_text_not_python() -> None:
    created = time.mktime((2026, 11, 28, 14, 5, 9, 0, 0, -1))
    error = 'Traceback (most recent call last):\n  File "jobs.py", line 3, in process\nValueError: boom\n'
    shown = text_of(render_job({
        "id": "order-42", "queue": "default", "state": "failed", "attempt": 2, "tries": 3,
        "timeout": 60.0, "worker": None, "workers_tried": ["host:1:0", "host:1:1"],
        "created": created, "started": created + 1, "finished": None, "age": 10.377,
        "reason": "error", "error": error, "result_size": None, "payload_size": 1536,
        "waiting_clients": 0,
    }))
    assert "job order-42" in shown
    assert "attempt" in shown and "2 of 3" in shown
    assert "1 min" in shown and "10.4 s" in shown and "60.0" not in shown and "10.377" not in shown
    assert "host:1:0, host:1:1" in shown and "[" not in shown
    assert time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) in shown
    assert "1.5 KiB" in shown and "None" not in shown
    assert shown.rstrip().endswith(error.rstrip())  # the whole traceback, as-is, at the end
