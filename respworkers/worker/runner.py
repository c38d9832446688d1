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

import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from types import FrameType
from typing import Callable

import zmq

from .. import __version__, protocol, sockets
from ..config import WorkerConfig
from ..errors import ProtocolError
from ..security import client_keys, handshake_failure, secure_client, watch_handshakes
from .base import JobContext, Worker
from .base import __file__ as base_file

log = logging.getLogger(__name__)

#: A job still running at HUNG_FACTOR x its time limit + HUNG_GRACE seconds is hung.
HUNG_FACTOR = 2.0
HUNG_GRACE = 5.0
EXIT_HUNG = 75

#: What the wake-up pipe carries for a stop: the number of SIGTERM or SIGINT (written by
#: Python's C-level handler, from any thread, at once) or request_stop()'s b"x".
_STOP_BYTES = (bytes([signal.SIGTERM]), bytes([signal.SIGINT]), b"x")


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
        ctx: zmq.Context | None = None,
    ) -> None:
        self.worker_cls = worker_cls
        self.cfg = cfg
        self.queues = queues
        self.parent_pid = parent_pid
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.info = {
            "name": f"{socket.gethostname()}:{os.getpid()}",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "class": f"{worker_cls.__module__}.{worker_cls.__qualname__}",
            "version": __version__,
            "heartbeat": cfg.heartbeat,
            "slot": slot or uuid.uuid4().hex,
        }
        self.keys = client_keys(cfg.secret_key, cfg.broker_key, "worker")
        self.dealer: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.max_message_size: int | None = None  # the broker's, from WELCOME
        self.bad_messages = 0
        self._bad_logged = 0.0
        self.job: tuple[str, int, bytes] | None = None  # (id, attempt, token) in hand
        self._next: protocol.Dispatch | None = None  # received, about to run
        # Hung-job detection counts the time the job has run, as the watchman sees it, so
        # that a process stopped (SIGSTOP) and continued does not count the pause.
        self.job_budget = 0.0  # seconds the job may run before it is hung
        self.job_ran = 0.0
        self._job_over = False  # set by the main thread the moment the user's code returns
        # The last RESULT/ERROR sent, until the broker confirms it (ACK, or the next JOB):
        # if we must reconnect first it may be lost with the old socket, so it goes again.
        self.unconfirmed: tuple[str, int, bytes, list[bytes]] | None = None
        # Stop requests (SIGTERM, SIGINT, request_stop), counted from the wake-up pipe by
        # whoever holds the baton: Python's C-level handler writes it at once, even while
        # the job sits in one long C call (numpy, torch, hashing) in the main thread, where
        # a Python-level handler would only run after the call returns.
        self.signals = 0
        self.broker_id: str | None = None
        self.broker_interval = cfg.heartbeat
        self.broker_liveness = cfg.liveness
        self.last_heard = 0.0
        self.next_beat = 0.0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._baton = threading.Lock()  # whoever holds it may use the socket and poller
        self._in_job = False  # the main thread is in the user's code (baton put down)
        self._ended = threading.Event()  # run() is over: the watchman leaves

    # ------------------------------------------------------------------ signals
    def install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self._wake_w)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)  # counted from the pipe, not here
            # The signal lands in the thread running the job: let interrupted system calls
            # of its C extensions restart instead of failing (a warm stop finishes the job).
            signal.siginterrupt(signum, False)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """A Python handler must exist for the C-level one to write the wake-up pipe."""

    def _read_wakeups(self) -> None:
        try:
            data = os.read(self._wake_r, 4096)
        except OSError:
            return
        self.signals += sum(map(data.count, _STOP_BYTES))

    def request_stop(self) -> None:
        """Ask for a warm stop from code (tests, embedding); same as one SIGTERM."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # ------------------------------------------------------------------ broker link
    def _connect(self) -> None:
        if self.dealer is not None:
            self.poller.unregister(self.dealer)
            self._close_dealer(0)
        d = self.ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 2000)
        d.setsockopt(zmq.RECONNECT_IVL, 100)
        d.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        secure_client(d, self.keys)
        self.monitor = watch_handshakes(d)
        self.welcomed = False
        d.connect(self.cfg.broker)
        self.dealer = d
        self.poller.register(d, zmq.POLLIN)
        if self.unconfirmed is not None:
            job_id, attempt, token, answer = self.unconfirmed
            self._send(protocol.encode_hello(self.queues, self.info, job_id, attempt, token))
            self._send(answer)
        elif self.job is not None:
            self._send(protocol.encode_hello(self.queues, self.info, *self.job))
        else:
            self._send(protocol.encode_hello(self.queues, self.info))
        self.last_heard = self._connected_at = time.monotonic()
        self._reconnect_due = False
        self.broker_interval = self.cfg.heartbeat
        self.broker_liveness = self.cfg.liveness

    def _close_dealer(self, linger: int | None = None) -> None:
        assert self.dealer is not None and self.monitor is not None
        self.dealer.disable_monitor()
        self.monitor.close(0)
        self.dealer.close(linger)

    def _send(self, frames: list[bytes]) -> None:
        """Never block: with no usable connection (broker gone, handshake refused) the
        message is dropped. Heartbeats do not matter then, and an answer is kept in
        ``unconfirmed`` and sent again after reconnecting."""
        assert self.dealer is not None
        try:
            sockets.send(self.dealer, frames, sockets.NOBLOCK)
        except zmq.Again:
            pass

    # ------------------------------------------------------------------ jobs
    def _run_job(self, worker: Worker) -> bool:
        """Run the job just received, in this thread, and answer it. False: leave now."""
        msg = self._next
        assert msg is not None
        self._next = None
        worker.job = JobContext(msg.job_id, msg.attempt, msg.timeout)
        self._job_over = False
        self._in_job = True
        self._baton.release()  # the watchman may now keep the link alive
        try:
            out = protocol.as_frames(worker.process_multipart(msg.payload), self._result_what)
            ok = True
        except BaseException:
            out, ok = [_error_text().encode()], False
        finally:
            self._job_over = True  # before waiting for the baton: the job is not hung
            self._baton.acquire()
            self._in_job = False
            worker.job = None
        self.job = None
        self._read_wakeups()  # a stop asked for during the job makes this answer the last
        ready = self.signals == 0
        size = sum(map(len, out))
        if ok and self.max_message_size and size > self.max_message_size:
            ok, out = False, [
                f"the result of {size} bytes is over the broker's max_message_size "
                f"of {self.max_message_size} bytes".encode()]
        if ok:
            answer = protocol.encode_worker_result(msg.job_id, msg.attempt, msg.token, ready, out)
        else:
            error = out[0].decode("utf-8", "replace")
            log.warning("job %s attempt %d raised:\n%s", msg.job_id, msg.attempt, error.rstrip())
            answer = protocol.encode_worker_error(msg.job_id, msg.attempt, msg.token, ready, error)
        self._send(answer)
        self.unconfirmed = (msg.job_id, msg.attempt, msg.token, answer)
        return ready

    def _beat(self, now: float) -> None:
        """Heartbeat time (either thread, baton in hand): beat, and reconnect if silent."""
        self.next_beat = now + self.cfg.heartbeat
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            self.signals = max(self.signals, 1)  # orphaned: stop warmly
        self._send(protocol.HEARTBEAT_FRAMES)
        if not self.welcomed:
            assert self.monitor is not None
            why = handshake_failure(self.monitor, self.cfg.broker, self.keys)
            if why:
                log.error("%s; retrying", why)
        if self._reconnect_due:
            log.info("broker asked us to register again: reconnecting to %s", self.cfg.broker)
            self._connect()
            return
        silent = now - self.last_heard
        if silent > self.broker_interval * self.broker_liveness:
            log.warning("no word from the broker for %.1fs: reconnecting to %s",
                        silent, self.cfg.broker)
            self._connect()

    # ------------------------------------------------------------------ watchman
    def _watch(self) -> None:
        """While a job runs: beats, the broker's messages, forced stops, hung jobs."""
        step = min(0.05, self.cfg.heartbeat / 4)
        last = time.monotonic()
        while not self._ended.wait(step):
            now = time.monotonic()
            # A longer gap means this process was stopped (SIGSTOP) or starved: the job
            # was not running for most of it, so it counts only a little.
            gap, last = min(now - last, 1.0), now
            if not self._in_job:
                continue
            self.job_ran += gap
            if not self._baton.acquire(blocking=False):
                continue
            try:
                if self._in_job and not self._job_over and not self._ended.is_set():
                    self._watch_job()
            finally:
                self._baton.release()

    def _watch_job(self) -> None:
        now = time.monotonic()
        self._read_wakeups()
        if self.signals >= 2 and self.job is not None:
            # Forced stop: the job keeps running in the main thread, but it is given back
            # now and this process leaves without waiting for it.
            log.warning("forced stop: giving job %s back to the broker", self.job[0])
            self._send(protocol.encode_return(*self.job))
            self._send(protocol.BYE_FRAMES)
            self._leave(0)
        if self.job is not None and self.job_ran > self.job_budget:
            # The broker gave this job to another worker long ago; the user's code cannot
            # be interrupted, so the process leaves and its pool starts a fresh one.
            log.error("job %s is still running at twice its time limit: "
                      "exiting so this worker can be replaced", self.job[0])
            self._leave(EXIT_HUNG)
        self._drain_broker()
        if now >= self.next_beat:
            self._beat(now)

    def _leave(self, code: int) -> None:
        """End the process from the watchman, after delivering what is queued."""
        if self.dealer is not None:
            self._close_dealer(2000)
        if self._own_ctx:
            self.ctx.term()  # every socket is closed: waits only for the linger
        logging.shutdown()
        os._exit(code)

    # ------------------------------------------------------------------ main loop
    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        """Serve jobs until stopped; ``on_ready`` is called once ``setup()`` has succeeded."""
        worker = self.worker_cls()
        worker.setup()
        if on_ready is not None:
            on_ready()
        self._result_what = f"{type(worker).__name__}'s result"
        self.poller = zmq.Poller()
        self.poller.register(self._wake_r, zmq.POLLIN)
        self._baton.acquire()
        self._connect()
        self.next_beat = time.monotonic() + self.cfg.heartbeat
        watchman = threading.Thread(target=self._watch, name="rw-watchman", daemon=True)
        watchman.start()
        try:
            while True:
                now = time.monotonic()
                events = dict(self.poller.poll(max(0.0, self.next_beat - now) * 1000.0))
                now = time.monotonic()
                if self._wake_r in events:
                    self._read_wakeups()
                if self.signals:  # jobs run in line: here none is in hand, so leave now
                    log.info("stopping")
                    self._leave_warmly()
                    return 0
                if self.dealer in events:
                    self._drain_broker()
                    if self._next is not None and not self._run_job(worker):
                        self._leave_warmly()
                        return 0
                if now >= self.next_beat:
                    self._beat(now)
        finally:
            self._ended.set()
            watchman.join(1.0)
            try:
                worker.teardown()
            except Exception:
                log.exception("teardown failed")
            if self.dealer is not None:
                self._close_dealer()
            os.close(self._wake_r)
            os.close(self._wake_w)
            if self._own_ctx:
                # Deliver what is still queued (the last RESULT, BYE) before the process
                # ends: without term() the I/O thread dies with pending messages, and
                # multiprocessing children leave through os._exit, which never calls it.
                self.ctx.destroy(linger=2000)

    def _leave_warmly(self) -> None:
        """Before BYE, wait (a bounded time) until the broker confirms the last answer, so a
        warm stop really delivers it; reconnect and send it again if the broker went away."""
        if self.unconfirmed is not None:
            patience = max(5.0, 2 * self.broker_interval * self.broker_liveness)
            give_up = time.monotonic() + patience
            while self.unconfirmed is not None and self.signals < 2:
                now = time.monotonic()
                if now >= give_up:
                    log.warning("leaving without the broker's confirmation of job %s's answer "
                                "(after %.0fs); if it was lost the job runs again",
                                self.unconfirmed[0], patience)
                    break
                events = dict(self.poller.poll(max(0.0, min(self.next_beat, give_up) - now) * 1000))
                if self._wake_r in events:
                    self._read_wakeups()
                if self.dealer in events:
                    self._drain_broker()
                if time.monotonic() >= self.next_beat:
                    self._beat(time.monotonic())
        self._send(protocol.BYE_FRAMES)

    def _drain_broker(self) -> None:
        assert self.dealer is not None
        while True:
            try:
                frames = sockets.recv(self.dealer, sockets.NOBLOCK)
            except zmq.Again:
                return
            self.last_heard = time.monotonic()
            try:
                msg = protocol.decode_broker(frames)
            except ProtocolError as exc:
                self.bad_messages += 1
                if self.last_heard - self._bad_logged >= 1.0:  # at most one line a second
                    self._bad_logged = self.last_heard
                    log.warning("ignored a bad message from the broker (%d so far): %s",
                                self.bad_messages, exc)
                continue
            kind = type(msg)
            if kind is protocol.Dispatch:
                if self.job is not None or self.signals or self._next is not None:
                    # Not ready for it (a stop crossed the dispatch): hand it straight back.
                    self._send(protocol.encode_return(msg.job_id, msg.attempt, msg.token))
                    continue
                # The broker sends JOB only after it applied our last answer.
                self.unconfirmed = None
                self.job = (msg.job_id, msg.attempt, msg.token)
                self.job_budget = HUNG_FACTOR * msg.timeout + HUNG_GRACE
                self.job_ran = 0.0
                self._next = msg
                return  # run it now; whatever else waits is read on the next turn
            elif kind is protocol.Ack:
                u = self.unconfirmed
                if u is not None and u[0] == msg.job_id and u[1] == msg.attempt:
                    self.unconfirmed = None
            elif kind is protocol.Welcome:
                if self.broker_id is not None and msg.broker_id != self.broker_id:
                    log.info("registered with a new broker (%s)", msg.broker_id)
                self.broker_id = msg.broker_id
                self.broker_interval = msg.heartbeat
                self.broker_liveness = msg.liveness
                self.max_message_size = msg.max_message_size
                self.welcomed = True
            elif kind is protocol.Disconnect:
                if time.monotonic() - self._connected_at < 1.0:
                    # Told again right after registering: do not spin; reconnect at the beat.
                    self._reconnect_due = True
                    continue
                log.info("broker asked us to register again (%s)", msg.reason)
                self._connect()
                return
            # Heartbeat: hearing anything is enough.
