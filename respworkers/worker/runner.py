"""One worker process: a DEALER to the broker, heartbeats, and the user's code in a thread.

The main thread owns every socket: it talks to the broker, sends heartbeats and
handles signals. The job runs in one long-lived executor thread, so a slow job never
silences the heartbeats (the job's time limit is what covers slow jobs). The two
threads exchange plain Python objects through a queue and a deque plus the wake-up
pipe, not through a ZeroMQ socket: then the context holds only main-thread sockets
and can always be terminated safely, even while a forced stop leaves a job running.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import sys
import time
import traceback
import uuid
from collections import deque
from types import FrameType

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


_LIBRARY_FILES = {__file__, base_file}


#: Longest error text sent to the broker; the end of a traceback is what matters.
MAX_ERROR_CHARS = 32_000


def _user_traceback() -> str:
    """The exception's traceback without the library's own frames on top."""
    etype, value, tb = sys.exc_info()
    while tb is not None and tb.tb_frame.f_code.co_filename in _LIBRARY_FILES:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(etype, value, tb))
    return text if len(text) <= MAX_ERROR_CHARS else "[...]\n" + text[-MAX_ERROR_CHARS:]


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
        self.job: tuple[str, int] | None = None  # (id, attempt) in hand
        self.job_deadline = 0.0  # past it the job is hung: this process gives up
        # The last RESULT/ERROR sent, until the broker is heard from again: if we must
        # reconnect first, it may be lost with the old socket, so it is sent again.
        self.unconfirmed: tuple[str, int, list[bytes]] | None = None
        self.signals = 0
        self.broker_id: str | None = None
        self.broker_interval = cfg.heartbeat
        self.broker_liveness = cfg.liveness
        self.last_heard = 0.0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # main -> executor: (job_id, attempt, timeout, frames), or None to end the thread
        self._todo: queue.SimpleQueue[tuple[str, int, float, list[bytes]] | None] = (
            queue.SimpleQueue())
        # executor -> main: (job_id, attempt, ok, result frames or [traceback]); deque
        # append/popleft are atomic, and a byte on the wake-up pipe says to look.
        self._done: deque[tuple[str, int, bool, list[bytes]]] = deque()

    # ------------------------------------------------------------------ signals
    def install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1

    def request_stop(self) -> None:
        """Ask for a warm stop from code (tests, embedding); same as one SIGTERM."""
        self.signals += 1
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
            job_id, attempt, answer = self.unconfirmed
            self._send(protocol.encode_hello(self.queues, self.info, job_id, attempt))
            self._send(answer)
        else:
            job_id, attempt = self.job if self.job else (None, 0)
            self._send(protocol.encode_hello(self.queues, self.info, job_id, attempt))
        self.last_heard = time.monotonic()
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

    # ------------------------------------------------------------------ executor
    def _executor(self, worker: Worker) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            job_id, attempt, timeout, frames = item
            worker.job = JobContext(job_id, attempt, timeout)
            try:
                out = protocol.as_frames(worker.process_multipart(frames),
                                         f"{type(worker).__name__}'s result")
                self._done.append((job_id, attempt, True, out))
            except BaseException:
                self._done.append((job_id, attempt, False, [_user_traceback().encode()]))
            finally:
                worker.job = None
            try:
                os.write(self._wake_w, b"j")
            except OSError:  # pipe full (main will look anyway) or closed at exit
                pass

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        import threading

        worker = self.worker_cls()
        worker.setup()
        thread = threading.Thread(
            target=self._executor, args=(worker,), name="rw-executor", daemon=True
        )
        thread.start()
        self.poller = zmq.Poller()
        self.poller.register(self._wake_r, zmq.POLLIN)
        self._connect()
        stopping = False
        next_beat = time.monotonic() + self.cfg.heartbeat
        try:
            while True:
                now = time.monotonic()
                timeout = max(0.0, next_beat - now)
                events = dict(self.poller.poll(timeout * 1000.0))
                now = time.monotonic()
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:
                        pass
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    self.signals = max(self.signals, 1)  # orphaned: stop warmly
                if self.signals >= 2 and self.job is not None:
                    job_id, attempt = self.job
                    log.warning("forced stop: giving job %s back to the broker", job_id)
                    self._send(protocol.encode_return(job_id, attempt))
                    self._send(protocol.BYE_FRAMES)
                    return 0
                if self.signals and not stopping:
                    stopping = True
                    log.info("stopping: %s", "finishing the job in hand" if self.job else "idle")
                if stopping and self.job is None:
                    self._send(protocol.BYE_FRAMES)
                    return 0
                if self._done:
                    job_id, attempt, ok, rest = self._done.popleft()
                    self.job = None
                    ready = self.signals == 0
                    size = sum(map(len, rest))
                    if ok and self.max_message_size and size > self.max_message_size:
                        ok, rest = False, [
                            f"the result of {size} bytes is over the broker's max_message_size "
                            f"of {self.max_message_size} bytes".encode()]
                    if ok:
                        answer = protocol.encode_worker_result(job_id, attempt, ready, rest)
                    else:
                        error = rest[0].decode("utf-8", "replace")
                        log.warning("job %s attempt %d raised:\n%s", job_id, attempt, error.rstrip())
                        answer = protocol.encode_worker_error(job_id, attempt, ready, error)
                    self._send(answer)
                    self.unconfirmed = (job_id, attempt, answer)
                    if not ready:
                        self._send(protocol.BYE_FRAMES)
                        return 0
                if self.dealer in events:
                    self._drain_broker()
                if now >= next_beat:
                    next_beat = now + self.cfg.heartbeat
                    if self.job is not None and now > self.job_deadline:
                        # The broker gave this job to another worker long ago; a thread
                        # cannot be interrupted, so the process leaves and its pool
                        # starts a fresh one. Otherwise a hung job holds a worker forever.
                        log.error("job %s is still running at twice its time limit: "
                                  "exiting so this worker can be replaced", self.job[0])
                        logging.shutdown()
                        os._exit(EXIT_HUNG)
                    self._send(protocol.HEARTBEAT_FRAMES)
                    if not self.welcomed:
                        assert self.monitor is not None
                        why = handshake_failure(self.monitor, self.cfg.broker, self.keys)
                        if why:
                            log.error("%s; retrying", why)
                    silent = now - self.last_heard
                    if silent > self.broker_interval * self.broker_liveness:
                        log.warning(
                            "no word from the broker for %.1fs: reconnecting to %s",
                            silent, self.cfg.broker,
                        )
                        self._connect()
        finally:
            self._todo.put(None)
            if self.job is None:  # not while a forced stop leaves the job running
                thread.join(5.0)
                try:
                    worker.teardown()
                except Exception:
                    log.exception("teardown failed")
            if self.dealer is not None:
                self._close_dealer()
            if not thread.is_alive():  # else the executor may still write to _wake_w
                os.close(self._wake_r)
                os.close(self._wake_w)
            if self._own_ctx:
                # Deliver what is still queued (the last RESULT, BYE) before the process
                # ends: without term() the I/O thread dies with pending messages, and
                # multiprocessing children leave through os._exit, which never calls it.
                self.ctx.destroy(linger=2000)

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
            if kind is not protocol.Disconnect:
                self.unconfirmed = None  # it is answering us: what we sent before arrived
            if kind is protocol.Job:
                if self.job is not None or self.signals:
                    # Not ready for it (a stop crossed the dispatch): hand it straight back.
                    self._send(protocol.encode_return(msg.job_id, msg.attempt))
                    continue
                self.job = (msg.job_id, msg.attempt)
                self.job_deadline = time.monotonic() + HUNG_FACTOR * msg.timeout + HUNG_GRACE
                self._todo.put((msg.job_id, msg.attempt, msg.timeout, msg.payload))
            elif kind is protocol.Welcome:
                if self.broker_id is not None and msg.broker_id != self.broker_id:
                    log.info("registered with a new broker (%s)", msg.broker_id)
                self.broker_id = msg.broker_id
                self.broker_interval = msg.heartbeat
                self.broker_liveness = msg.liveness
                self.max_message_size = msg.max_message_size
                self.welcomed = True
            elif kind is protocol.Disconnect:
                log.info("broker asked us to register again (%s)", msg.reason)
                self._connect()
                return
            # Heartbeat: hearing anything is enough.
