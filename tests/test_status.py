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


def test_the_status_view_names_faults_and_what_its_counters_count() -> None:
    from respworkers.status import render

    snap = {
        "broker": {"id": "b1", "pid": 1, "host": "h", "uptime": 5.0, "accepting": True,
                   "state": "running",
                   "journal": {"kind": "sqlite", "path": "/j", "problem": "/j: disk full (0 bytes "
                               "free in /)", "problem_for": 12.0}},
        "queued": 3, "in_flight": 1, "retained": 40, "workers": [], "queues": {},
        "totals": {"submitted": 28, "done": 1051}, "rates": {},
        "clients": {"slow_clients": 1, "backlog": 77, "overflows": 2, "resync_pending": 0},
        "security": {"curve": True, "allowed_keys": {"clients": 1}, "refused": {},
                     "revoked": {"workers": 2}},
        "recent_failures": [{"id": "j", "queue": "q", "reason": "error", "attempts": 3,
                             "error": "ValueError: boom\nTraceback (most recent call last):"}],
    }
    shown = text_of(render(snap))
    assert "since start: submitted 28  done 1051" in shown  # 1051 > 28 reads right after a restart
    assert "ended and kept 40" in shown
    assert "JOURNAL UNAVAILABLE for 12.0s: /j: disk full" in shown and "refusing new jobs" in shown
    assert "slow clients 1: 77 messages wait" in shown
    assert "revoked connections cut off workers 2" in shown
    assert "ValueError: boom" in shown and "Traceback" not in shown  # an error's first line
    snap["broker"] = {"id": "b1", "state": "starting", "restored": 120000, "journal": {}}
    assert "STARTING: loading its journal (120,000 jobs so far)" in text_of(render(snap))
