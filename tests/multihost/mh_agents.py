"""What runs on the lab's hosts besides ``rw``: a recording worker and a client driver.

``Recorder`` (``rw worker mh_agents:Recorder``) is jobs_fixtures' ``Tester`` that also
appends one JSON line per attempt it starts and ends to ``$MH_RECORD``: the namespaces
share the file system and the clock, so the test sees exactly when and where each
attempt ran (which host, which attempt, when it was re-dispatched).

The client driver runs the Python ``respworkers.Client`` on the client host::

    python mh_agents.py client --config client.toml --jobs jobs.json --out out.jsonl [--wait-for PATH]

It submits the jobs (``submit_many``), waits for every outcome and writes one JSON line
per event to ``--out``: ``start``, ``submitted``, ``note`` (the client's own progress
notes: reconnects, resyncs), ``outcome`` (per job, as ``results()`` yields it), then
``end`` with the outcome messages the client received per job from the wire (the
client drops repeats), or ``error``. Exit code 0 when every job ended.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections import Counter
from typing import Any

from respworkers.client import Client, JobResult
from respworkers.config import load

from jobs_fixtures import Tester

RECORD_ENV = "MH_RECORD"


class Recorder(Tester):
    """Tester, plus a line in $MH_RECORD when an attempt starts and when it ends."""

    def setup(self) -> None:
        self._record = os.environ.get(RECORD_ENV)

    def _note(self, event: str) -> None:
        if not self._record or self.job is None:
            return
        line = json.dumps({"ev": event, "job": self.job.id, "attempt": self.job.attempt,
                           "pid": os.getpid(), "t": time.time()}) + "\n"
        fd = os.open(self._record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())  # one short O_APPEND write: lines never interleave
        finally:
            os.close(fd)

    def process(self, payload: bytes) -> bytes:
        self._note("start")
        try:
            return super().process(payload)
        finally:
            self._note("end")



class CountingClient(Client):
    """A Client that also counts the outcome messages it receives per job from the wire
    (before it drops repeats), to show how many duplicates the protocol let through."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.wire: Counter[str] = Counter()
        ended = self.session._ended  # every outcome message, repeats included

        def counted(result: JobResult) -> bool:
            self.wire[result.id] += 1
            return ended(result)

        self.session._ended = counted  # type: ignore[method-assign]


class Out:
    def __init__(self, path: str) -> None:
        self.path = path

    def write(self, ev: str, **fields: Any) -> None:
        with open(self.path, "a") as fh:  # whole lines: the test reads while we write
            fh.write(json.dumps({"ev": ev, "t": time.time(), **fields}) + "\n")


def run_client(args: argparse.Namespace) -> int:
    out = Out(args.out)
    out.write("start", pid=os.getpid())
    with open(args.jobs) as fh:
        jobs = json.load(fh)
    cfg = load(args.config).client
    try:
        client = CountingClient.from_config(cfg)
        client.on_event = lambda note: out.write("note", text=note)
        with client:
            if args.wait_for:  # connected and ready; submit the moment the test says so
                client.status()  # a first round trip to the broker
                while not os.path.exists(args.wait_for):
                    time.sleep(0.01)
            ids = client.submit_many(jobs)
            out.write("submitted", n=len(ids))
            for r in client.results(ids, timeout=args.timeout):
                out.write("outcome", **{**r.as_dict(), "reason": r.reason})
            out.write("end", wire=dict(client.wire))
    except BaseException as exc:
        out.write("error", error=f"{type(exc).__name__}: {exc}", tb=traceback.format_exc())
        return 1
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("client")
    c.add_argument("--config", required=True)
    c.add_argument("--jobs", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--timeout", type=float, default=50.0)
    c.add_argument("--wait-for", metavar="PATH", help="submit only once PATH exists")
    args = parser.parse_args(argv)
    return run_client(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
