"""Render a broker status snapshot as rich renderables (pure functions of the snapshot)."""

from __future__ import annotations

import time
from typing import Any, NamedTuple, Union

from rich.cells import cell_len
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

#: Without a height limit (``--once``), worker rows show when there are at most this many.
FEW_WORKERS = 20
#: Failures the view lists, newest first.
FAILURES_SHOWN = 5
#: Free text (an error) is cut down to this many cells before any column is left out.
FLEX_WIDTH = 30
_Cell = Union[str, tuple[str, str]]  # text, or (text, style)


class _Col(NamedTuple):
    name: str
    right: bool = False
    drop: int = 0  #: 0: always shown; the highest is dropped first when the table is too wide
    flex: bool = False  #: cut with "…" to fit (an error message), never a name


def _text(cell: _Cell) -> str:
    return cell if isinstance(cell, str) else cell[0]


def _table(cols: list[_Col], rows: list[list[_Cell]], width: int | None,
           more: str = "") -> list[Text]:
    """A table as lines no wider than ``width``: optional columns go before anything is cut,
    and only a ``flex`` column (free text) is cut; names stay whole when any layout fits."""
    keep = list(range(len(cols)))
    widths = [max([cell_len(c.name)] + [cell_len(_text(r[i])) for r in rows])
              for i, c in enumerate(cols)]

    def total() -> int:
        return sum(widths[i] for i in keep) + 2 * (len(keep) - 1)

    def shrink(least: int) -> None:
        for i in keep:
            if width is not None and cols[i].flex and total() > width:
                widths[i] = max(cell_len(cols[i].name), least, widths[i] - (total() - width))

    shrink(FLEX_WIDTH)  # free text gives way first, down to a readable width
    while width is not None and total() > width and any(cols[i].drop for i in keep):
        keep.remove(max(keep, key=lambda i: cols[i].drop))
    shrink(0)
    lines: list[Text] = []
    header: list[_Cell] = [c.name for c in cols]
    for row, style in [(header, "bold"), *[(r, "") for r in rows]]:
        line = Text(style=style)
        for n, i in enumerate(keep):
            cell = row[i]
            text = _text(cell)
            if cell_len(text) > widths[i]:
                text = text[:max(0, widths[i] - 1)] + "…"
            pad = " " * (widths[i] - cell_len(text))
            if n:
                line.append("  ")
            line.append(pad if cols[i].right else "")
            line.append(text, style=cell[1] if isinstance(cell, tuple) else "")
            line.append("" if cols[i].right or n == len(keep) - 1 else pad)
        lines.append(line)
    if more:
        lines.append(Text(more, style="dim"))
    if width is not None:
        for line in lines:
            line.truncate(width, overflow="ellipsis")
    return lines


def _common_suffix(hosts: list[str]) -> str:
    """The domain every host name ends with (``.example.internal``): said once, not per row."""
    names = [h for h in hosts if h]
    if len(names) < 2:
        return ""
    parts = [h.split(".") for h in names]
    suffix: list[str] = []
    while all(len(p) > len(suffix) + 1 for p in parts) and len({p[-len(suffix) - 1] for p in parts}) == 1:
        suffix.insert(0, parts[0][-len(suffix) - 1])
    return "." + ".".join(suffix) if suffix else ""


