"""Throughput of the respworkers broker, as ratios against a minimal on-demand broker run alongside.

    python benchmarks/run.py [--jobs N] [--workers W] [--rounds R] [--json]

Each round runs, one after the other on the same machine:

- ``baseline``: a minimal ~40-line Python on-demand (LRU) broker in the style of the
  ZeroMQ guide: a ROUTER for clients, a ROUTER for workers, a deque of ready workers;
- ``rw-memory``: the respworkers broker with ``journal = ":memory:"``;
- ``rw-sqlite``: the respworkers broker with its sqlite journal (WAL, sync=normal);
- ``rw-full`` (with --full): the same broker with real respworkers worker processes and
  the real ``respworkers.Client``, as users run it.

In every case the same kind of load runs against it: W worker processes that answer at
once (raw sockets speaking each broker's protocol, so the broker is what is measured)
and one client process keeping a window of jobs in flight. Figures are jobs per second
and, because these machines are shared and noisy, ratios to the baseline of the same
round; the report gives the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections import deque
from typing import Callable

import zmq

WINDOW = 500  # jobs a client keeps in flight


# ------------------------------------------------------------------------------ baseline broker
def baseline_broker(front: str, back: str) -> None:
    """The minimal on-demand broker the respworkers broker is held against (~40 lines)."""
    ctx = zmq.Context()
    frontend = ctx.socket(zmq.ROUTER)
    frontend.bind(front)
    backend = ctx.socket(zmq.ROUTER)
    backend.bind(back)
    ready: deque[bytes] = deque()
    pending: deque[list[bytes]] = deque()
    poller = zmq.Poller()
    poller.register(frontend, zmq.POLLIN)
    poller.register(backend, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if backend in events:
            while True:
                try:
                    frames = backend.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                worker = frames[0]
                if len(frames) > 2:  # [worker, client, empty, reply...]
                    frontend.send_multipart(frames[1:])
                if pending:
                    backend.send_multipart([worker, *pending.popleft()])
                else:
                    ready.append(worker)
        if frontend in events:
            while True:
                try:
                    frames = frontend.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if ready:
                    backend.send_multipart([ready.popleft(), *frames])
                else:
                    pending.append(frames)


def baseline_worker(back: str) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(back)
    s.send(b"READY")
    while True:
        frames = s.recv_multipart()  # [client, empty, payload]
        s.send_multipart(frames)


def windowed_client(front: str, n: int, out: mp.Queue,
                    request: Callable[[int, int], list[bytes]],
                    answers: Callable[[list[bytes]], int], per_message: int = 1) -> None:
    """The load for every broker: keep WINDOW jobs in flight until n answers came back.

    ``request(first, k)`` is one message carrying jobs first..first+k-1 (k <= per_message);
    ``answers(reply)`` is how many jobs a reply finishes.
    """
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(front)
    time.sleep(0.3)
    sent = got = 0
    started = time.perf_counter()
    while got < n:
        while sent < n and sent - got <= WINDOW - per_message:
            k = min(per_message, n - sent)
            s.send_multipart(request(sent, k))
            sent += k
        got += answers(s.recv_multipart())
    out.put(time.perf_counter() - started)


PAYLOAD = b"x" * 64


def baseline_client(front: str, n: int, out: mp.Queue) -> None:
    windowed_client(front, n, out, lambda i, k: [b"", PAYLOAD], lambda reply: 1)


# ------------------------------------------------------------------------------ respworkers
def rw_broker(front: str, back: str, status: str, journal: str) -> None:
    from respworkers.broker.server import run_broker
    from respworkers.config import BrokerConfig

    run_broker(BrokerConfig(clients=front, workers=back, status=status, journal=journal))


def rw_worker(back: str) -> None:
    """A raw RWW3 worker: the protocol with no work, so the broker is what is measured."""
    from respworkers import protocol

    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(back)
    s.send_multipart(protocol.encode_hello(["default"], {"name": f"bench:{os.getpid()}"}))
    while True:
        frames = s.recv_multipart()
        words = frames[0].split(b" ")  # RWW3 JOB id attempt timeout token
        if words[1] == protocol.JOB:
            s.send_multipart([b"RWW3 RESULT %s %s %s 1" % (words[2], words[3], words[5]), *frames[1:]])


def rw_client(front: str, n: int, out: mp.Queue) -> None:
    from respworkers import protocol

    windowed_client(
        front, n, out,
        lambda i, k: protocol.encode_submit(f"b{i}", "default", None, None, [PAYLOAD]),
        lambda reply: int(reply[0].startswith(b"RWC2 RESULT ")),  # not the batched ACCEPTEDs
    )


BATCH = 100  # jobs per SUBMITS in rw-batch and rw-full


def rw_batch_client(front: str, n: int, out: mp.Queue) -> None:
    """The same window of jobs, sent BATCH per SUBMITS message; results come batched too."""
    from respworkers import protocol

    def answers(reply: list[bytes]) -> int:
        line = reply[0]
        if line.startswith(b"RWC2 RESULTS "):
            return (line.count(b" ") - 1) // 2  # "RWC2 RESULTS", then id and count per job
        return int(line.startswith(b"RWC2 RESULT "))

    windowed_client(
        front, n, out,
        lambda i, k: protocol.encode_submits([
            protocol.encode_submit(f"b{j}", "default", None, None, [PAYLOAD]) for j in range(i, i + k)]),
        answers, per_message=BATCH,
    )


def full_worker(back: str) -> None:
    """The real thing: respworkers' own worker process (job in a thread, heartbeats)."""
    from respworkers.config import WorkerConfig
    from respworkers.examples import Echo
    from respworkers.worker.runner import Runner

    Runner(Echo, WorkerConfig(broker=back), ("default",)).run()


