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


_STATE_STYLE = {"busy": "yellow", "idle": "green", "stopping": "magenta", "waiting": "dim"}


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
        f"now: queued {snap.get('queued', 0)}  in flight {snap.get('in_flight', 0)}  "
        f"workers {len(snap.get('workers', []))}  ended and kept {snap.get('retained', 0)}\n"
    )
    # The counters count what this broker process did since it started; jobs restored from
    # the journal (and finished after a restart) were submitted before it.
    head.append(
        f"since start: submitted {t.get('submitted', 0)}  done {t.get('done', 0)}  "
        f"retried {t.get('retried', 0)}  failed {t.get('failed', 0)}  "
        f"cancelled {t.get('cancelled', 0)}\n"
    )
    head.append(
        f"rates/s: submitted {r.get('submitted', 0):.1f}  done {r.get('done', 0):.1f}  "
        f"failed {r.get('failed', 0):.1f}"
    )
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
    for col in ("queue", "queued", "running", "workers", "idle"):
        queues.add_column(col, justify="left" if col == "queue" else "right")
    for name, q in sorted(snap.get("queues", {}).items()):
        warn = q.get("queued") and not q.get("workers")
        queues.add_row(
            Text(name + ("  (no worker serves it)" if warn else ""), style="red" if warn else ""),
            str(q.get("queued", 0)), str(q.get("running", 0)), str(q.get("workers", 0)),
            str(q.get("idle", 0)),
        )

    workers = Table(title="workers", expand=False, title_justify="left")
    for col in ("worker", "queues", "state", "job", "try", "busy for", "done", "failed", "seen"):
        workers.add_column(col, justify="right" if col in ("try", "done", "failed") else "left")
    for w in sorted(snap.get("workers", []), key=lambda w: str(w.get("name"))):
        state = w.get("state", "?")
        workers.add_row(
            str(w.get("name")), ",".join(w.get("queues", [])),
            Text(state, style=_STATE_STYLE.get(state, "")), str(w.get("job") or ""),
            str(w.get("attempt") or ""), _dur(w.get("busy_for")), str(w.get("done", 0)),
            str(w.get("failed", 0)), _dur(w.get("last_seen")) + " ago",
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
    "timeout": duration, "age": duration,
    "created": local_time, "started": local_time, "finished": local_time,
    "result_size": size, "payload_size": size,
}


def _field(key: str, value: Any) -> str:
    if value is None or value == "":
        return "-"
    if key in _JOB_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _JOB_FIELDS[key](value)
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def render_job(info: dict[str, Any]) -> Group:
    """One job's INFO as a table, its last error (often a traceback) as-is below it."""
    table = Table(show_header=False, title=f"job {info.get('id')}", title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in info.items():
        if key in ("id", "error", "tries"):
            continue
        if key == "attempt":
            text = f"{value} of {_field('tries', info.get('tries'))}"
        else:
            text = _field(key, value)
        table.add_row(key.replace("_", " "), Text(text))
    parts: list[Any] = [table]
    error = info.get("error")
    if error:
        parts += [Text("last error:", style="bold red"), Text(str(error).rstrip("\n"))]
    return Group(*parts)
