"""What a big queue costs: memory per queued job, and a status snapshot that does not grow
with the jobs held. (Rates and restart times at a million jobs: benchmarks/suite.py --scale.)"""

from __future__ import annotations

import gc
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest

from respworkers import protocol as p
from respworkers.broker.core import BrokerCore
from respworkers.broker.journal import SqliteJournal
from respworkers.config import BrokerConfig

pytestmark = pytest.mark.timeout(120)

#: Traced bytes per queued job beyond a 100-byte payload (32-hex-digit ids, SUBMITS of 100).
#: About 530 on CPython 3.11: the Job record 280, its id 81, the payload's list and bytes
#: header 97, seq 32, the jobs dict and the queue entry. An eagerly made list per job
#: (56 bytes) or a second copy of the id (65) goes over.
MAX_BYTES_PER_QUEUED_JOB = 580


def submit_all(core: BrokerCore, n: int) -> None:
    """n new jobs, 100 per SUBMITS, each message from a routing id of its own (as a socket
    gives them: new bytes objects)."""
    for first in range(0, n, 100):
        frames = p.encode_submits([p.encode_submit(uuid.uuid4().hex, p.DEFAULT_QUEUE, None,
                                                   [b"p" * 100]) for _ in range(first, first + 100)])
        core.set_time(time.monotonic(), time.time())
        core.on_client(b"rwc-" + uuid.uuid4().bytes, [bytes(bytearray(f)) for f in frames])
        core.send_results()
        core.maybe_flush()
    core.flush()


def test_a_queued_job_costs_little_beyond_its_payload(tmp_path: Path) -> None:
    n = 20_000
    core = BrokerCore(BrokerConfig(max_queued=n + 1), lambda r, f: None, lambda r, f: None,
                      SqliteJournal(tmp_path / "j.db"))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        submit_all(core, n)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert core.snapshot()["queued"] == n
    per_job = grown / n - 100
    assert per_job < MAX_BYTES_PER_QUEUED_JOB, f"{per_job:.0f} bytes per queued job beyond its payload"
    core.journal.close()


def test_the_status_snapshot_does_not_grow_with_the_jobs_held(tmp_path: Path) -> None:
    """Queued and retained jobs are counted, never walked: a snapshot of a broker holding
    50,000 jobs takes about as long as one of a broker holding 100."""
    core = BrokerCore(BrokerConfig(max_queued=100_000, max_retained=100_000), lambda r, f: None,
                      lambda r, f: None, SqliteJournal(tmp_path / "j.db"))

    def snapshot_seconds() -> float:
        best = float("inf")
        for _ in range(20):
            t = time.perf_counter()
            core.snapshot()
            best = min(best, time.perf_counter() - t)
        return best

    submit_all(core, 100)
    small = snapshot_seconds()
    submit_all(core, 50_000)
    big = snapshot_seconds()
    assert core.snapshot()["queued"] == 50_100
    assert big < small * 5 + 0.001, (small, big)
    core.journal.close()
