"""Process plumbing for the benchmarks: start children, always stop them, read /proc.

Every process a benchmark starts goes through a :class:`Fleet`, which stops them by pid
(SIGTERM, then SIGKILL) when its ``with`` block ends, on an error or Ctrl-C too. Children
also ask the kernel for SIGTERM when the suite itself dies (PR_SET_PDEATHSIG), so that
a suite killed with SIGKILL leaves no broker or worker behind on a shared machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import multiprocessing as mp
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

import zmq

PR_SET_PDEATHSIG = 1
_CTX = mp.get_context("fork")  # children inherit the suite's functions; no pickling


class ChildFailed(RuntimeError):
    """A benchmark process died or reported an exception: the measurement is void."""


def _child(target: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Run ``target`` in a child: die with the parent, leave Ctrl-C to the parent."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    # The terminal sends Ctrl-C to the whole process group; the suite stops its children
    # itself (by pid), so they need not print tracebacks of their own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the suite's handler, inherited by fork
    if os.getppid() == 1:  # the parent is already gone
        os._exit(1)
    target(*args)


class Fleet:
    """The processes of one measurement; all stopped by pid when the block ends."""

    def __init__(self) -> None:
        self.procs: list[mp.process.BaseProcess] = []
        self.tmp = tempfile.mkdtemp(prefix="rwbench-")

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, target: Callable[..., Any], *args: Any, name: str = "") -> mp.process.BaseProcess:
        p = _CTX.Process(target=_child, args=(target, args), name=name or target.__name__, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def stop(self, p: mp.process.BaseProcess, timeout: float = 5.0) -> float:
        """SIGTERM one process by pid, wait up to ``timeout`` s, then SIGKILL; seconds it took."""
        started = time.monotonic()
        if p.pid is not None and p.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGTERM)
            p.join(timeout)
            if p.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.join(5)
        return time.monotonic() - started

    def close(self) -> None:
        """Stop every process still running (the last started first), then remove the temp folder."""
        try:
            alive = [p for p in reversed(self.procs) if p.pid is not None and p.exitcode is None]
            for p in alive:  # everyone at once: workers and clients die at SIGTERM
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)  # type: ignore[arg-type]
            deadline = time.monotonic() + 5.0
            for p in alive:
                p.join(max(0.0, deadline - time.monotonic()))
            for p in alive:
                if p.exitcode is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGKILL)  # type: ignore[arg-type]
                    p.join(5)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def ipc(self, name: str) -> str:
        return f"ipc://{self.tmp}/{name}"

    def get(self, q: Any, timeout: float, what: str) -> Any:
        """The next item of a child's queue; raises at once if one of our processes died."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = q.get(timeout=0.2)
            except queue.Empty:
                dead = [p for p in self.procs if p.exitcode is not None]
                if dead:
                    raise ChildFailed(f"while waiting for {what}: " + ", ".join(
                        f"{p.name} (pid {p.pid}) exited with {p.exitcode}" for p in dead)) from None
                if time.monotonic() > deadline:
                    raise ChildFailed(f"no {what} within {timeout:g}s") from None
                continue
            if isinstance(item, tuple) and item and item[0] == "error":
                raise ChildFailed(f"{what}: a child failed:\n{item[1]}")
            return item


def report_errors(out: Any, fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn`` in a child; its exception goes to the parent's queue instead of a timeout."""
    try:
        fn(*args)
    except BaseException:
        out.put(("error", traceback.format_exc()))
        raise


def queue_() -> Any:
    return _CTX.Queue()


def event() -> Any:
    return _CTX.Event()


# ------------------------------------------------------------------------------ /proc readers
def pid_of(p: mp.process.BaseProcess) -> int:
    """The pid of a started process."""
    if p.pid is None:
        raise ChildFailed(f"{p.name} was never started")
    return p.pid


def cpu_seconds(pid: int) -> float:
    """CPU time of all threads of a live process (the ZeroMQ I/O thread too), in seconds.

    Read from each thread's schedstat (nanoseconds) rather than /proc/PID/stat (clock ticks
    of 10 ms), so short runs still give usable microseconds per job.
    """
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                    total += int(fh.read().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                continue  # a thread that just ended
        return total / 1e9
    except FileNotFoundError:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_for_ipc(endpoints: list[str], timeout: float = 30.0, watch: Fleet | None = None) -> None:
    """Until the ipc:// socket files exist: the broker has bound them."""
    deadline = time.monotonic() + timeout
    paths = [e[len("ipc://"):] for e in endpoints if e.startswith("ipc://")]
    while not all(os.path.exists(p) for p in paths):
        if watch is not None and any(p.exitcode is not None for p in watch.procs):
            raise ChildFailed(f"a process exited before binding {endpoints}")
        if time.monotonic() > deadline:
            raise ChildFailed(f"{endpoints} not bound within {timeout:g}s")
        time.sleep(0.01)


# ------------------------------------------------------------------------------ machine
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _git_commit(folder: str) -> str | None:
    """The commit checked out where ``folder`` is, with "+" if its files differ from it."""
    try:
        head = subprocess.run(["git", "-C", folder, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        return head + ("+" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass
class Machine:
    """Where and when: the figures only mean something next to these."""

    date: str
    cores: int
    cpu: str
    python: str
    pyzmq: str
    libzmq: str
    respworkers: str
    commit: str | None  #: of the respworkers package measured ("+": with uncommitted changes)
    respworkers_path: str
    bench_commit: str | None  #: of these benchmark scripts
    loadavg_start: list[float]

    @classmethod
    def now(cls) -> Machine:
        import respworkers

        return cls(
            date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            cores=len(os.sched_getaffinity(0)), cpu=_cpu_model(),
            python=sys.version.split()[0], pyzmq=zmq.__version__, libzmq=zmq.zmq_version(),
            respworkers=respworkers.__version__,
            commit=_git_commit(os.path.dirname(os.path.abspath(respworkers.__file__))),
            respworkers_path=os.path.dirname(os.path.abspath(respworkers.__file__)),
            bench_commit=_git_commit(os.path.dirname(os.path.abspath(__file__))),
            loadavg_start=_loadavg())


def loadavg() -> list[float]:
    return _loadavg()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """A SIGTERM to the suite unwinds it like Ctrl-C, so every ``finally`` stops its children."""
    def raise_interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
