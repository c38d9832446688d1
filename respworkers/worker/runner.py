"""One worker process: a DEALER to the broker, heartbeats, and the user's code.

The main thread talks to the broker and runs each job itself, in line: handing a job
to another thread and back costs two thread switches, which on a busy machine cost a
worker more than a short job does. So that a slow job never silences the worker, a
*watchman* thread takes over the socket while a job runs: every few hundredths of a
second it sends heartbeats when due, reads the broker (and reconnects if it must),
gives the job back on a forced stop and ends a hung job's process. Only the holder of
the *baton* (a lock) touches the socket; the main thread puts it down for exactly the
time it spends in the user's code.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from types import FrameType
from typing import Any, Callable

import zmq

from .. import __version__, protocol
from ..config import WorkerConfig
from ..errors import Cancelled, Fail, Interrupt, Retry, TimeLimit
from ..security import client_keys
from .base import JobContext, Worker
from .base import __file__ as base_file
from .link import HUNG_FACTOR, HUNG_GRACE, BrokerLink

log = logging.getLogger(__name__)

EXIT_HUNG = 75

#: Sent to the job's thread to raise Cancelled or TimeLimit in it (its handler raises).
INTERRUPT_SIGNAL = signal.SIGUSR1
#: Progress reports leave at most this often (seconds); the latest one wins.
PROGRESS_INTERVAL = 0.25
MAX_PROGRESS_MESSAGE = 500

_LIBRARY_FILES = {__file__, base_file}


#: Longest error text sent to the broker; the end of a traceback is what matters.
MAX_ERROR_CHARS = 32_000


def _error_text() -> str:
    """The error text of the exception being handled: a one-line summary (``Type: message``,
    which clients show), then the traceback without the library's own frames on top."""
    etype, value, tb = sys.exc_info()
    while tb is not None and tb.tb_frame.f_code.co_filename in _LIBRARY_FILES:
        tb = tb.tb_next
    summary = "".join(traceback.format_exception_only(etype, value)).strip().splitlines()
    head = (summary[0] if summary else getattr(etype, "__name__", "error"))[:500]
    text = "".join(traceback.format_exception(etype, value, tb))
    if len(text) > MAX_ERROR_CHARS:
        text = "[...]\n" + text[-MAX_ERROR_CHARS:]
    return f"{head}\n{text}"


