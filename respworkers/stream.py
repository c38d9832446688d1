"""Follow jobs for ``rw submit`` and ``rw result``: print each outcome the moment it arrives.

Outcome lines go to stdout in arrival order (every line carries the job's id); the
progress bar of a batch goes to stderr. How a line is printed depends on where stdout goes:

- a pipe or a file: plain text, written and flushed line by line, so a script reading
  the output sees each job as it ends, at the cost of a write, not of rich's rendering;
- the terminal the bar is drawn on: lines are handed to the bar's console in batches,
  ten times a second, so they scroll above the bar instead of garbling it (one rich
  print per line, each redrawing the bar, costs about a millisecond);
- another terminal: rich's console, with colours.

A result is shown as text only when it is UTF-8 text; any other bytes show as their size
and first bytes in hex, never raw. With an output folder (``--out``) each result is
written to files named after its job id instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import IO

from rich.console import Console
from rich.text import Text

from .client import Client, JobResult
from .errors import RespWorkersError
from .jobfile import size_text

#: Seconds between two batches of lines printed above a progress bar.
FLUSH_INTERVAL = 0.1
#: After an interrupt, how long to wait for the broker to confirm jobs it may not hold yet.
CONFIRM_WAIT = 2.0


#: Bytes of a binary result shown in hex.
PREVIEW = 8
#: Characters that make a UTF-8 result binary for display: C0 and C1 control characters
#: (terminal escapes among them), except tab and line ends.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
#: Bytes a job id keeps in its file name; any other is percent-encoded.
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
#: The longest file name made from a job id, before ".<frame>": well under NAME_MAX (255).
MAX_NAME = 200
#: Frame files past this many are not all listed on a result's line.
SHOW_FILES = 3


def shown(data: bytes) -> str:
    """A result as its line shows it: the text when it is UTF-8 text, else
    ``<binary, N bytes: 8 bytes in hex…>``."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        pass
    else:
        if not _CONTROL.search(text):
            return text
    head = data[:PREVIEW].hex() + ("…" if len(data) > PREVIEW else "")
    return f"<binary, {len(data)} byte{'' if len(data) == 1 else 's'}: {head}>"


def file_name(job_id: str) -> str:
    """A job id as a file name: one plain name, a different one for every id.

    Each UTF-8 byte outside ``[A-Za-z0-9._-]`` is percent-encoded (``/`` becomes ``%2F``),
    as is a leading ``.`` (no ``.``, ``..`` or hidden names) and the ``.`` of a trailing
    ``.<digits>`` (those name the frames of a multi-frame result: ``<name>.0``, ``<name>.1``,
    so they never clash with another job's single file). A name longer than
    :data:`MAX_NAME` is cut and ends in ``~`` and 16 hex digits of the id's SHA-256.
    """
    raw = job_id.encode()
    name = "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)
    if name.startswith("."):
        name = "%2E" + name[1:]
    digits = re.search(r"\.([0-9]+)$", name)
    if digits:
        name = f"{name[:digits.start()]}%2E{digits.group(1)}"
    if len(name) > MAX_NAME:
        head = name[:MAX_NAME - 17]
        cut = head.rfind("%", len(head) - 2)  # not in the middle of an escape
        if cut >= 0:
            head = head[:cut]
        name = f"{head}~{hashlib.sha256(raw).hexdigest()[:16]}"
    return name


def save(folder: str, job_id: str, frames: list[bytes]) -> list[str]:
    """Write a result to ``folder``: ``<name>`` for one frame, ``<name>.0``, ``<name>.1``, ...
    for several (:func:`file_name`); return the paths. Each file appears whole or not at
    all (written aside, then renamed over any old one). OSError names the path."""
    name = file_name(job_id)
    frames = frames or [b""]
    names = [name] if len(frames) == 1 else [f"{name}.{i}" for i in range(len(frames))]
    paths = [os.path.join(folder, n) for n in names]
    for path, data in zip(paths, frames):
        _write(folder, path, data)
    return paths


