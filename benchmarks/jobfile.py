"""How ``rw submit``'s job-file parsing grows with the number of jobs.

    python benchmarks/jobfile.py [--small N] [--factor K] [--rounds R]

Parses a JSON array and the same jobs as JSON Lines, N and K*N jobs, and reports the
best time of R rounds and the ratio big/small. Linear parsing gives a ratio near K
(4 by default); a quadratic one gives about K squared (16), which is what counting
newlines from the start of the file for every job used to cost.
"""

from __future__ import annotations

import argparse
import json
import time

from respworkers.jobfile import parse


def array(n: int) -> str:
    return "[\n" + ",\n".join(json.dumps({"payload": f"job {i}", "tries": 2}) for i in range(n)) + "\n]\n"


def json_lines(n: int) -> str:
    return "\n".join(json.dumps({"payload": f"job {i}", "tries": 2}) for i in range(n)) + "\n"


def best(text: str, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        parse(text, "bench")
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", type=int, default=10_000, help="jobs in the small file")
    ap.add_argument("--factor", type=int, default=4, help="the big file has this many times more")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    small, big = args.small, args.small * args.factor
    for name, make in (("array", array), ("json-lines", json_lines)):
        t_small = best(make(small), args.rounds)
        t_big = best(make(big), args.rounds)
        print(f"jobfile {name:10s} {small:>7} jobs {t_small * 1e3:8.1f} ms  {big:>7} jobs "
              f"{t_big * 1e3:8.1f} ms  ratio {t_big / t_small:5.1f} (linear: {args.factor})")


if __name__ == "__main__":
    main()
