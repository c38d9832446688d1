"""Render a broker status snapshot as rich renderables (pure functions of the snapshot)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


_STATE_STYLE = {"busy": "yellow", "idle": "green", "stopping": "magenta", "waiting": "dim",
                "draining": "cyan"}


def render(snap: dict[str, Any]) -> Group:
    b = snap.get("broker", {})
    t = snap.get("totals", {})
    r = snap.get("rates", {})
    head = Text()
    head.append(f"broker {b.get('id', '?')}", style="bold")
    head.append(f"  pid {b.get('pid')} on {b.get('host')}  up {_dur(b.get('uptime'))}")
    if b.get("state") == "starting":
        head.append(f"  STARTING: loading its journal ({b.get('restored', 0):,} jobs so far)",
                    style="bold yellow")
    elif not b.get("accepting", True) or b.get("state") == "stopping":
        head.append("  STOPPING", style="bold red")
    head.append("\n")
    head.append(
        f"now: queued {snap.get('queued', 0)}  "
        + (f"scheduled {snap['scheduled']}  " if snap.get("scheduled") else "")
        + f"in flight {snap.get('in_flight', 0)}  workers {len(snap.get('workers', []))}  "
        f"ended and kept {snap.get('retained', 0)}\n"
    )
    # The counters count what this broker process did since it started; jobs restored from
    # the journal (and finished after a restart) were submitted before it.
    head.append(
        f"since start: submitted {t.get('submitted', 0)}  done {t.get('done', 0)}  "
        f"retried {t.get('retried', 0)}  failed {t.get('failed', 0)}  "
        f"cancelled {t.get('cancelled', 0)}"
        + (f"  expired {t['expired']}" if t.get("expired") else "")
        + (f"  drained {t['drained']}" if t.get("drained") else "") + "\n"
    )
    head.append(
        f"rates/s: submitted {r.get('submitted', 0):.1f}  done {r.get('done', 0):.1f}  "
        f"failed {r.get('failed', 0):.1f}"
    )
    paused = snap.get("paused") or []
    draining = sum(1 for w in snap.get("workers", []) if w.get("state") == "draining")
    if paused:
        head.append("\npaused queues (nothing dispatched, jobs kept): " + ", ".join(paused[:10])
                    + (f", +{len(paused) - 10} more" if len(paused) > 10 else ""), style="bold yellow")
    if draining:
        head.append(f"\ndraining: {draining} worker{'' if draining == 1 else 's'} leaving after "
                    "their job in hand", style="cyan")
    sec = snap.get("security") or {}
    if sec.get("curve"):
        refused = sec.get("refused") or {}
        head.append("\nCURVE on; allowed keys " + ", ".join(
            f"{d} {n}" for d, n in sorted((sec.get("allowed_keys") or {}).items())))
        if refused:
            head.append("; refused " + ", ".join(f"{d} {n}" for d, n in sorted(refused.items())),
                        style="red")
        revoked = sec.get("revoked") or {}
        if revoked:
            head.append("; revoked connections cut off " + ", ".join(
                f"{d} {n}" for d, n in sorted(revoked.items())), style="yellow")
    journal = b.get("journal") or {}
    if journal.get("problem"):
        head.append(f"\nJOURNAL UNAVAILABLE for {_dur(journal.get('problem_for'))}: "
                    f"{journal['problem']}; refusing new jobs", style="bold red")
    elif journal.get("kind") == "sqlite":
        head.append(f"\njournal {journal.get('path')}", style="dim")
    slow = snap.get("clients") or {}
    if slow.get("slow_clients") or slow.get("resync_pending"):
        head.append(f"\nslow clients {slow.get('slow_clients', 0)}: {slow.get('backlog', 0)} "
                    f"messages wait for them; told to resync {slow.get('overflows', 0)}",
                    style="yellow")
    bad = snap.get("bad_messages") or {}
    if bad:
        head.append(f"\nbad messages {sum(bad.values())}: ", style="red")
        head.append(", ".join(f"{k} x{v}" for k, v in sorted(bad.items())[:6]), style="red")

    queues = Table(title="queues", expand=False, title_justify="left")
    rows = sorted(snap.get("queues", {}).items())
    # Columns most brokers never need show only when some queue uses them.
    timed = any(q.get("scheduled") or q.get("oldest_wait") for _, q in rows)
    shared = any(q.get("tenants") for _, q in rows)
    columns = ["queue", "queued"] + (["oldest waits", "scheduled"] if timed else []) + [
        "running", "workers", "idle"] + (["tenants"] if shared else [])
    for col in columns:
        queues.add_column(col, justify="left" if col in ("queue", "tenants") else "right")
    for name, q in rows:
        # Jobs wait and nobody serves the queue: "none", in red, where the count would be.
        warn = (q.get("queued") or q.get("scheduled")) and not q.get("workers")
        label = Text(name, style="red" if warn else "")
        if q.get("paused"):
            label.append(" paused", style="bold yellow")
        cells: list[Any] = [label, str(q.get("queued", 0))]
        if timed:
            cells += [_dur(q.get("oldest_wait")), str(q.get("scheduled", 0))]
        cells += [str(q.get("running", 0)),
                  Text("none", style="bold red") if warn else str(q.get("workers", 0)),
                  str(q.get("idle", 0))]
        if shared:
            tenants = q.get("tenants") or {}
            cells.append(", ".join(f"{t} {n}" for t, n in list(tenants.items())[:5])
                         + (f", +{len(tenants) - 5} more" if len(tenants) > 5 else ""))
        queues.add_row(*cells)

    workers = Table(title="workers", expand=False, title_justify="left")
    rows_w = sorted(snap.get("workers", []), key=lambda w: str(w.get("name")))
    reporting = any(w.get("progress") for w in rows_w)
    for col in ("worker", "queues", "state", "job", "try", "busy for",
                *(["progress"] if reporting else []), "done", "failed", "seen"):
        workers.add_column(col, justify="right" if col in ("try", "done", "failed") else "left")
    for w in rows_w:
        state = w.get("state", "?")
        workers.add_row(
            str(w.get("name")), ",".join(w.get("queues", [])),
            Text(state, style=_STATE_STYLE.get(state, "")), str(w.get("job") or ""),
            str(w.get("attempt") or ""), _dur(w.get("busy_for")),
            *([progress_text(w.get("progress"))] if reporting else []),
            str(w.get("done", 0)), str(w.get("failed", 0)), _dur(w.get("last_seen")) + " ago",
        )
    parts: list[Any] = [Panel(head, title="respworkers", expand=False), queues, workers]
    failures = snap.get("recent_failures") or []
    if failures:
        ft = Table(title="recent failures", expand=False, title_justify="left")
        for col in ("job", "queue", "reason", "tries", "last error"):
            ft.add_column(col)
        for f in list(failures)[-10:]:
            err = (f.get("error") or "").strip().splitlines()  # the first line is the summary
            ft.add_row(str(f.get("id")), str(f.get("queue")), str(f.get("reason")),
                       str(f.get("attempts")), err[0][:80] if err else "")
        parts.append(ft)
    return Group(*parts)


def progress_text(report: dict[str, Any] | None, width: int = 40) -> str:
    """``45% copying part 3`` from a progress report (fraction and message, both optional)."""
    if not report:
        return ""
    fraction = report.get("fraction")
    parts = []
    if isinstance(fraction, (int, float)) and not isinstance(fraction, bool):
        parts.append(f"{fraction:.0%}")
    message = report.get("message")
    if message:
        parts.append(str(message))
    text = " ".join(parts) or "reported"
    return text if len(text) <= width else text[:width - 1] + "…"


_JOBS_COLUMNS = ("id", "queue", "state", "tries", "age", "error")


def _job_cells(job: dict[str, Any]) -> list[str]:
    return [str(job.get("id")), str(job.get("queue")), str(job.get("state")),
            f"{job.get('attempt', 0)}/{job.get('tries', '?')}", _dur(job.get("age")),
            str(job.get("error") or "")[:200]]


def render_jobs(jobs: list[dict[str, Any]]) -> Table:
    """``rw jobs`` on a terminal: one row per job, newest first; long errors are cut."""
    table = Table(expand=False, box=None, pad_edge=False)
    for col in _JOBS_COLUMNS:
        table.add_column(col, justify="right" if col in ("tries", "age") else "left",
                         no_wrap=True, overflow="ellipsis", min_width=len(col))
    for job in jobs:
        cells = _job_cells(job)
        table.add_row(*cells[:2], Text(cells[2], style=_JOB_STATE_STYLE.get(cells[2], "")),
                      *cells[3:])
    return table


def jobs_lines(jobs: list[dict[str, Any]]) -> list[str]:
    """``rw jobs`` into a pipe: the same columns, whole, two spaces apart."""
    rows = [list(_JOBS_COLUMNS)] + [_job_cells(job) for job in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_JOBS_COLUMNS) - 1)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]
            for row in rows]


_JOB_STATE_STYLE = {"done": "green", "failed": "red", "expired": "red", "cancelled": "magenta",
                    "running": "yellow", "scheduled": "cyan"}


def render_unreachable(message: str) -> Panel:
    return Panel(Text(message, style="bold red"), title="respworkers", expand=False)


def duration(seconds: float) -> str:
    """``0.05 s``, ``10.4 s``, ``1 min 3 s``, ``2 h 5 min``, ``3 d 4 h``: readable at a glance."""
    if seconds < 59.5:
        return f"{seconds:.3g} s"
    whole = round(seconds)
    units = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))
    i = next(i for i, (_, length) in enumerate(units) if whole >= length)  # at most "min"
    (big, big_length), (small, small_length) = units[i], units[i + 1]
    count, rest = divmod(whole, big_length)
    return f"{count} {big}" + (f" {rest // small_length} {small}" if rest >= small_length else "")


def size(n: float) -> str:
    """Bytes as ``12 bytes``, ``1.5 KiB``, ``3.2 MiB``, ``1.1 GiB``."""
    if n < 1024:
        return f"{n} byte" + ("" if n == 1 else "s")
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024 or unit == "GiB":
            break
    return f"{value:.1f} {unit}"


def local_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


_JOB_FIELDS = {  # how `rw inspect` shows a field of the broker's job info (docs/protocol.md)
    "timeout": duration, "age": duration, "backoff": duration, "backoff_max": duration,
    "created": local_time, "started": local_time, "finished": local_time,
    "runs_at": local_time, "expires_at": local_time,
    "result_size": size, "payload_size": size,
}
#: Shown only when set: most jobs use none of them.
_OPTIONAL = ("tenant", "expires_at", "backoff", "backoff_max", "progress", "history")
#: Not rows of their own: in the headline, or below the table.
_NOT_ROWS = ("id", "error", "tries", "runs_in", "runs_at", "progress", "history")


def _field(key: str, value: Any) -> str:
    if value is None or value == "":
        return "-"
    if key in _JOB_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _JOB_FIELDS[key](value)
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def headline(info: dict[str, Any]) -> str:
    """What the job is doing, in words: ``retry 2 of 3 in 4.1 s``, ``running attempt 1 of 3
    on host:123 (45% copying)``, ``scheduled: runs in 12 s``, ``failed (timeout)``."""
    state = info.get("state")
    attempt, tries = info.get("attempt") or 0, info.get("tries")
    if state == "scheduled":
        when = info.get("runs_in")
        wait = f"in {duration(when)}" if isinstance(when, (int, float)) else "soon"
        if attempt:
            return f"retry {attempt + 1} of {tries} {wait}"
        return f"scheduled: runs {wait}"
    if state == "running":
        text = f"running attempt {attempt} of {tries} on {info.get('worker') or '?'}"
        progress = progress_text(info.get("progress"), 60)
        return text + (f" ({progress})" if progress else "")
    if state == "queued":
        again = f", attempt {attempt + 1} of {tries} next" if attempt else ""
        return f"queued for {duration(info.get('age') or 0)}{again}"
    reason = info.get("reason")
    return f"{state}" + (f" ({reason})" if reason and reason != state else "")


def render_job(info: dict[str, Any]) -> Group:
    """One job's INFO as a table under a headline; its last error (often a traceback) as-is
    below it, and what happened before a requeue."""
    table = Table(show_header=False, title=f"job {info.get('id')}: {headline(info)}",
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in info.items():
        if key in _NOT_ROWS or (key in _OPTIONAL and value in (None, [], {})):
            continue
        if key == "attempt":
            text = f"{value} of {_field('tries', info.get('tries'))}"
        else:
            text = _field(key, value)
        table.add_row(key.replace("_", " "), Text(text))
    if info.get("runs_at"):
        table.add_row("runs at", Text(local_time(info["runs_at"])))
    progress = info.get("progress")
    if progress:
        at = progress.get("at")
        meta = progress.get("meta")
        table.add_row("progress", Text(progress_text(progress, 200) + (
            f"  (attempt {progress.get('attempt')}, {local_time(at)})" if at else "")
            + (f"  {meta}" if meta else "")))
    parts: list[Any] = [table]
    error = info.get("error")
    if error:
        parts += [Text("last error:", style="bold red"), Text(str(error).rstrip("\n"))]
    for n, earlier in enumerate(info.get("history") or [], 1):
        line = (f"run {n}: {earlier.get('state')} after {earlier.get('attempts')} attempt(s)"
                + (f" at {local_time(earlier['finished'])}" if earlier.get("finished") else ""))
        if earlier.get("error"):
            line += f": {earlier['error']}"
        parts.append(Text(line, style="dim"))
    return Group(*parts)
