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
from collections.abc import Sequence
from types import FrameType
from typing import Any, Callable

import zmq

from .. import __version__, protocol
from ..config import WorkerConfig, queue_list
from ..errors import Cancelled, Fail, Interrupt, Retry, TimeLimit
from ..protocol import MAX_PREFETCH
from ..security import client_keys
from .base import JobContext, JobOutcome, Worker
from .base import __file__ as base_file
from .link import HUNG_FACTOR, HUNG_GRACE, BrokerLink

log = logging.getLogger(__name__)

EXIT_HUNG = 75
#: A process that left to be replaced (max_jobs_per_child, max_memory_per_child): its pool
#: starts a fresh one at once, without the back-off it gives a process that died.
EXIT_RECYCLE = 76

#: Sent to the job's thread to raise Cancelled or TimeLimit in it (its handler raises).
INTERRUPT_SIGNAL = signal.SIGUSR1
#: Progress reports leave at most this often (seconds); the latest one wins.
PROGRESS_INTERVAL = 0.25
MAX_PROGRESS_MESSAGE = 500
#: Prefetch: a job shorter than this (seconds) keeps its answer back to leave with the
#: next ones in one RESULTS; after a longer one the answer leaves at once.
SHORT_JOB = 0.005

_LIBRARY_FILES = {__file__, base_file}


def resident_mb() -> float:
    """This process's resident memory now (Linux), else its peak (where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


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


def routes(classes: Sequence[type[Worker]], queues: Sequence[str]) -> dict[str, type[Worker]]:
    """Which class runs the jobs of each queue served. One class serves every queue given
    (``rw worker -q`` may override its own); several serve their own, which must not
    overlap, so that a job's queue names exactly one class."""
    if len(classes) == 1:
        return {q: classes[0] for q in queues}
    out: dict[str, type[Worker]] = {}
    for cls in classes:
        for q in queue_list(cls.queues):
            other = out.get(q)
            if other is not None and other is not cls:
                raise ValueError(f"queue {q!r} is served by both {other.__qualname__} and "
                                 f"{cls.__qualname__}: give each class its own queues")
            out[q] = cls
    return out


def prefetch_of(classes: Sequence[type[Worker]], configured: int = 0) -> int:
    """Jobs this process may hold: ``[worker] prefetch`` / ``--prefetch`` if given, else
    the classes' ``prefetch`` (the smallest, when several serve: prefetch is opt-in)."""
    if configured:
        return configured
    value = min(getattr(cls, "prefetch", 1) for cls in classes)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PREFETCH:
        names = ", ".join(c.__qualname__ for c in classes)
        raise ValueError(f"{names}.prefetch = {value!r}: must be a whole number from 1 to "
                         f"{MAX_PREFETCH}")
    return value


def _per_queue(table: dict[str, type[Worker]], key: str) -> float | dict[str, float] | None:
    """A class setting for HELLO: one number when one class serves every queue, else per queue."""
    values = {q: getattr(cls, key, None) for q, cls in table.items()}
    if len(set(table.values())) == 1:
        value = next(iter(values.values()), None)
        return None if value is None else float(value)
    per = {q: float(v) for q, v in values.items() if v is not None}
    return per or None


