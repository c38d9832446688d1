"""Kept for old command lines: the throughput benchmark now lives in suite.py.

    python benchmarks/run.py [--jobs N] [--rounds R]

runs ``suite.py --only od-1000,batch`` (the loads run.py measured: baseline, rw-memory,
rw-sqlite, rw-full one job per message, rw-batch and rw-full-batch, 1000 jobs in flight,
4 workers). The baseline broker is defined once, in brokers.py; the peers in peers.py.
"""

from __future__ import annotations

import sys

from suite import main

if __name__ == "__main__":
    sys.exit(main(["--only", "od-1000,batch", *sys.argv[1:]]))