def _write(folder: str, path: str, data: bytes) -> None:
    tmp = os.path.join(folder, f".rw-{secrets.token_hex(8)}.tmp")  # no job's name starts with "."
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, path) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        _unlink(tmp)
        raise OSError(exc.errno, exc.strerror, path) from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _files_text(paths: list[str], size: int) -> str:
    if len(paths) == 1:
        return f"-> {paths[0]} ({size_text(size)})"
    listed = ", ".join(paths) if len(paths) <= SHOW_FILES else f"{paths[0]} … {paths[-1]}"
    return f"-> {listed} ({len(paths)} files, {size_text(size)})"


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived while rw was following jobs."""


class Signals:
    """While active, SIGINT (Ctrl-C) and SIGTERM end the wait for jobs instead of rw itself.

    rw can then say what ended and which jobs are still running. Inside :meth:`waiting`
    (blocked on the broker) the signal raises :class:`Interrupted` at once; elsewhere it
    is noted and :meth:`check` raises it at the next safe point, so a line being printed is
    not cut. A second signal ends rw at once (the default action).
    """

    def __init__(self) -> None:
        self.received = 0
        self._waiting = False
        self._saved: dict[int, object] = {}

    def __enter__(self) -> Signals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._saved[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        for other in self._saved:
            signal.signal(other, signal.SIG_DFL)
        if self._waiting:
            raise Interrupted

    @contextmanager
    def waiting(self) -> Iterator[None]:
        self._waiting = True
        try:
            self.check()
            yield
        finally:
            self._waiting = False

    def check(self) -> None:
        if self.received:
            raise Interrupted


def _same_terminal(a: IO[str], b: IO[str]) -> bool:
    try:
        return a.isatty() and b.isatty() and os.path.sameopenfile(a.fileno(), b.fileno())
    except (AttributeError, OSError, ValueError):
        return False


class Printer:
    """One line per job on stdout as it ends; notes (reconnects) on stderr."""

    def __init__(self, as_json: bool, out_dir: str | None = None) -> None:
        self.as_json = as_json
        self.out_dir = out_dir  #: write results to files here instead of printing them
        self.stdout = sys.stdout
        self.err = Console(stderr=True)
        self.tty = Console() if self.stdout.isatty() else None
        self.ended: set[str] = set()  #: ids whose outcome was printed
        self.failed = 0  #: how many of them did not succeed
        self._bar: Console | None = None  # the progress bar's console, while it shows
        self._held: list[Text] | None = None  # lines waiting for the bar's next batch
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        self._last_note = ""

    # ---------------------------------------------------------------- lines
    def outcome(self, r: JobResult) -> None:
        self.ended.add(r.id)
        paths: list[str] | None = None
        trouble = ""
        if r.ok and self.out_dir is not None:
            try:
                paths = save(self.out_dir, r.id, r.frames or [])
            except OSError as exc:  # the job did its work: `rw result ID --out` may fetch it again
                trouble = f"cannot write {exc.filename}: {exc.strerror or exc}"
        self.failed += not r.ok or bool(trouble)
        if self.as_json:
            if r.ok and self.out_dir is not None:  # the files instead of the result
                line: dict[str, object] = {"id": r.id, "status": r.status, "files": paths or []}
                if trouble:
                    line["error"] = trouble
            else:
                line = r.as_dict()
            self._line(json.dumps(line))
        elif trouble:
            self._line(f"{r.id}  done, but {trouble}", "✗", "red")
        elif paths is not None:
            self._line(f"{r.id}  {_files_text(paths, sum(map(len, r.frames or [])))}", "✓", "green")
        elif r.ok:
            self._line(f"{r.id}  {shown(b''.join(r.frames or []))}", "✓", "green")
        else:
            summary = (r.error or "").strip().splitlines()  # an error text's first line
            why = f" ({r.reason})" if r.reason and r.reason != r.status else ""
            self._line(f"{r.id}  {r.status}{why}" + (f": {summary[0]}" if summary else ""),
                       "✗", "red")

    def say(self, text: str, style: str = "") -> None:
        """A message on stderr, never wrapped (a pipe is not 80 columns wide)."""
        self.err.print(Text(text, style=style), soft_wrap=True)

    def pending(self, job_id: str) -> None:
        """A job that had not ended when rw was interrupted: it keeps running on the broker."""
        if self.as_json:
            self._line(json.dumps({"id": job_id, "status": "pending"}))
        else:
            self._line(f"{job_id}  pending", "…", "yellow")

    def note(self, text: str) -> None:
        """A remark on stderr, in yellow (in order with the lines when a bar shares the terminal).

        A note the same as the one before is dropped: the client says "not answering" on
        every ping while the broker is away, and "reconnected" twice after a broker restart
        (once for the new connection, once for the new broker id).
        """
        if text == self._last_note:
            return
        self._last_note = text
        line = Text(text, style="yellow")
        if self._held is not None:
            with self._lock:
                self._held.append(line)
        else:
            (self._bar or self.err).print(line, soft_wrap=True)

    def _line(self, text: str, mark: str = "", style: str = "") -> None:
        if self._held is None and (self.tty is None or not mark):
            self.stdout.write(f"{mark} {text}\n" if mark else f"{text}\n")
            self.stdout.flush()
            return
        line = Text.assemble((mark, style), " ", text) if mark else Text(text)
        if self._held is not None:  # only this thread sets or clears _held; the flusher empties it
            with self._lock:
                self._held.append(line)
        else:
            self.tty.print(line, soft_wrap=True)  # type: ignore[union-attr]

    # ---------------------------------------------------------------- progress bar
    def bar_started(self, console: Console) -> None:
        """A progress bar now shows on ``console`` (stderr): keep lines from garbling it."""
        self._bar = console
        if self.tty is not None and _same_terminal(self.stdout, console.file):
            self._held = []
            self._stop.clear()
            self._flusher = threading.Thread(target=self._flush_loop, name="rw-lines", daemon=True)
            self._flusher.start()

    def bar_stopping(self) -> None:
        """Print what is held while the bar still shows; lines go straight out again after."""
        if self._flusher is not None:
            self._stop.set()
            self._flusher.join()
            self._flusher = None
        self.flush()
        with self._lock:
            self._held = None
        self._bar = None

    def flush(self) -> None:
        with self._lock:  # held while printing too: batches must not overtake each other
            if self._held and self._bar is not None:
                self._bar.print(Text("\n").join(self._held), soft_wrap=True)
                self._held.clear()

    def _flush_loop(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL):
            self.flush()


def _each(results: Iterator[JobResult], signals: Signals) -> Iterator[JobResult]:
    while True:
        with signals.waiting():
            r = next(results, None)
        if r is None:
            return
        yield r
        signals.check()  # a signal that came while the line was printed


def follow(client: Client, ids: list[str], out: Printer, signals: Signals,
           progress: bool = True) -> None:
    """Print each job's outcome as it arrives until all of them have ended.

    With ``progress``, a batch of jobs shows a progress bar on stderr when it is a terminal.
    Raises :class:`Interrupted` on SIGINT/SIGTERM; :func:`wind_down` then tells the rest.
    """
    client.on_event = out.note
    results = _each(client.results(ids), signals)
    if progress and len(ids) == 1 and out.err.is_terminal:
        _follow_one(client, ids[0], out, results)
        return
    if not (progress and len(ids) > 1 and out.err.is_terminal):
        for r in results:
            out.outcome(r)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("jobs"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
                  console=out.err, transient=True, redirect_stdout=False,
                  redirect_stderr=False) as bar:
        task = bar.add_task("jobs", total=len(ids), failed=0)
        out.bar_started(bar.console)
        try:
            for r in results:
                out.outcome(r)
                bar.update(task, advance=1, failed=out.failed)
        finally:
            out.bar_stopping()


def _follow_one(client: Client, job_id: str, out: Printer, results: Iterator[JobResult]) -> None:
    """One job: a spinner on stderr, and its progress (fraction, message) as the worker
    reports it."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=out.err,
                  transient=True, redirect_stdout=False, redirect_stderr=False) as bar:
        task = bar.add_task(job_id, total=None, note="")

        def seen(watched: str, report: dict[str, object]) -> None:
            fraction = report.get("fraction")
            known = isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
            bar.update(task, total=1.0 if known else None,
                       completed=float(fraction) if known else 0.0,  # type: ignore[arg-type]
                       note=str(report.get("message") or "")[:60])

        client.on_progress = seen
        client.follow_progress(job_id)
        out.bar_started(bar.console)
        try:
            for r in results:
                out.outcome(r)
        finally:
            out.bar_stopping()
            client.on_progress = None