class Runner:
    """Runs the Worker classes of one process against the broker until told to stop."""

    def __init__(
        self,
        worker_cls: type[Worker] | Sequence[type[Worker]],
        cfg: WorkerConfig,
        queues: tuple[str, ...],
        slot: str | None = None,
        parent_pid: int | None = None,
        ctx: zmq.Context[Any] | None = None,
        incarnation: str | None = None,
        busy: Any = None,
    ) -> None:
        self.classes = [worker_cls] if isinstance(worker_cls, type) else list(worker_cls)
        self.routes = routes(self.classes, queues)
        self.cfg = cfg
        self.parent_pid = parent_pid
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.name = f"{socket.gethostname()}:{os.getpid()}"  #: as the broker and rw status know it
        info = {
            "name": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "class": ",".join(f"{c.__module__}.{c.__qualname__}" for c in self.classes),
            "version": __version__,
            "heartbeat": cfg.heartbeat,
            "slot": slot or uuid.uuid4().hex,
            # This process, and (``conn``, set per connection) which of its connections a
            # HELLO came from: the broker ignores one from a connection already left.
            "incarnation": incarnation or uuid.uuid4().hex,
        }
        for key in ("backoff", "backoff_max"):  # the classes' retry delays, for the broker
            value = _per_queue(self.routes, key)
            if value is not None:
                info[key] = value
        prefetch = prefetch_of(self.classes, cfg.prefetch)
        if prefetch > 1:
            info["prefetch"] = prefetch
        self.link = BrokerLink(cfg, queues, info, client_keys(cfg.secret_key, cfg.broker_key,
                                                              "worker"), self.ctx)
        self.link.prefetch = prefetch
        # Prefetch: once the running job has run this long, the jobs held behind it are
        # given back (RETURN), so that idle workers take them instead of waiting for it.
        self._patience = min(float(getattr(c, "prefetch_patience", 0.02)) for c in self.classes)
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
        self._soft_limit = True  # the job's class says whether TimeLimit is raised
        self._instances: dict[str, Worker] = {}  # by queue
        self._first: Worker | None = None
        self.jobs_done = 0
        self.exit_code = 0  # EXIT_RECYCLE once this process has done its share
        # Shared with the pool, which scales on it: [seconds in finished jobs, start of the
        # job in hand or 0]; two stores per job, no message.
        self._busy = busy

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
        """A Python handler must exist for the C-level one to write the wake-up pipe (the
        stops are counted from the pipe); it says the pipe is worth reading."""
        self.link.wake.pending = True

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
    def _run_job(self) -> bool:
        """Run the job just received, in this thread, and answer it. False: leave now."""
        link = self.link
        msg = link.next
        assert msg is not None
        link.next = None
        told = link.abandon
        if told is not None:  # a prefetched job cancelled just before it started
            link.job = None
            link.abandon = None
            ready = link.read_stops() == 0
            link.answer((msg.job_id, msg.attempt, msg.token, protocol.encode_worker_error(
                msg.job_id, msg.attempt, msg.token, ready, "ended before it started",
                "abandoned")))
            return ready
        worker = self._instances.get(msg.queue) or self._first
        assert worker is not None
        job = JobContext(msg.job_id, msg.attempt, msg.timeout, msg.queue, msg.priority,
                         msg.tries, msg.created)
        worker.job = job
        self._job = msg
        self._soft_limit = type(worker).soft_time_limit
        self._job_budget = HUNG_FACTOR * msg.timeout + HUNG_GRACE
        self._job_ran = 0.0
        self._soft_told = False
        self._interrupted_at = 0.0
        self._job_over = False
        self._job_running.set()
        then, after, retry = "", None, False
        failure: BaseException | None = None
        link.baton.release()  # the watchman may now keep the link alive
        started = time.monotonic()
        busy = self._busy
        if busy is not None:
            busy[1] = started
        try:
            worker.before_job(job)
            frames = worker.process_multipart(msg.payload)
            self._job_over = True  # no interrupt from here on
            out = protocol.as_frames(frames, self._result_what)
            ok = True
        except BaseException as exc:
            self._job_over = True
            failure = exc
            out, ok = [_error_text().encode()], False
            if isinstance(exc, Retry):
                retry = True
                if exc.after is not None:
                    then, after = "retry", exc.after
            elif isinstance(exc, Fail):
                then = "fail"
        finally:
            self._job_over = True  # the job is not hung; the hooks run on, watched
        try:
            self._hooks(worker, job, failure, time.monotonic() - started)
        finally:
            if busy is not None:
                busy[0] += time.monotonic() - started
                busy[1] = 0.0
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
        # A stop asked for during the job, or time to recycle: this answer is the last.
        ready = link.read_stops() == 0 and not self._recycle_due()
        size = sum(map(len, out))
        if ok and link.max_message_size and size > link.max_message_size:
            ok, out = False, [
                f"the result of {size} bytes is over the broker's max_message_size "
                f"of {link.max_message_size} bytes".encode()]
        if ok:
            answer = protocol.encode_worker_result(msg.job_id, msg.attempt, msg.token, ready, out)
        else:
            error = out[0].decode("utf-8", "replace")
            fields = {"job": msg.job_id, "attempt": msg.attempt, "queue": job.queue,
                      "worker": self.name}
            if link.abandon is not None:
                then, after = "abandoned", None  # the job is over: not a failure of ours
                log.info("job %s attempt %d stopped (the job was %s)", msg.job_id, msg.attempt,
                         link.abandon.why, extra={**fields, "reason": link.abandon.why})
            elif retry:
                log.info("job %s attempt %d asked for a retry: %s", msg.job_id, msg.attempt,
                         error.split("\n", 1)[0], extra={**fields, "reason": "retry"})
            else:
                log.warning("job %s attempt %d raised:\n%s", msg.job_id, msg.attempt,
                            error.rstrip(), extra={**fields, "reason": "error"})
            answer = protocol.encode_worker_error(msg.job_id, msg.attempt, msg.token, ready, error,
                                                  then, after)
        link.abandon = None
        link.answer((msg.job_id, msg.attempt, msg.token, answer),
                    more=ready and bool(link.held) and time.monotonic() - started < SHORT_JOB)
        return ready

    @staticmethod
    def _hooks(worker: Worker, job: JobContext, failure: BaseException | None,
               seconds: float) -> None:
        """``on_failure`` then ``after_job``; what they raise is logged, never the outcome."""
        if failure is None:
            status = "done"
        elif isinstance(failure, Cancelled):
            status = "cancelled"
        elif isinstance(failure, TimeLimit):
            status = "time-limit"
        elif isinstance(failure, Retry):
            status = "retry"
        elif isinstance(failure, Fail):
            status = "fail"
        else:
            status = "error"
        if failure is not None and status != "cancelled":
            try:
                worker.on_failure(job, failure)
            except Exception:
                log.exception("on_failure hook of %s raised", type(worker).__name__)
        try:
            worker.after_job(job, JobOutcome(status, failure, seconds))
        except Exception:
            log.exception("after_job hook of %s raised", type(worker).__name__)

    def _recycle_due(self) -> bool:
        """After a job: has this process done its share (``max_jobs_per_child``) or grown too
        big (``max_memory_per_child``)? Then it leaves warmly and its pool starts a fresh one."""
        self.jobs_done += 1
        cfg = self.cfg
        why = ""
        if cfg.max_jobs_per_child and self.jobs_done >= cfg.max_jobs_per_child:
            why = f"after {self.jobs_done} jobs (max_jobs_per_child)"
        elif cfg.max_memory_per_child:
            rss = resident_mb()
            if rss > cfg.max_memory_per_child:
                why = (f"at {rss:.0f} MB resident, over max_memory_per_child "
                       f"{cfg.max_memory_per_child} MB")
        if why:
            log.info("recycling this worker process %s", why)
            self.exit_code = EXIT_RECYCLE
        return bool(why)

    # ------------------------------------------------------------------ watchman
    def _watch(self) -> None:
        """While a job runs: beats, the broker's messages, forced stops, hung jobs. Idle, it
        sleeps until the next job starts."""
        step = min(0.05, self.cfg.heartbeat / 4)
        while not self._ended.is_set():
            if not self._job_running.wait(1.0):
                continue
            last = time.monotonic()
            # Answers kept back (prefetch) leave soon if the job turns out longer.
            while (not self._ended.wait(SHORT_JOB if self.link.pending or self.link.held else step)
                   and self._job_running.is_set()):
                now = time.monotonic()
                # A longer gap means this process was stopped (SIGSTOP) or starved: the job
                # was not running for most of it, so it counts only a little.
                self._job_ran += min(now - last, 1.0)
                last = now
                if not self.link.baton.acquire(blocking=False):
                    continue
                try:
                    if self._job_running.is_set():
                        self._watch_job(now)
                finally:
                    self.link.baton.release()

    def _watch_job(self, now: float) -> None:
        link = self.link
        if link.pending:
            link.flush()  # answers kept back for a batch leave while a longer job runs
        if link.held and self._job_ran > self._patience:
            link.return_held()  # a long job: let others take what waits behind it
        if link.read_stops(look=True) >= 2 and link.job is not None:
            # Forced stop: the job keeps running in the main thread, but it is given back
            # now and this process leaves without waiting for it.
            log.warning("forced stop: giving job %s back to the broker", link.job[0],
                        extra={"job": link.job[0], "attempt": link.job[1], "worker": self.name})
            link.send(protocol.encode_return(*link.job))
            link.send(protocol.BYE_FRAMES)
            self._leave(0)
        job = self._job if not self._job_over else None  # interrupts: only in process()
        if link.abandon is not None and job is not None:
            if not self._interrupted_at:
                self._interrupted_at = now
                self._raise_in_job(Cancelled, f"job {job.job_id} was {link.abandon.why} "
                                   f"while attempt {job.attempt} ran here: stop it")
            elif now - self._interrupted_at > self.cfg.cancel_grace:
                log.error("job %s is over but still running %.0fs after it was told to stop: "
                          "exiting so this worker can be replaced", job.job_id,
                          self.cfg.cancel_grace,
                          extra={"job": job.job_id, "attempt": job.attempt, "worker": self.name})
                link.send(protocol.BYE_FRAMES)
                self._leave(EXIT_HUNG)
        elif (not self._soft_told and job is not None and self._job_ran > job.timeout
              and self._soft_limit):
            self._soft_told = True
            self._raise_in_job(TimeLimit, f"job {job.job_id} reached its time limit of "
                               f"{job.timeout:g}s (attempt {job.attempt})")
        if link.job is not None and self._job_ran > self._job_budget:
            # The broker gave this job to another worker long ago; the user's code cannot
            # be interrupted, so the process leaves and its pool starts a fresh one.
            log.error("job %s is still running at twice its time limit: "
                      "exiting so this worker can be replaced", link.job[0],
                      extra={"job": link.job[0], "attempt": link.job[1], "worker": self.name})
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
        made = {cls: cls() for cls in self.classes}
        self._instances = {q: made[cls] for q, cls in self.routes.items()}
        self._first = made[self.classes[0]]
        self._job_thread = threading.get_ident()
        for worker in made.values():
            worker._progress_sink = self._report_progress
            worker.setup()
        if on_ready is not None:
            on_ready()
        self._result_what = "the result"
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
                    link.read_stops(look=True)
                if link.stops:  # jobs run in line: here none is in hand, so leave now
                    log.info("stopping")
                    self._leave_warmly()
                    return self.exit_code
                if link.dealer in events:
                    link.read()
                    link.take_next()
                while link.next is not None:  # prefetch: the jobs held run one after another
                    if not self._run_job():
                        self._leave_warmly()
                        return self.exit_code
                    if link.prefetch == 1:
                        break
                    if link.readable():
                        link.read()  # an ABANDON for a job held, more jobs
                    link.take_next()
                    now = time.monotonic()
                    if now >= link.next_beat:
                        link.beat(now, self.parent_pid)
                if now >= link.next_beat:
                    link.beat(now, self.parent_pid)
        finally:
            self._ended.set()
            self._job_running.set()  # wake the watchman so it sees the end
            watchman.join(1.0)
            for worker in made.values():
                try:
                    worker.teardown()
                except Exception:
                    log.exception("teardown of %s failed", type(worker).__name__)
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
        link.flush()
        link.return_held()
        if link.unconfirmed is not None:
            patience = max(5.0, 2 * link.broker_interval * link.broker_liveness)
            give_up = time.monotonic() + patience
            # An idle worker's answer is confirmed with the next message it sends: send one now.
            link.send(protocol.HEARTBEAT_FRAMES)
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
                    link.read_stops(look=True)
                if link.dealer in events:
                    link.read()
                if time.monotonic() >= link.next_beat:
                    link.beat(time.monotonic(), self.parent_pid)
        link.send(protocol.BYE_FRAMES)
