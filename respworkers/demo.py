"""``make demo``: a broker, a pool of 4 workers and a batch of jobs, all through the real ``rw`` CLI.

Uses the built-in default endpoints (tcp://127.0.0.1:7781-7783), as a new user would.
Every process it starts is stopped by pid at the end, also on Ctrl-C or failure.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from .client import fetch_status
from .config import DEFAULT_STATUS
from .errors import BrokerUnavailable

console = Console()
RW = [sys.executable, "-m", "respworkers"]


def _show(args: list[str], background: bool = False) -> None:
    console.print(f"[bold cyan]$ rw {shlex.join(args)}{' &' if background else ''}", highlight=False)


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    _show(args, background=True)
    with open(log, "wb") as fh:
        return subprocess.Popen(RW + args, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: gave up waiting for {what}")
        time.sleep(0.1)


def _status() -> dict[str, Any] | None:
    try:
        return fetch_status(DEFAULT_STATUS, 0.5)
    except BrokerUnavailable:
        return None


def main() -> int:
    if _status() is not None:
        console.print("[red]a broker already answers on the default endpoints; stop it first")
        return 1
    work = Path(tempfile.mkdtemp(prefix="rw-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    code = 0
    try:
        console.rule("respworkers demo: a broker, 4 workers and 40 jobs, on built-in defaults")
        broker = _start(["broker"], work / "broker.log")
        procs.append(broker)
        _wait_until(lambda: _status() is not None, 15, "the broker")
        pool = _start(["worker", "respworkers.examples:Demo", "-n", "4"], work / "worker.log")
        procs.append(pool)
        _wait_until(lambda: len((_status() or {}).get("workers", [])) == 4, 20, "4 workers")

        # Ids are unique per run: the journal keeps finished jobs for an hour, and
        # submitting a known id attaches to that job instead of running it again.
        run = time.strftime("%H%M%S")
        jobs: list[dict[str, Any]] = [
            {"payload": w} for w in "the quick brown fox jumps over the lazy dog".split()]
        jobs += [{"payload": f"sleep:{0.1 * (i % 5):.1f}", "id": f"sleepy-{run}-{i}"}
                 for i in range(30)]
        failing = f"always-fails-{run}"
        jobs.append({"payload": "fail", "id": failing, "tries": 2})
        jobfile = work / "jobs.json"
        jobfile.write_text(json.dumps(jobs, indent=1))
        console.print(f"[dim]{len(jobs)} jobs in {jobfile}; one of them always raises, to show "
                      "a retried and then failed job (so rw submit exits 1)")
        _show(["submit", str(jobfile)])
        started = time.monotonic()
        submit = subprocess.run(RW + ["submit", str(jobfile)], stdin=subprocess.DEVNULL)
        console.print(f"[dim]rw submit exited {submit.returncode} after "
                      f"{time.monotonic() - started:.1f}s")

        _show(["status", "--once"])
        subprocess.run(RW + ["status", "--once"], stdin=subprocess.DEVNULL)
        _show(["inspect", failing])
        subprocess.run(RW + ["inspect", failing], stdin=subprocess.DEVNULL)

        console.rule("stopping: SIGTERM to the pool (each worker finishes its job), then the broker")
        for proc in (pool, broker):
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(30)
            except subprocess.TimeoutExpired:
                console.print("[yellow]still finishing a long job: a second SIGTERM hands it back")
                proc.send_signal(signal.SIGTERM)
                rc = proc.wait(10)
            console.print(f"[dim]pid {proc.pid} exited {rc}")
            code |= rc
        console.print(f"[green]demo done[/] (logs in {work})")
    except KeyboardInterrupt:
        code = 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    return code


if __name__ == "__main__":
    sys.exit(main())