class Runner:
    """Runs one Worker instance against the broker until told to stop."""

    def __init__(
        self,
        worker_cls: type[Worker],
        cfg: WorkerConfig,
        queues: tuple[str, ...],
        slot: str | None = None,
        parent_pid: int | None = None,
        ctx: zmq.Context[Any] | None = None,
        incarnation: str | None = None,
    ) -> None:
        self.worker_cls = worker_cls
        self.cfg = cfg
        self.parent_pid = parent_pid
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        info = {
            "name": f"{socket.gethostname()}:{os.getpid()}",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "class": f"{worker_cls.__module__}.{worker_cls.__qualname__}",
            "version": __version__,
            "heartbeat": cfg.heartbeat,
            "slot": slot or uuid.uuid4().hex,
            # This process, and (``conn``, set per connection) which of its connections a
            # HELLO came from: the broker ignores one from a connection already left.
            "incarnation": incarnation or uuid.uuid4().hex,
        }
        for key in ("backoff", "backoff_max"):  # the class's retry delays, for the broker
            value = getattr(worker_cls, key, None)
            if value is not None:
                info[key] = float(value)
        self.link = BrokerLink(cfg, queues, info, client_keys(cfg.secret_key, cfg.broker_key,
                                                              "worker"), self.ctx)
        # The watchman's view of the job in hand, kept apart from the link: it times the job
        # (only while the process runs, so a SIGSTOP pause does not count) without the baton.
        self._job_running = threading.Event()  # set while the main thread is in the user's code
        self._job_over = False  # set by the main thread the moment the user's code returns
        self._job_budget = 0.0  # seconds the job may run before it is hung
        self._job_ran = 0.0
        self._ended = threading.Event()  # run() is over: the watchman leaves
        self._result_what = "the result"
        # Interrupting the job (the watchman decides, the job's thread raises): Cancelled
        # when the broker says ABANDON, TimeLimit at the time limit.
        self._job_thread = 0
        self._job: protocol.Dispatch | None = None
        self._signal_ready = False  # INTERRUPT_SIGNAL's handler is installed
        self._interrupt: tuple[type[Interrupt], str] | None = None
        self._interrupted_at = 0.0  # when Cancelled was raised (the grace period runs)
        self._soft_told = False
        # The latest progress report (sequence number, PROGRESS frames) and the last sent.
        self._progress: tuple[int, list[bytes]] | None = None
        self._progress_seq = 0
        self._progress_sent = 0
        self._progress_next = 0.0

    # ------------------------------------------------------------------ signals
    def install_signal_handlers(self) -> None:
        self.link.wake.catch_signals()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)  # counted from the pipe, not here
            # The signal lands in the thread running the job: let interrupted system calls
            # of its C extensions restart instead of failing (a warm stop finishes the job).
            signal.siginterrupt(signum, False)
        signal.signal(INTERRUPT_SIGNAL, self._on_interrupt)
        self._signal_ready = True

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """A Python handler must exist for the C-level one to write the wake-up pipe."""

    def _on_interrupt(self, signum: int, frame: FrameType | None) -> None:
        """Runs in the job's thread, between two bytecodes of the user's code (or as a
        blocking call such as sleep is interrupted)."""
        pending = self._interrupt
        if pending is None or self._job_over:
            return
        self._interrupt = None
        kind, text = pending
        raise kind(text)

    def _raise_in_job(self, kind: type[Interrupt], text: str) -> None:
        """Watchman, baton in hand, job running: make the job's thread raise ``kind``."""
        self._interrupt = (kind, text)
        if self._signal_ready:
            signal.pthread_kill(self._job_thread, INTERRUPT_SIGNAL)
        else:  # not the main thread (an embedded Runner): raised at the next bytecode
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._job_thread),
                                                       ctypes.py_object(kind))

    def _report_progress(self, fraction: float | None, message: str | None,
                         meta: dict[str, Any]) -> None:
        """``Worker.progress``: checked and encoded here, in the job's thread, so a mistake
        raises where it was made; the watchman sends the latest."""
        job = self._job
        if job is None or self._job_over:
            return
        report: dict[str, Any] = {}
        if fraction is not None:
            if (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                    or not 0 <= fraction <= 1):
                raise ValueError(f"progress fraction must be a number from 0 to 1, got {fraction!r}")
            report["fraction"] = round(float(fraction), 4)
        if message is not None:
            report["message"] = str(message)[:MAX_PROGRESS_MESSAGE]
        if meta:
            report["meta"] = meta
        try:
            body = json.dumps(report, allow_nan=False, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"progress meta must be JSON: {exc}") from None
        if len(body) > protocol.MAX_PROGRESS_BYTES:
            raise ValueError(f"a progress report of {len(body)} bytes is over "
                             f"{protocol.MAX_PROGRESS_BYTES}; keep it a summary")
        self._progress_seq += 1
        self._progress = (self._progress_seq, protocol.encode_worker_progress(
            job.job_id, job.attempt, job.token, body))

    def request_stop(self) -> None:
        """Ask for a warm stop from code (tests, embedding); same as one SIGTERM."""
        self.link.wake.wake()

    # ------------------------------------------------------------------ jobs
    def _run_job(self, worker: Worker) -> bool:
        """Run the job just received, in this thread, and answer it. False: leave now."""
        link = self.link
        msg = link.next
        assert msg is not None
        link.next = None
        worker.job = JobContext(msg.job_id, msg.attempt, msg.timeout, msg.queue, msg.priority,
                                msg.tries, msg.created)
        self._job = msg
        self._job_budget = HUNG_FACTOR * msg.timeout + HUNG_GRACE
        self._job_ran = 0.0
        self._soft_told = False
        self._interrupted_at = 0.0
        self._job_over = False
        self._job_running.set()
        then, after, retry = "", None, False
        link.baton.release()  # the watchman may now keep the link alive
        try:
            frames = worker.process_multipart(msg.payload)
            self._job_over = True  # no interrupt from here on
            out = protocol.as_frames(frames, self._result_what)
            ok = True
        except BaseException as exc:
            self._job_over = True
            out, ok = [_error_text().encode()], False
            if isinstance(exc, Retry):
                retry = True
                if exc.after is not None:
                    then, after = "retry", exc.after
            elif isinstance(exc, Fail):
                then = "fail"
        finally:
            self._job_over = True  # before waiting for the baton: the job is not hung
            link.baton.acquire()
            self._job_running.clear()
            worker.job = None
            self._job = None
            self._progress = None
            if self._interrupt is not None:  # raised for the job but not delivered in time
                self._interrupt = None
                if not self._signal_ready:  # it must not surface later, in the library
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(
                        ctypes.c_ulong(self._job_thread), None)
        link.job = None
        ready = link.read_stops() == 0  # a stop asked for during the job: this answer is the last
        size = sum(map(len, out))
        if ok and link.max_message_size and size > link.max_message_size:
            ok, out = False, [
                f"the result of {size} bytes is over the broker's max_message_size "
                f"of {link.max_message_size} bytes".encode()]
        if ok:
            answer = protocol.encode_worker_result(msg.job_id, msg.attempt, msg.token, ready, out)
        else:
            error = out[0].decode("utf-8", "replace")
            if link.abandon is not None:
                then, after = "abandoned", None  # the job is over: not a failure of ours
                log.info("job %s attempt %d stopped (the job was %s)", msg.job_id, msg.attempt,
                         link.abandon.why)
            elif retry:
                log.info("job %s attempt %d asked for a retry: %s", msg.job_id, msg.attempt,
                         error.split("\n", 1)[0])
            else:
                log.warning("job %s attempt %d raised:\n%s", msg.job_id, msg.attempt,
                            error.rstrip())
            answer = protocol.encode_worker_error(msg.job_id, msg.attempt, msg.token, ready, error,
                                                  then, after)
        link.abandon = None
        link.answer((msg.job_id, msg.attempt, msg.token, answer))
        return ready

    # ------------------------------------------------------------------ watchman
    def _watch(self) -> None:
        """While a job runs: beats, the broker's messages, forced stops, hung jobs. Idle, it
        sleeps until the next job starts."""
        step = min(0.05, self.cfg.heartbeat / 4)
        while not self._ended.is_set():
            if not self._job_running.wait(1.0):
                continue
            last = time.monotonic()
            while not self._ended.wait(step) and self._job_running.is_set():
                now = time.monotonic()
                # A longer gap means this process was stopped (SIGSTOP) or starved: the job
                # was not running for most of it, so it counts only a little.
                self._job_ran += min(now - last, 1.0)
                last = now
                if not self.link.baton.acquire(blocking=False):
                    continue
                try:
                    if self._job_running.is_set() and not self._job_over:
                        self._watch_job(now)
                finally:
                    self.link.baton.release()

    def _watch_job(self, now: float) -> None:
        link = self.link
        if link.read_stops() >= 2 and link.job is not None:
            # Forced stop: the job keeps running in the main thread, but it is given back
            # now and this process leaves without waiting for it.
            log.warning("forced stop: giving job %s back to the broker", link.job[0])
            link.send(protocol.encode_return(*link.job))
            link.send(protocol.BYE_FRAMES)
            self._leave(0)
        job = self._job
        if link.abandon is not None and job is not None:
            if not self._interrupted_at:
                self._interrupted_at = now
                self._raise_in_job(Cancelled, f"job {job.job_id} was {link.abandon.why} "
                                   f"while attempt {job.attempt} ran here: stop it")
            elif now - self._interrupted_at > self.cfg.cancel_grace:
                log.error("job %s is over but still running %.0fs after it was told to stop: "
                          "exiting so this worker can be replaced", job.job_id,
                          self.cfg.cancel_grace)
                link.send(protocol.BYE_FRAMES)
                self._leave(EXIT_HUNG)
        elif (not self._soft_told and job is not None and self._job_ran > job.timeout
              and self.worker_cls.soft_time_limit):
            self._soft_told = True
            self._raise_in_job(TimeLimit, f"job {job.job_id} reached its time limit of "
                               f"{job.timeout:g}s (attempt {job.attempt})")
        if link.job is not None and self._job_ran > self._job_budget:
            # The broker gave this job to another worker long ago; the user's code cannot
            # be interrupted, so the process leaves and its pool starts a fresh one.
            log.error("job %s is still running at twice its time limit: "
                      "exiting so this worker can be replaced", link.job[0])
            self._leave(EXIT_HUNG)
        link.read()
        progress = self._progress
        if progress is not None and progress[0] != self._progress_sent and now >= self._progress_next:
            self._progress_sent = progress[0]
            self._progress_next = now + PROGRESS_INTERVAL
            link.send(progress[1])
        if now >= link.next_beat:
            link.beat(now, self.parent_pid)

    def _leave(self, code: int) -> None:
        """End the process from the watchman, after delivering what is queued."""
        self.link.close(2000)
        if self._own_ctx:
            self.ctx.term()  # every socket is closed: waits only for the linger
        logging.shutdown()
        os._exit(code)

    # ------------------------------------------------------------------ main loop
    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        """Serve jobs until stopped; ``on_ready`` is called once ``setup()`` has succeeded."""
        worker = self.worker_cls()
        worker._progress_sink = self._report_progress
        self._job_thread = threading.get_ident()
        worker.setup()
        if on_ready is not None:
            on_ready()
        self._result_what = f"{type(worker).__name__}'s result"
        link = self.link
        link.baton.acquire()
        link.connect()
        link.next_beat = time.monotonic() + self.cfg.heartbeat
        wake = link.wake.fileno()
        watchman = threading.Thread(target=self._watch, name="rw-watchman", daemon=True)
        watchman.start()
        try:
            while True:
                now = time.monotonic()
                events = dict(link.poller.poll(math.ceil(max(0.0, link.next_beat - now) * 1000)))
                now = time.monotonic()
                if wake in events:
                    link.read_stops()
                if link.stops:  # jobs run in line: here none is in hand, so leave now
                    log.info("stopping")
                    self._leave_warmly()
                    return 0
                if link.dealer in events:
                    link.read()
                    if link.next is not None and not self._run_job(worker):
                        self._leave_warmly()
                        return 0
                if now >= link.next_beat:
                    link.beat(now, self.parent_pid)
        finally:
            self._ended.set()
            self._job_running.set()  # wake the watchman so it sees the end
            watchman.join(1.0)
            try:
                worker.teardown()
            except Exception:
                log.exception("teardown failed")
            link.close()
            link.wake.close()
            if self._own_ctx:
                # Deliver what is still queued (the last RESULT, BYE) before the process
                # ends: without term() the I/O thread dies with pending messages, and
                # multiprocessing children leave through os._exit, which never calls it.
                self.ctx.destroy(linger=2000)

    def _leave_warmly(self) -> None:
        """Before BYE, wait (a bounded time) until the broker confirms the last answer, so a
        warm stop really delivers it; reconnect and send it again if the broker went away."""
        link = self.link
        if link.unconfirmed is not None:
            patience = max(5.0, 2 * link.broker_interval * link.broker_liveness)
            give_up = time.monotonic() + patience
            wake = link.wake.fileno()
            while link.unconfirmed is not None and link.stops < 2:
                now = time.monotonic()
                if now >= give_up:
                    log.warning("leaving without the broker's confirmation of job %s's answer "
                                "(after %.0fs); if it was lost the job runs again",
                                link.unconfirmed[0], patience)
                    break
                events = dict(link.poller.poll(
                    math.ceil(max(0.0, min(link.next_beat, give_up) - now) * 1000)))
                if wake in events:
                    link.read_stops()
                if link.dealer in events:
                    link.read()
                if time.monotonic() >= link.next_beat:
                    link.beat(time.monotonic(), self.parent_pid)
        link.send(protocol.BYE_FRAMES)
