"""Worker classes for the pool tests (tests/test_pools.py): one module, several classes,
each with its own queue, so that ``rw worker pool_fixtures`` serves them all."""

from __future__ import annotations

import os

from respworkers import Fail, JobContext, JobOutcome, Retry, Worker

_KEPT: list[bytes] = []  # what ``grow:MB`` holds on to, as a leaking library would


class Upper(Worker):
    queues = ("upper",)

    def process(self, payload: bytes) -> bytes:
        return b"%d:%s" % (os.getpid(), payload.upper())


class Lower(Worker):
    queues = ("lower",)
    backoff = 0.25  # announced per queue in HELLO: this class's retries wait 0.125..0.25 s

    def process(self, payload: bytes) -> bytes:
        if payload == b"retry-once" and self.job is not None and self.job.attempt == 1:
            raise Retry("once more")
        return b"%d:%s" % (os.getpid(), payload.lower())


class Grower(Worker):
    """``grow:MB`` keeps MB more megabytes resident; anything else answers the pid."""

    queues = ("grow",)

    def process(self, payload: bytes) -> bytes:
        text = payload.decode()
        if text.startswith("grow:"):
            block = bytearray(int(text[5:]) << 20)
            block[::4096] = b"x" * len(block[::4096])  # touched: resident, not just reserved
            _KEPT.append(bytes(block))
        return b"%d" % os.getpid()


class Hooked(Worker):
    """Payload ``ok``, ``raise``, ``fail`` or ``retry`` (Retry on the first attempt); every
    hook appends a line to the file named by $HOOK_LOG."""

    queues = ("hooked",)
    log = ""

    def setup(self) -> None:
        self.log = os.environ.get("HOOK_LOG", "")

    def _write(self, line: str) -> None:
        if not self.log:
            return
        with open(self.log, "a") as fh:
            fh.write(line + "\n")

    def before_job(self, job: JobContext) -> None:
        assert self.job is job
        self._write(f"before {job.id} {job.attempt} {job.queue}")

    def process(self, payload: bytes) -> bytes:
        what = payload.decode()
        if what == "raise":
            raise ValueError("bad luck")
        if what == "fail":
            raise Fail("never")
        if what == "retry" and self.job is not None and self.job.attempt == 1:
            raise Retry("again", after=0)
        return b"%d:done" % os.getpid()

    def on_failure(self, job: JobContext, exc: BaseException) -> None:
        self._write(f"failure {job.id} {type(exc).__name__}")

    def after_job(self, job: JobContext, outcome: JobOutcome) -> None:
        self._write(f"after {job.id} {outcome.status} {outcome.seconds >= 0}")
        if job.id.startswith("hook-raises"):
            raise RuntimeError("a broken hook changes nothing")

    def teardown(self) -> None:
        self._write(f"teardown {os.getpid()}")