def summary(out: Printer, total: int) -> None:
    """Say on stderr how many jobs did not succeed (not with --json: the lines say it)."""
    if out.failed and not out.as_json:
        out.say(f"{out.failed} of {total} jobs did not succeed", "red")


def wind_down(client: Client, ids: list[str], out: Printer, sent: bool) -> tuple[list[str], bool]:
    """After an interrupt: print the outcomes already received and the jobs still running.

    Before the ids of unfinished jobs are given out as pending, the broker gets a moment
    to confirm (journal) them: a job sent but not yet confirmed could otherwise be lost
    with this process's socket. Returns the ids printed as pending, and whether the
    broker is known to hold all of them (``sent``: every job was handed to the socket).
    """
    left = [job_id for job_id in ids if job_id not in out.ended]
    confirmed = sent
    if sent and left:
        try:
            client.wait_confirmed(left, timeout=CONFIRM_WAIT)
        except (TimeoutError, RespWorkersError):
            confirmed = False
        try:
            for r in client.results(left, timeout=0):  # only those already here: no waiting
                out.outcome(r)
        except (TimeoutError, RespWorkersError):
            pass
    pending = [job_id for job_id in left if job_id not in out.ended]
    for job_id in pending:
        out.pending(job_id)
    return pending, confirmed