def full_client(front: str, n: int, out: mp.Queue) -> None:
    """The real thing: respworkers.Client submitting in windows and collecting results."""
    from respworkers import Client

    with Client(front) as c:
        c.run(b"warm-up")
        started = time.perf_counter()
        chunks: deque[list[str]] = deque()
        sent = done = 0
        while done < n:
            while sent < n and len(chunks) * BATCH < WINDOW:
                k = min(BATCH, n - sent)
                chunks.append(c.submit_many([PAYLOAD] * k))
                sent += k
            done += sum(1 for r in c.results(chunks.popleft()) if r.ok)
        out.put(time.perf_counter() - started)


# ------------------------------------------------------------------------------ driver
def cpu_seconds(pid: int) -> float:
    """User + system CPU a live process has used (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(kind: str, jobs: int, workers: int) -> tuple[float, float]:
    """(jobs per second, broker CPU microseconds per job) for one run."""
    tmp = tempfile.mkdtemp(prefix="rwb-")
    front, back, status = (f"ipc://{tmp}/{name}" for name in ("c", "w", "s"))
    procs: list[mp.Process] = []
    if kind == "baseline":
        procs.append(mp.Process(target=baseline_broker, args=(front, back), daemon=True))
        worker, client = baseline_worker, baseline_client
    else:
        journal = ":memory:" if kind == "rw-memory" else os.path.join(tmp, "journal.sqlite3")
        procs.append(mp.Process(target=rw_broker, args=(front, back, status, journal), daemon=True))
        worker, client = {"rw-full": (full_worker, full_client),
                          "rw-batch": (rw_worker, rw_batch_client)}.get(kind, (rw_worker, rw_client))
    procs += [mp.Process(target=worker, args=(back,), daemon=True) for _ in range(workers)]
    out: mp.Queue = mp.Queue()
    try:
        for p in procs:
            p.start()
        time.sleep(0.5)
        broker_pid = procs[0].pid
        assert broker_pid is not None
        cpu_before = cpu_seconds(broker_pid)
        c = mp.Process(target=client, args=(front, jobs, out), daemon=True)
        c.start()
        seconds = out.get(timeout=300)
        cpu = cpu_seconds(broker_pid) - cpu_before
        c.join(5)
        return jobs / seconds, cpu / jobs * 1e6
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("--full", action="store_true",
                    help="also rw-full: sqlite journal, real Worker processes and real Client")
    args = ap.parse_args()
    kinds: tuple[str, ...] = ("baseline", "rw-memory", "rw-sqlite", "rw-batch")
    if args.full:
        kinds += ("rw-full",)
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    cpus: dict[str, list[float]] = {k: [] for k in kinds}
    ratios: dict[str, list[float]] = {k: [] for k in kinds[1:]}
    for r in range(args.rounds):
        got = {k: measure(k, args.jobs, args.workers) for k in kinds}
        for k in kinds:
            rates[k].append(got[k][0])
            cpus[k].append(got[k][1])
        for k in kinds[1:]:
            ratios[k].append(got[k][0] / got["baseline"][0])
        print(f"round {r + 1}: " + "  ".join(
            f"{k} {got[k][0]:,.0f}/s ({got[k][1]:.0f} us cpu/job)" for k in kinds), file=sys.stderr)
    report = {
        "jobs": args.jobs, "workers": args.workers, "rounds": args.rounds,
        "median_jobs_per_s": {k: round(statistics.median(v)) for k, v in rates.items()},
        "median_ratio_to_baseline": {k: round(statistics.median(v), 3) for k, v in ratios.items()},
        "median_broker_cpu_us_per_job": {k: round(statistics.median(v), 1) for k, v in cpus.items()},
        "journal_cost": round(1 - statistics.median(
            [s / m for s, m in zip(rates["rw-sqlite"], rates["rw-memory"])]), 3),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.jobs} jobs, {args.workers} workers, median of {args.rounds} rounds")
        for k in kinds:
            ratio = "" if k == "baseline" else (
                f"  x{report['median_ratio_to_baseline'][k]:.2f} of baseline")
            cpu = report["median_broker_cpu_us_per_job"][k]
            print(f"  {k:10s} {report['median_jobs_per_s'][k]:>8,} jobs/s{ratio:24s}"
                  f"  broker CPU {cpu:5.1f} us/job")
        print(f"  journal costs {report['journal_cost']:.1%} of rw-memory throughput")
    return 0


if __name__ == "__main__":
    mp.set_start_method("fork")
    sys.exit(main())
