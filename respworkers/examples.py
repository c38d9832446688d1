"""Worker classes shipped for the demo and for trying things out.

``rw worker respworkers.examples:Demo -n 4`` runs them. The payload is text:

- ``sleep:SECONDS`` sleeps that long, then answers;
- ``fail`` raises an exception (the job is retried, then fails);
- ``crash`` kills the worker process (a poison job);
- anything else is answered reversed and upper-cased, after a short pause.
"""

from __future__ import annotations

import os
import time

from .worker.base import Worker


class Echo(Worker):
    """Answers with the payload unchanged (the cheapest possible job, for benchmarks)."""

    def process(self, payload: bytes) -> bytes:
        return payload


class EchoFrames(Worker):
    """Answers with the frames unchanged: shows ``process_multipart``."""

    def process_multipart(self, frames: list[bytes]) -> list[bytes]:
        return frames


class Demo(Worker):
    """A worker with a little of everything, for the demo and manual tests."""

    pause = 0.05

    def process(self, payload: bytes) -> bytes:
        text = payload.decode("utf-8", "replace")
        if text.startswith("sleep:"):
            seconds = float(text.split(":", 1)[1])
            time.sleep(seconds)
            return f"slept {seconds:g}s in pid {os.getpid()}".encode()
        if text == "fail":
            raise ValueError("this job always fails (payload 'fail')")
        if text == "crash":
            os._exit(70)
        time.sleep(self.pause)
        return f"{text[::-1].upper()} (pid {os.getpid()})".encode()
