"""CPU per job of the broker's decisions alone: BrokerCore driven in-process, no sockets.

    python benchmarks/core.py [--jobs N] [--rounds R] [--journal memory|sqlite] [--metrics]
                              [--debug-log text|json] [--profile]

A client sends jobs 100 per SUBMITS, 4 workers answer each JOB at once, the loop ends
every turn as the server does (set_time, send_results, maybe_flush). The figure is process CPU
time per job, best of the rounds: what the core costs the broker's loop per job, the
part of the broker that is pure Python. It answers "did this change to core.py or
protocol.py make the hot path cheaper?" in seconds, with far less noise than the
socket benchmark (run.py), which shares the machine with worker and client processes.
``--debug-log`` runs with the broker's debug log on (each job's steps, written to
/dev/null): its cost per job, against the default, where debug is off.

``--metrics`` adds what ``[broker] metrics`` costs the loop: the per-job observations and a
snapshot for the scrapes every PUBLISH_EVERY seconds (the HTTP thread itself is not run).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time

from respworkers import logs, protocol
from respworkers.broker.core import BrokerCore
from respworkers.broker.journal import Journal, NullJournal, SqliteJournal
from respworkers.broker.metrics import PUBLISH_EVERY, Recorder, take_snapshot
from respworkers.config import BrokerConfig

BATCH = 100
WORKERS = 4


def run_once(jobs: int, journal: Journal, metrics: bool = False) -> float:
    """Process CPU seconds for ``jobs`` jobs through a fresh core."""
    to_workers: list[tuple[bytes, list[bytes]]] = []
    core = BrokerCore(BrokerConfig(journal=":memory:", max_retained=20_000),
                      lambda rid, frames: None, lambda rid, frames: to_workers.append((rid, frames)),
                      journal)
    for i in range(WORKERS):
        core.on_worker(b"w%d" % i, protocol.encode_hello(["default"], {"name": f"w{i}"}))
    to_workers.clear()
    recorder = Recorder() if metrics else None
    if recorder is not None:
        core.record_metrics(recorder)
    publish_at = 0.0
    payload = [b"x" * 64]
    started = time.process_time()
    for first in range(0, jobs, BATCH):
        core.set_time(time.monotonic(), time.time())
        core.on_client(b"client", protocol.encode_submits([
            protocol.encode_submit(f"j{i}", "default", None, payload)
            for i in range(first, min(first + BATCH, jobs))]))
        core.send_results()
        core.maybe_flush()
        while to_workers:
            sent, to_workers[:] = to_workers[:], []
            core.set_time(time.monotonic(), time.time())
            for wid, frames in sent:  # each worker answers its JOB at once
                words = frames[0].split(b" ")
                if words[1] != protocol.JOB:  # a heartbeat
                    continue
                core.on_worker(wid, [b"RWW3 RESULT %s %s %s 1" % (words[2], words[3], words[5]),
                                     *frames[1:]])
            core.send_results()
            core.maybe_flush()
        core.tick()
        if recorder is not None and core.now >= publish_at:  # as the server's loop does
            publish_at = core.now + PUBLISH_EVERY
            take_snapshot(core, recorder, "running")
    core.flush()
    return time.process_time() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--journal", choices=("memory", "sqlite"), default="memory")
    ap.add_argument("--metrics", action="store_true", help="with Prometheus metrics on")
    ap.add_argument("--profile", action="store_true", help="one round under cProfile")
    ap.add_argument("--debug-log", choices=logs.FORMATS,
                    help="log every job's steps at debug level, in this format, to /dev/null")
    ap.add_argument("--label", default="", help="added to the printed line (e.g. compiled)")

    args = ap.parse_args()
    if args.debug_log:
        logs.setup("debug", args.debug_log, open(os.devnull, "w"))  # noqa: SIM115 - for the run

    def journal() -> Journal:
        if args.journal == "memory":
            return NullJournal()
        return SqliteJournal(os.path.join(tempfile.mkdtemp(prefix="rwcore-"), "j.sqlite3"))

    if args.profile:
        prof = cProfile.Profile()
        prof.runcall(run_once, args.jobs, journal(), args.metrics)
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        return 0
    best = min(run_once(args.jobs, journal(), args.metrics) for _ in range(args.rounds))
    what = (", metrics on" if args.metrics else "") + (
        f", debug log in {args.debug_log}" if args.debug_log else "")
    from respworkers.broker import core as core_module

    if (core_module.__file__ or "").endswith(".so"):
        what += ", compiled"
    elif args.label == "compiled":
        raise SystemExit("--label compiled, but respworkers.broker.core is pure Python here "
                         f"({core_module.__file__}): make compiled, and PYTHONPATH=build/compiled")
    if args.label and args.label != "compiled":
        what += f", {args.label}"
    print(f"broker core, {args.journal} journal{what}: {best / args.jobs * 1e6:.1f} us CPU per job "
          f"(best of {args.rounds} rounds of {args.jobs} jobs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
