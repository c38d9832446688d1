"""Real processes on ipc:// endpoints in a short temp folder; every process is cleaned up by pid."""

from __future__ import annotations

import fcntl
import os
import pty
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyte
import pytest

from respworkers.client import Client, fetch_status
from respworkers.errors import BrokerUnavailable

TESTS = Path(__file__).parent


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid``, read from /proc (Linux)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


@dataclass
class Proc:
    """A process started by a test, with its output in a file."""

    popen: subprocess.Popen
    log: Path
    known_children: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> list[int]:
        kids = children_of(self.pid)
        self.known_children.update(kids)
        return kids

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            kids = {pid: alive(pid) for pid in self.known_children | set(self.children())}
            raise AssertionError(
                f"{self.popen.args[3:5]} (pid {self.pid}) still running after {timeout}s; "
                f"children alive: {kids}; its output:\n{self.output()}") from None

    def kill_all(self) -> None:
        """SIGKILL this process and every child it ever had that is still alive."""
        if self.popen.poll() is None:
            self.children()
        for pid in [self.pid, *self.known_children]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass


class TtyProc(Proc):
    """A process whose stdin, stdout and stderr are a pseudo-terminal, as in a user's shell.

    What it writes is kept in its log and drawn on a terminal emulator's screen, so a
    test sees what a user would see (cursor movements and all); :meth:`press` types.
    """

    def __init__(self, popen: subprocess.Popen, log: Path, master: int, columns: int, lines: int) -> None:
        super().__init__(popen, log)
        self.master = master
        self.screen = pyte.Screen(columns, lines)
        self._stream = pyte.ByteStream(self.screen)
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.log, "ab") as log:
            while True:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: every process holding the terminal has closed it
                    return
                if not data:
                    return
                log.write(data)
                log.flush()
                with self._lock:
                    self._stream.feed(data)

    def press(self, keys: bytes) -> None:
        """Type on the terminal: b"\\x03" is Ctrl-C (echoed as ^C, SIGINT to the process)."""
        os.write(self.master, keys)

    def lines(self) -> list[str]:
        """The screen now, one string per row, trailing blanks removed."""
        with self._lock:
            return [row.rstrip() for row in self.screen.display]

    def text(self) -> str:
        return "\n".join(self.lines())

    def wait(self, timeout: float = 15.0) -> int:
        code = super().wait(timeout)
        self._reader.join(5)  # everything it wrote is on the screen
        return code

    def kill_all(self) -> None:
        super().kill_all()
        self._reader.join(5)
        try:
            os.close(self.master)
        except OSError:
            pass


class Cluster:
    """Endpoints in a private folder plus the processes a test starts on them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.clients = f"ipc://{root}/clients"
        self.workers = f"ipc://{root}/workers"
        self.status = f"ipc://{root}/status"
        self.journal = str(root / "journal.sqlite3")
        self.procs: list[Proc] = []
        self.env = {k: v for k, v in os.environ.items() if k != "RW_CONFIG"}
        self.env["PYTHONPATH"] = os.pathsep.join([str(TESTS), self.env.get("PYTHONPATH", "")])
        self.env["PYTHONUNBUFFERED"] = "1"
        self._n = 0

    def rw(self, *args: str, name: str = "rw") -> Proc:
        self._n += 1
        log = self.root / f"{self._n:02d}-{name}.log"
        with open(log, "wb") as fh:  # the child keeps its own copy of the descriptor
            popen = subprocess.Popen(
                [sys.executable, "-m", "respworkers", *args], cwd=self.root, env=self.env,
                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        proc = Proc(popen, log)
        self.procs.append(proc)
        return proc

    def rw_tty(self, *args: str, name: str = "rw", columns: int = 100, lines: int = 40) -> TtyProc:
        """Start ``rw`` in a new session whose controlling terminal is a fresh pseudo-terminal."""
        self._n += 1
        log = self.root / f"{self._n:02d}-{name}.log"
        log.touch()
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
        env = {k: v for k, v in self.env.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
        env["TERM"] = "xterm-256color"
        try:
            popen = subprocess.Popen(
                [sys.executable, "-m", "respworkers", *args], cwd=self.root, env=env,
                stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),  # Ctrl-C reaches it
            )
        finally:
            os.close(slave)
        proc = TtyProc(popen, log, master, columns, lines)
        self.procs.append(proc)
        return proc

    def run(self, *args: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run an ``rw`` command to completion (stdout and stderr kept apart)."""
        return subprocess.run(
            [sys.executable, "-m", "respworkers", *args], cwd=self.root, env=self.env,
            capture_output=True, text=True, input=input, timeout=timeout,
        )

    def broker(self, *extra: str, wait: bool = True) -> Proc:
        proc = self.rw("broker", "--clients", self.clients, "--workers", self.workers,
                       "--status", self.status, "--journal", self.journal, *extra, name="broker")
        if wait:
            wait_for(lambda: self.try_status() is not None, 15, what="the broker to answer")
        return proc

    def pool(self, target: str = "jobs_fixtures:Tester", n: int = 1, *extra: str,
             wait: bool = True) -> Proc:
        before = len(self.workers_registered())
        proc = self.rw("worker", target, "--broker", self.workers, "-n", str(n), *extra,
                       name="worker")
        if wait:
            wait_for(lambda: len(self.workers_registered()) >= before + n, 20,
                     what=f"{n} workers to register")
            proc.children()
        return proc

    def try_status(self) -> dict[str, Any] | None:
        try:
            return fetch_status(self.status, 1.0)
        except BrokerUnavailable:
            return None

    def snapshot(self) -> dict[str, Any]:
        return fetch_status(self.status, 5.0)

    def workers_registered(self) -> list[dict[str, Any]]:
        snap = self.try_status()
        return snap["workers"] if snap else []

    def client(self, **kw: Any) -> Client:
        kw.setdefault("request_timeout", 5.0)
        return Client(self.clients, status=self.status, **kw)

    def cleanup(self) -> None:
        for proc in reversed(self.procs):
            proc.kill_all()


FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    if report.when == "call":
        item.stash[FAILED] = report.failed
    return report


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="rw-", dir="/tmp"))  # ipc paths must stay short
    c = Cluster(root)
    try:
        yield c
    finally:
        c.cleanup()
        if request.node.stash.get(FAILED, False):  # CI shows only this: keep the processes' logs
            for log in sorted(root.glob("*.log")):
                text = log.read_text(errors="replace")
                print(f"----- {log.name} (last 60 lines) -----")
                print("\n".join(text.splitlines()[-60:]))
        shutil.rmtree(root, ignore_errors=True)
