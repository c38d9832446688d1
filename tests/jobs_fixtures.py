"""Worker classes the tests run in real worker processes (importable: tests/ is on PYTHONPATH)."""

from __future__ import annotations

import hashlib
import os
import time

from respworkers import Interrupt, Worker


class Tester(Worker):
    """Payload commands: ``sleep:S``, ``stubborn:S`` (ignores TimeLimit and Cancelled),
    ``progress:N:S`` (N steps of S seconds, each reported),
    ``started:PATH:S``, ``wait:PATH`` (until PATH exists),
    ``pad:N`` (an answer N bytes longer), ``raise``, ``raise-once:PATH``, ``crash``, ``crash-once:PATH``,
    ``cpu:PATH:N`` (say so in a file, then N rounds of one C call that never looks at signals).

    Anything else is echoed.

    Every answer starts with the worker's pid so tests can see who ran what.
    """

    def process(self, payload: bytes) -> bytes:
        text = payload.decode()
        pid = os.getpid()
        if text.startswith("sleep:"):
            time.sleep(float(text[6:]))
        elif text.startswith("progress:"):  # progress:N:S - N steps of S seconds, each reported
            _, steps, seconds = text.split(":")
            for i in range(int(steps)):
                self.progress((i + 1) / int(steps), f"step {i + 1} of {steps}")
                time.sleep(float(seconds))
        elif text.startswith("stubborn:"):  # stubborn:S - sleep S seconds, ignoring interrupts
            deadline = time.monotonic() + float(text[9:])
            while time.monotonic() < deadline:
                try:
                    time.sleep(max(0.0, deadline - time.monotonic()))
                except Interrupt:
                    pass
        elif text.startswith("started:"):  # started:PATH:SECONDS - say so in a file, then sleep
            _, marker, seconds = text.split(":")
            open(marker, "w").close()
            time.sleep(float(seconds))
        elif text.startswith("wait:"):  # wait:PATH - run until the test creates PATH (a minute at most)
            deadline = time.monotonic() + 60
            while not os.path.exists(text[5:]) and time.monotonic() < deadline:
                time.sleep(0.02)
        elif text.startswith("cpu:"):  # like a long numpy/torch call: the GIL is released,
            _, marker, rounds = text.split(":")  # but no signal handler runs until it returns
            open(marker, "w").close()
            hashlib.pbkdf2_hmac("sha256", b"rw", b"salt", int(rounds))
        elif text.startswith("pad:"):  # pad:N - an answer of N more bytes
            return f"{pid}:{text}".encode() + b"." * int(text[4:])
        elif text == "raise":
            raise ValueError("asked to raise")
        elif text.startswith("raise-once:"):  # raise-once:PATH - fail the first try only
            marker = text.split(":", 1)[1]
            if not os.path.exists(marker):
                open(marker, "w").close()
                raise ValueError("asked to raise once")
        elif text == "crash":
            os._exit(13)
        elif text.startswith("crash-once:"):
            marker = text.split(":", 1)[1]
            if not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(13)
        return f"{pid}:{text}".encode()


class Stubborn(Tester):
    """Runs on past the time limit (no TimeLimit raised), so its late answers may win."""

    soft_time_limit = False


class Frames(Worker):
    """Answers each frame reversed, in reverse order (shows process_multipart)."""

    queues = ("frames",)

    def process_multipart(self, frames: list[bytes]) -> list[bytes]:
        return [f[::-1] for f in reversed(frames)]


class Bytes(Worker):
    """Answers with the payload's bytes reversed, whatever they are (binary jobs)."""

    queues = ("bytes",)

    def process(self, payload: bytes) -> bytes:
        return payload[::-1]


class NotAWorker:
    def process(self, payload: bytes) -> bytes:
        return payload


class Lazy(Worker):
    """Overrides nothing: rejected as a target."""


class BadSetup(Worker):
    """setup() always raises: the pool must give up, not restart it forever."""

    def setup(self) -> None:
        raise RuntimeError("the model file is missing")

    def process(self, payload: bytes) -> bytes:
        return payload


class Features(Tester):
    """Tester plus the per-job features (test_features_e2e.py). Payload commands besides
    Tester's: ``retry:N:AFTER`` (Retry(after=AFTER) until attempt N), ``retry:N`` (Retry without
    a delay: the backoff applies), ``fail`` (Fail), ``raise-once:PATH`` (ValueError the first
    time, when PATH does not exist yet), ``progress:PATH`` (reports 0.25 and 0.5, then waits for
    PATH, then reports 1.0), and the prefix ``log:PATH|REST``: append "id attempt time" to PATH,
    then do REST (nothing: answer at once).
    """

    def process(self, payload: bytes) -> bytes:
        from respworkers import Fail, Retry

        text = payload.decode()
        job = self.job
        assert job is not None
        pid = os.getpid()
        if text.startswith("log:"):
            head, _, text = text.partition("|")
            with open(head[4:], "a") as fh:
                fh.write(f"{job.id} {job.attempt} {time.time():.3f}\n")
            if not text:
                return f"{pid}:{job.id}".encode()
        if text.startswith("retry:"):
            words = text.split(":")
            if job.attempt < int(words[1]):
                raise Retry(f"not yet (attempt {job.attempt})",
                            after=float(words[2]) if len(words) > 2 else None)
            return f"{pid}:attempt {job.attempt}".encode()
        if text == "fail":
            raise Fail("bad payload")
        if text.startswith("raise-once:"):
            marker = text.split(":", 1)[1]
            if not os.path.exists(marker):
                open(marker, "w").close()
                raise ValueError("first time")
            return f"{pid}:second time".encode()
        if text.startswith("progress:"):
            marker = text.split(":", 1)[1]
            self.progress(0.25, "a quarter", step=1)
            time.sleep(0.4)
            self.progress(0.5, "half", step=2)
            deadline = time.monotonic() + 30
            while not os.path.exists(marker) and time.monotonic() < deadline:
                time.sleep(0.02)
            self.progress(1.0, "all", step=3)
            time.sleep(0.4)  # reports leave a few times a second: let the last one go
            return f"{pid}:progressed".encode()
        return super().process(text.encode())


class FeaturesBackoff(Features):
    """Features whose class asks for its own retry delay (sent to the broker in HELLO)."""

    backoff = 0.8
    backoff_max = 0.8


class BadPrefetch(Worker):
    """A class whose ``prefetch`` is out of range: ``rw worker`` names it."""

    prefetch = 0

    def process(self, payload: bytes) -> bytes:
        return payload


class Holder(Tester):
    """A Tester that keeps the jobs it prefetched however long the running one takes."""

    prefetch_patience = 600.0