def host_summary(workers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per host: how many workers, in which state, jobs done and failed, the longest busy."""
    hosts: dict[str, dict[str, Any]] = {}
    for w in workers:
        h = hosts.setdefault(str(w.get("host") or "?"), {
            "workers": 0, "busy": 0, "idle": 0, "draining": 0, "other": 0, "done": 0,
            "failed": 0, "oldest_busy": None})
        h["workers"] += 1
        state = w.get("state")
        h[state if state in ("busy", "idle", "draining") else "other"] += 1
        h["done"] += w.get("done") or 0
        h["failed"] += w.get("failed") or 0
        busy = w.get("busy_for")
        if busy is not None and (h["oldest_busy"] is None or busy > h["oldest_busy"]):
            h["oldest_busy"] = busy
    return dict(sorted(hosts.items()))


def _summary(snap: dict[str, Any]) -> list[Text]:
    """The headline as pieces; each fits on a line, and several share one when they fit."""
    b = snap.get("broker", {})
    t = snap.get("totals", {})
    r = snap.get("rates", {})
    first = Text()
    first.append(f"broker {b.get('id', '?')}", style="bold")
    first.append(f"  pid {b.get('pid')} on {b.get('host')}  up {_dur(b.get('uptime'))}")
    if b.get("state") == "starting":
        first.append(f"  STARTING: loading its journal ({b.get('restored', 0):,} jobs so far)",
                     style="bold yellow")
    elif not b.get("accepting", True) or b.get("state") == "stopping":
        first.append("  STOPPING", style="bold red")
    workers = snap.get("workers", [])
    busy = sum(1 for w in workers if w.get("state") == "busy")
    now = Text(
        f"now: queued {snap.get('queued', 0)}  "
        + (f"scheduled {snap['scheduled']}  " if snap.get("scheduled") else "")
        + f"in flight {snap.get('in_flight', 0)}  workers {len(workers)}"
        + (f" ({busy} busy)" if busy else "") + f"  ended and kept {snap.get('retained', 0)}")
    # The counters count what this broker process did since it started; jobs restored from
    # the journal (and finished after a restart) were submitted before it.
    since = Text(
        f"since start: submitted {t.get('submitted', 0)}  done {t.get('done', 0)}  "
        f"retried {t.get('retried', 0)}  failed {t.get('failed', 0)}  "
        f"cancelled {t.get('cancelled', 0)}"
        + (f"  expired {t['expired']}" if t.get("expired") else "")
        + (f"  drained {t['drained']}" if t.get("drained") else ""))
    rates = Text(f"rates/s: submitted {r.get('submitted', 0):.1f}  done {r.get('done', 0):.1f}  "
                 f"failed {r.get('failed', 0):.1f}")
    journal = b.get("journal") or {}
    where = ([Text(f"journal {journal.get('path')}", style="dim")]
             if journal.get("kind") == "sqlite" and not journal.get("problem") else [])
    return [first, now, since, rates, *where]


def _alerts(snap: dict[str, Any]) -> list[Text]:
    """Lines that show only when something needs an operator's eye."""
    b = snap.get("broker", {})
    out: list[Text] = []
    paused = snap.get("paused") or []
    draining = sum(1 for w in snap.get("workers", []) if w.get("state") == "draining")
    if paused:
        out.append(Text("paused queues (nothing dispatched, jobs kept): " + ", ".join(paused[:10])
                        + (f", +{len(paused) - 10} more" if len(paused) > 10 else ""),
                        style="bold yellow"))
    if draining:
        out.append(Text(f"draining: {draining} worker{'' if draining == 1 else 's'} leaving after "
                        "their job in hand", style="cyan"))
    sec = snap.get("security") or {}
    if sec.get("curve"):
        line = Text("CURVE on; allowed keys " + ", ".join(
            f"{d} {n}" for d, n in sorted((sec.get("allowed_keys") or {}).items())))
        refused = sec.get("refused") or {}
        if refused:
            line.append("; refused " + ", ".join(f"{d} {n}" for d, n in sorted(refused.items())),
                        style="red")
        revoked = sec.get("revoked") or {}
        if revoked:
            line.append("; revoked connections cut off " + ", ".join(
                f"{d} {n}" for d, n in sorted(revoked.items())), style="yellow")
        out.append(line)
    journal = b.get("journal") or {}
    if journal.get("problem"):
        out.append(Text(f"JOURNAL UNAVAILABLE for {_dur(journal.get('problem_for'))}: "
                        f"{journal['problem']}; refusing new jobs", style="bold red"))
    slow = snap.get("clients") or {}
    if slow.get("slow_clients") or slow.get("resync_pending"):
        out.append(Text(f"slow clients {slow.get('slow_clients', 0)}: {slow.get('backlog', 0)} "
                        f"messages wait for them; told to resync {slow.get('overflows', 0)}",
                        style="yellow"))
    bad = snap.get("bad_messages") or {}
    if bad:
        out.append(Text(f"bad messages {sum(bad.values())}: "
                        + ", ".join(f"{k} x{v}" for k, v in sorted(bad.items())[:6]), style="red"))
    return out


def _flow(pieces: list[Text], width: int | None) -> list[Text]:
    """Pieces joined on as few lines as fit ``width``; a piece too long for a line wraps."""
    if width is None:
        return pieces
    lines: list[Text] = []
    for piece in pieces:
        if lines and cell_len(lines[-1].plain) + 5 + cell_len(piece.plain) <= width:
            lines[-1].append("  │  ", style="dim")
            lines[-1].append_text(piece)
            continue
        line = piece.copy()
        while cell_len(line.plain) > width:
            cut = line.plain.rfind(" ", 0, width + 1)
            cut = cut if cut > 0 else width
            head, line = line.divide([cut])
            head.rstrip()
            lines.append(head)
            line = line[len(line.plain) - len(line.plain.lstrip()):]
        if line.plain.strip():
            lines.append(line)
    return lines


def _queue_rows(snap: dict[str, Any]) -> tuple[list[_Col], list[list[_Cell]]]:
    rows = sorted(snap.get("queues", {}).items())
    # Columns most brokers never need show only when some queue uses them.
    timed = any(q.get("scheduled") or q.get("oldest_wait") for _, q in rows)
    shared = any(q.get("tenants") for _, q in rows)
    cols = [_Col("queue"), _Col("queued", True)]
    cols += [_Col("oldest waits", True, 1), _Col("scheduled", True, 1)] if timed else []
    cols += [_Col("running", True), _Col("workers", True), _Col("idle", True)]
    cols += [_Col("tenants", flex=True)] if shared else []
    out: list[list[_Cell]] = []
    for name, q in rows:
        # Jobs wait and nobody serves the queue: "none", in red, where the count would be.
        warn = (q.get("queued") or q.get("scheduled")) and not q.get("workers")
        label: _Cell = (name + (" paused" if q.get("paused") else ""),
                        "red" if warn else ("yellow" if q.get("paused") else ""))
        cells: list[_Cell] = [label, str(q.get("queued", 0))]
        if timed:
            cells += [_dur(q.get("oldest_wait")), str(q.get("scheduled", 0))]
        cells += [str(q.get("running", 0)),
                  ("none", "bold red") if warn else str(q.get("workers", 0)),
                  str(q.get("idle", 0))]
        if shared:
            tenants = q.get("tenants") or {}
            cells.append(", ".join(f"{t} {n}" for t, n in list(tenants.items())[:5])
                         + (f", +{len(tenants) - 5} more" if len(tenants) > 5 else ""))
        out.append(cells)
    return cols, out


def _host_rows(hosts: dict[str, dict[str, Any]], suffix: str
               ) -> tuple[list[_Col], list[list[_Cell]]]:
    draining = any(h["draining"] for h in hosts.values())
    other = any(h["other"] for h in hosts.values())
    cols = [_Col("host"), _Col("workers", True), _Col("busy", True), _Col("idle", True)]
    cols += [_Col("draining", True)] if draining else []
    cols += [_Col("other", True, 1)] if other else []
    cols += [_Col("done", True), _Col("failed", True), _Col("longest busy", True, 2)]
    out: list[list[_Cell]] = []
    for name, h in hosts.items():
        cells: list[_Cell] = [
            name[:-len(suffix)] if suffix and name.endswith(suffix) else name,
            str(h["workers"]), (str(h["busy"]), "yellow" if h["busy"] else "dim"),
            (str(h["idle"]), "green" if h["idle"] else "dim")]
        cells += [(str(h["draining"]), "cyan" if h["draining"] else "dim")] if draining else []
        cells += [str(h["other"])] if other else []
        cells += [str(h["done"]), (str(h["failed"]), "red" if h["failed"] else ""),
                  _dur(h["oldest_busy"])]
        out.append(cells)
    return cols, out


def _worker_rows(workers: list[dict[str, Any]]) -> tuple[list[_Col], list[list[_Cell]]]:
    reporting = any(w.get("progress") for w in workers)
    cols = [_Col("worker"), _Col("queues", drop=5), _Col("state"), _Col("job", drop=2),
            _Col("try", True, 4), _Col("busy for", True)]
    cols += [_Col("progress", flex=True, drop=1)] if reporting else []
    # prefetching workers (README: Prefetch): jobs held behind the running one, of how many
    prefetching = any((w.get("prefetch") or 1) > 1 for w in workers)
    cols += [_Col("held", True, 3)] if prefetching else []
    cols += [_Col("done", True, 3), _Col("failed", True, 3), _Col("seen", drop=6)]
    out: list[list[_Cell]] = []
    for w in workers:
        state = str(w.get("state", "?"))
        held = f"{w.get('held') or 0}/{(w.get('prefetch') or 1) - 1}"
        # whole, as rw drain takes it, even when the hosts' common domain is left out above
        out.append([str(w.get("name")), ",".join(w.get("queues", [])), (state, _STATE_STYLE.get(state, "")),
                    str(w.get("job") or ""), str(w.get("attempt") or ""), _dur(w.get("busy_for")),
                    *([progress_text(w.get("progress"))] if reporting else []),
                    *([held] if prefetching else []),
                    str(w.get("done", 0)), str(w.get("failed", 0)),
                    _dur(w.get("last_seen")) + " ago"])
    return cols, out


def _failure_rows(snap: dict[str, Any]) -> tuple[list[_Col], list[list[_Cell]]]:
    cols = [_Col("ago", True, 2), _Col("job"), _Col("queue", drop=1), _Col("reason"),
            _Col("tries", True, 3), _Col("last error", flex=True)]
    now = snap.get("time")
    out: list[list[_Cell]] = []
    for f in reversed(list(snap.get("recent_failures") or [])):  # newest first
        err = (f.get("error") or "").strip().splitlines()  # the first line is the summary
        at = f.get("at")
        ago = _dur(max(0.0, now - at)) if isinstance(now, (int, float)) and isinstance(
            at, (int, float)) else ""
        out.append([ago, str(f.get("id")), str(f.get("queue")), (str(f.get("reason")), "red"),
                    str(f.get("attempts")), err[0] if err else ""])
    return cols, out


def render(snap: dict[str, Any], width: int | None = None, height: int | None = None,
           workers: bool = False, hosts: tuple[str, ...] = ()) -> Group:
    """The status view in ``width`` x ``height`` cells (None: no limit).

    Every host gets a row; worker rows show when they fit, or when asked for (``workers``,
    or ``hosts`` to show only those hosts' workers), and then as many as fit. Nothing is
    cut to fit before a column that can go has gone.
    """
    head = _flow(_summary(snap), width) + _flow(_alerts(snap), width)
    rows_w = sorted(snap.get("workers", []),
                    key=lambda w: (str(w.get("host") or ""), str(w.get("name"))))
    if hosts:
        rows_w = [w for w in rows_w if str(w.get("host")) in hosts or any(
            str(w.get("host") or "").startswith(h + ".") for h in hosts)]
    per_host = host_summary(rows_w)
    suffix = _common_suffix(sorted({str(w.get("host") or "") for w in snap.get("workers", [])}))
    q_cols, q_rows = _queue_rows(snap)
    h_cols, h_rows = _host_rows(per_host, suffix)
    if suffix:
        h_cols[0] = _Col(f"host (*{suffix})")
    w_cols, w_rows = _worker_rows(rows_w)
    f_cols, f_rows = _failure_rows(snap)
    f_rows = f_rows[:FAILURES_SHOWN if height is not None else 2 * FAILURES_SHOWN]

    room = None if height is None else height - len(head)
    # Sizes in lines (a header, then rows); what does not fit ends in a "+N more" line.
    sizes = {"queues": 1 + len(q_rows) if q_rows else 0,
             "hosts": 1 + len(h_rows) if (len(per_host) > 1 and not workers) or hosts else 0,
             "failures": 1 + len(f_rows) if f_rows else 0}
    expand = workers or bool(hosts) or (room is None and len(rows_w) <= FEW_WORKERS)
    if room is not None and not expand and rows_w:
        # every worker's row fits with everything else: show them
        expand = sum(sizes.values()) + 1 + len(w_rows) <= room
    if rows_w and not sizes["hosts"] and not expand:
        sizes["hosts"] = 2  # one host, its workers not shown: its summary row
    shown = dict(sizes)
    left = None
    if room is not None:
        shown = {k: min(v, 2) for k, v in sizes.items()}
        left = room - sum(shown.values())
        # who gets room first, up to how many lines: a few queues, every host, a few failures
        # (asked for, worker rows come before more than a few failures)
        steps = [("queues", 6), ("hosts", sizes["hosts"]), ("failures", 4)]
        if not expand:
            steps += [("queues", sizes["queues"]), ("failures", sizes["failures"])]
        for k, cap in steps:
            extra = max(0, min(cap, sizes[k]) - shown[k])
            extra = min(extra, left)
            shown[k] += extra
            left -= extra
        if expand:  # the worker rows, then room left over goes to the failures
            worker_room = min(left, 1 + len(w_rows))
            left -= worker_room
            for k in ("queues", "failures"):
                extra = min(left, sizes[k] - shown[k])
                shown[k] += extra
                left -= extra
            left += worker_room

    def part(key: str, cols: list[_Col], rows: list[list[_Cell]], what: str) -> list[Text]:
        if not shown[key]:
            return []
        fit = shown[key] - 1
        if fit < len(rows):
            fit = max(0, fit - 1)
            return _table(cols, rows[:fit], width, f"+{len(rows) - fit} more {what}")
        return _table(cols, rows, width)

    lines = head + part("queues", q_cols, q_rows, "queues") + part("hosts", h_cols, h_rows, "hosts")
    if expand and rows_w:
        fit = len(w_rows) if left is None else left - 1
        if fit < len(w_rows):
            fit = max(0, fit - 1)
            lines += _table(w_cols, w_rows[:fit], width,
                            f"+{len(w_rows) - fit} more workers"
                            + (": --host H shows one host's" if not hosts else ""))
        else:
            lines += _table(w_cols, w_rows, width)
    elif hosts and not rows_w:
        lines.append(Text(f"no workers on {', '.join(hosts)}", style="yellow"))
    elif rows_w and (left is None or left > 0):
        example = next(iter(per_host)).removesuffix(suffix)
        lines.append(Text(f"one row per worker: --workers, or --host {example} for one host's",
                          style="dim"))
        if left is not None:
            left -= 1
    lines += part("failures", f_cols, f_rows, "failures")
    if height is not None:
        lines = lines[:height]
    return Group(*lines)


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
