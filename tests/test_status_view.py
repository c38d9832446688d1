"""``rw status`` at scale: 300 workers on 10 hosts, the view fitted to small and large
terminals (and a resize), per-host rows, ``--host``, newest failures first."""

from __future__ import annotations

import fcntl
import io
import json
import struct
import subprocess
import sys
import termios
import time
from typing import Any

import pytest
from rich.console import Console

from respworkers.status import render

from conftest import Cluster, Proc, TtyProc, wait_for

pytestmark = pytest.mark.timeout(120)

WORKERS, HOSTS = 300, 10
HOST_NAMES = [f"vm-{i:02d}.rack-{i // 4}" for i in range(HOSTS)]  # + .example.internal


def fake_workers(cluster: Cluster) -> Proc:
    """The fake_workers process (raw DEALERs) registered with the cluster's broker."""
    log = cluster.root / "fake-workers.log"
    with open(log, "wb") as fh:
        popen = subprocess.Popen([sys.executable, "-m", "fake_workers", cluster.workers,
                                  str(WORKERS), str(HOSTS)], cwd=cluster.root, env=cluster.env,
                                 stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proc = Proc(popen, log)
    cluster.procs.append(proc)  # killed by pid with the rest
    wait_for(lambda: "ready" in proc.output(), 60, what=f"{WORKERS} workers to register")
    return proc


def screen_lines(snap: dict[str, Any], width: int, height: int | None, **kw: Any) -> list[str]:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(render(snap, width, height, **kw))
    return console.file.getvalue().splitlines()  # type: ignore[attr-defined]


def resize(term: TtyProc, columns: int, lines: int) -> None:
    """Resize the terminal as a user does: the kernel sends rw SIGWINCH."""
    with term._lock:
        term.screen.resize(lines, columns)
    fcntl.ioctl(term.master, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))


def assert_fits(term: TtyProc, columns: int, lines: int) -> None:
    rows = term.lines()
    text = term.text()
    assert rows[0].startswith("broker "), text  # nothing scrolled the view's top away
    assert all(len(row) <= columns for row in rows), text
    assert "..." not in text, text  # rich's mark of a view taller than the terminal
    for host in HOST_NAMES:  # every host, once
        assert sum(row.startswith(host + " ") for row in rows) == 1, text
    assert "…" not in "".join(row.split()[0] for row in rows if row.startswith("vm-")), text


def test_300_workers_snapshot_is_small_and_fast_and_the_view_fits(cluster: Cluster) -> None:
    cluster.broker()
    fake_workers(cluster)
    with cluster.client() as client:
        client.submit_many([{"payload": f"fail-{i}".encode(), "tries": 1} for i in range(8)]
                           + [b"hold"] * 40)
    wait_for(lambda: cluster.snapshot()["totals"]["failed"] == 8, 20, what="the failures")

    took = time.perf_counter()
    snap = cluster.snapshot()
    fetch = time.perf_counter() - took
    size = len(json.dumps(snap).encode())
    took = time.perf_counter()
    raw = cluster.run("status", "--status", cluster.status, "--json")
    end_to_end = time.perf_counter() - took
    print(f"\n{WORKERS} workers: snapshot {size} bytes, built in "
          f"{snap['broker']['snapshot_took'] * 1000:.2f} ms, fetched in {fetch * 1000:.1f} ms; "
          f"rw status --json {end_to_end * 1000:.0f} ms end to end")
    assert len(snap["workers"]) == WORKERS and size < 200_000
    assert snap["broker"]["snapshot_took"] < 0.05 and fetch < 1.0
    assert raw.returncode == 0 and len(json.loads(raw.stdout)["workers"]) == WORKERS

    for width, height in ((80, 24), (200, 50)):  # the same snapshot, rendered directly
        rows = screen_lines(snap, width, height - 1)
        assert len(rows) <= height - 1 and max(map(len, rows)) <= width, "\n".join(rows)
        assert all(sum(r.startswith(h + " ") for r in rows) == 1 for h in HOST_NAMES)

    term = cluster.rw_tty("status", "--status", cluster.status, columns=200, lines=50,
                          name="status")
    wait_for(lambda: HOST_NAMES[-1] in term.text(), 20, what="the hosts on the screen")
    assert_fits(term, 200, 50)
    assert "host (*.example.internal)" in term.text() and "failed 8" in term.text()
    resize(term, 80, 24)
    wait_for(lambda: len(term.lines()[0]) <= 80 and "rates/s" in term.text()
             and HOST_NAMES[-1] in term.text(), 10, what="the view redrawn for 80x24")
    time.sleep(1.5)  # a refresh at the new size too
    assert_fits(term, 80, 24)
    term.press(b"\x03")
    assert term.wait(10) == 0


def test_host_shows_that_hosts_workers_and_workers_expands(cluster: Cluster) -> None:
    cluster.broker()
    fake_workers(cluster)
    term = cluster.rw_tty("status", "--status", cluster.status, "--host", "vm-03",
                          columns=100, lines=40, name="status")
    wait_for(lambda: "vm-03.rack-0.example.internal:100" in term.text(), 20, what="vm-03's workers")
    rows = term.lines()
    names = [row.split()[0] for row in rows if row.startswith("vm-")]
    assert names[0] == "vm-03.rack-0"  # its summary row: 30 workers
    assert rows[[r.split()[0] if r else "" for r in rows].index("vm-03.rack-0")].split()[1] == "30"
    assert names[1:] and all(n.startswith("vm-03.rack-0.example.internal:") for n in names[1:]), term.text()
    assert all(len(row) <= 100 for row in rows) and "..." not in term.text()
    term.press(b"\x03")
    assert term.wait(10) == 0

    once = cluster.run("status", "--status", cluster.status, "--once", "--workers")
    assert once.returncode == 0
    assert sum(line.startswith("vm-") and ":" in line.split()[0]
               for line in once.stdout.splitlines()) == WORKERS  # no height: every worker
    grouped = cluster.run("status", "--status", cluster.status, "--once")
    assert not any(":" in line.split()[0] for line in grouped.stdout.splitlines()
                   if line.startswith("vm-"))  # many workers: a row per host only


def test_few_workers_get_a_row_each_and_failures_show_newest_first() -> None:
    snap: dict[str, Any] = {
        "broker": {"id": "b1", "pid": 1, "host": "h", "uptime": 5.0, "journal": {}},
        "time": 1000.0, "queues": {"default": {"queued": 0, "running": 1, "workers": 2, "idle": 1}},
        "workers": [{"name": f"h:{i}", "host": "h", "queues": ["default"],
                     "state": "busy" if i else "idle", "job": "j" if i else None, "done": 3,
                     "failed": 0, "last_seen": 0.1, "busy_for": 2.0 if i else None}
                    for i in range(2)],
        "recent_failures": [{"id": f"f{i}", "queue": "default", "reason": "error",
                             "attempts": 1, "error": f"E{i}: " + "long " * 40, "at": 900.0 + i}
                            for i in range(8)],  # oldest first, as the broker keeps them
    }
    rows = screen_lines(snap, 80, 23)
    assert [r.split()[1] for r in rows if r.split()[1:2] and r.split()[1].startswith("f")] == \
        ["f7", "f6", "f5", "f4", "f3"], "\n".join(rows)
    assert max(map(len, rows)) <= 80
    assert any(r.startswith("h:1 ") for r in rows) and any(r.startswith("h:0 ") for r in rows)
