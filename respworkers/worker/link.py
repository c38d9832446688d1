"""A worker process's connection to the broker, and everything its two threads share.

The main thread runs jobs; while one runs, the watchman thread keeps the connection
alive. Only the holder of :attr:`BrokerLink.baton` (a lock) may use the socket or change
the fields here; the main thread puts the baton down for exactly the time it spends in
the user's code. The stop counter is fed by a wake-up pipe, which Python's C-level signal
handler writes at once, even while the job sits in one long C call in the main thread.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from typing import Any

import zmq

from .. import protocol, sockets
from ..config import WorkerConfig
from ..errors import ProtocolError
from ..security import ClientKeys, handshake_failure, secure_client, watch_handshakes
from ..util import RateLimitedLog, WakePipe

log = logging.getLogger("respworkers.worker.runner")

#: A job still running at HUNG_FACTOR x its time limit + HUNG_GRACE seconds is hung.
HUNG_FACTOR = 2.0
HUNG_GRACE = 5.0

#: What the wake-up pipe carries for a stop: the number of SIGTERM or SIGINT (written by
#: Python's C-level handler, from any thread, at once) or request_stop()'s b"x".
_STOP_BYTES = (bytes([signal.SIGTERM]), bytes([signal.SIGINT]), b"x")

Answer = tuple[str, int, bytes, list[bytes]]  # job id, attempt, token, the RESULT/ERROR frames


class BrokerLink:
    """The DEALER to the broker, its liveness, and the job in hand (baton-guarded)."""

    def __init__(self, cfg: WorkerConfig, queues: tuple[str, ...], info: dict[str, Any],
                 keys: ClientKeys | None, ctx: zmq.Context[Any]) -> None:
        self.cfg = cfg
        self.queues = queues
        self.info = info
        self.keys = keys
        self.ctx = ctx
        self.baton = threading.Lock()  # whoever holds it may use everything below
        self.wake = WakePipe()
        self.poller = zmq.Poller()
        self.poller.register(self.wake.fileno(), zmq.POLLIN)
        self.dealer: zmq.Socket[Any] | None = None
        self.monitor: zmq.Socket[Any] | None = None
        self.welcomed = False
        self.broker_id: str | None = None
        self.broker_interval = cfg.heartbeat  # the broker's, from WELCOME
        self.broker_liveness = cfg.liveness
        self.max_message_size: int | None = None
        self.last_heard = 0.0
        self.connected_at = 0.0
        self.reconnect_due = False  # told to register again right after registering
        self.next_beat = 0.0
        self.stops = 0  # stop requests so far: 1 warm, 2 forced
        self.draining = False  # the broker said DRAIN: a warm stop, as by one SIGTERM
        self._drain_counted = False  # the DRAIN and a first signal are one warm stop together
        self.job: tuple[str, int, bytes] | None = None  # (id, attempt, token) in hand
        self.next: protocol.Dispatch | None = None  # received, about to run
        self.abandon: protocol.Abandon | None = None  # the job in hand is over: stop it
        # The last answer sent, until the broker confirms it (ACK, or the next JOB): if we
        # must reconnect first it may be lost with the old socket, so it goes again.
        self.unconfirmed: Answer | None = None
        # Prefetch (Worker.prefetch, [worker] prefetch): jobs it may hold at once. ``held``
        # are received and not started, in order; ``pending`` answers wait to leave
        # together in one RESULTS; ``sent_answers`` counts this connection's answers, which
        # JOBS confirms by the count the broker has applied.
        self.prefetch = 1
        self.held: deque[protocol.Dispatch] = deque()
        self.pending: list[Answer] = []
        self.sent_answers = 0
        self.bad_messages = 0
        self.connections = 0
        self._bad_log = RateLimitedLog(log)

    # ------------------------------------------------------------------ connection
    def connect(self) -> None:
        """A new socket (so the broker sees a new routing id) and HELLO with what we hold."""
        if self.dealer is not None:
            self.poller.unregister(self.dealer)
            self.close(0)  # nothing queued in the old socket may reach the broker later
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
        self.connections += 1
        self.info["conn"] = self.connections
        self.sent_answers = 0
        if self.held:  # the broker gives them to others, uncharged, when it drops the old one
            self.held.clear()
        if self.pending:  # unsent answers: the oldest is the one the broker still waits for
            if self.unconfirmed is None:
                self.unconfirmed = self.pending[0]
            self.pending.clear()
        if self.unconfirmed is not None:
            job_id, attempt, token, answer = self.unconfirmed
            self.send(protocol.encode_hello(self.queues, self.info, job_id, attempt, token))
            self.send(answer)
            self.sent_answers = 1
        elif self.job is not None:
            self.send(protocol.encode_hello(self.queues, self.info, *self.job))
        else:
            self.send(protocol.encode_hello(self.queues, self.info))
        self.last_heard = self.connected_at = time.monotonic()
        self.reconnect_due = False
        self.broker_interval = self.cfg.heartbeat
        self.broker_liveness = self.cfg.liveness

    def close(self, linger: int | None = None) -> None:
        if self.dealer is None or self.monitor is None:
            return
        self.dealer.disable_monitor()
        self.monitor.close(0)
        self.dealer.close(linger)

    def send(self, frames: list[bytes]) -> None:
        """Never block: with no usable connection (broker gone, handshake refused) the
        message is dropped. Heartbeats do not matter then, and an answer is kept in
        ``unconfirmed`` and sent again after reconnecting."""
        assert self.dealer is not None
        try:
            sockets.send(self.dealer, frames, sockets.NOBLOCK)
        except zmq.Again:
            pass

    def answer(self, answer: Answer, more: bool = False) -> None:
        """Send an answer; a prefetching worker with ``more`` (another short job to run
        next) keeps it to send with the next ones in one RESULTS."""
        if self.prefetch == 1:
            self.send(answer[3])
            self.unconfirmed = answer
            return
        self.pending.append(answer)
        if not more or len(self.pending) >= max(1, self.prefetch // 2):
            self.flush()

    def flush(self) -> None:
        """Send the answers kept back, oldest first, in one message."""
        pending = self.pending
        if pending:
            self.send(protocol.encode_worker_answers([a[3] for a in pending]))
            self.sent_answers += len(pending)
            self.unconfirmed = pending[-1]
            self.pending = []

    def take_next(self) -> None:
        """Prefetch: the oldest job held is the next to run."""
        if self.next is None and self.job is None and self.held:
            msg = self.held.popleft()
            self.abandon = None
            self.job = (msg.job_id, msg.attempt, msg.token)
            self.next = msg

    def return_held(self) -> None:
        """Give back the jobs held and not started (stopping), newest first, so that the
        broker, putting each first in its queue, keeps their order."""
        while self.held:
            msg = self.held.pop()
            self.send(protocol.encode_return(msg.job_id, msg.attempt, msg.token))

    def _hold(self, msg: protocol.Dispatch) -> None:
        """Prefetch: keep it, after those held already (:meth:`take_next` starts them)."""
        if self.stops or len(self.held) + (self.job is not None) >= self.prefetch:
            self.send(protocol.encode_return(msg.job_id, msg.attempt, msg.token))
        else:
            self.held.append(msg)

    def _drop_held(self, msg: protocol.Abandon) -> bool:
        """ABANDON of a job held and not started: drop it, and say so (ERROR abandoned),
        which frees its place at the broker."""
        for job in self.held:
            if job.job_id == msg.job_id and job.attempt == msg.attempt:
                self.held.remove(job)
                self.send(protocol.encode_worker_error(
                    job.job_id, job.attempt, job.token, not self.stops, f"the job was {msg.why}",
                    "abandoned"))
                self.sent_answers += 1
                return True
        return False

    # ------------------------------------------------------------------ stops
    def read_stops(self, look: bool = False) -> int:
        """Count the stops asked for. After each job only if a wake-up or a signal handler
        said so (no system call per job); ``look``: read the pipe anyway (its poll said it
        is readable, or another thread asks, for which the handler may not have run)."""
        if not (look or self.wake.pending):
            return self.stops
        stops = sum(map(self.wake.drain().count, _STOP_BYTES))
        if stops and self.draining and not self._drain_counted:
            self._drain_counted = True  # drained, then SIGTERM (its pool stopping): still warm
            stops -= 1
        self.stops += stops
        return self.stops

    def _drain(self) -> None:
        """DRAIN (``rw drain``): stop warmly, exactly as on a first SIGTERM: the job in hand
        is finished and answered (ready=0), then BYE. DRAIN and the first signal, in either
        order, make one warm stop (a pool stopping signals its drained children too); one
        more signal forces it. A repeated DRAIN changes nothing. The HELLO of a reconnection
        says ``draining`` so that the broker sends no job meanwhile."""
        if self.draining:
            return
        self.draining = True
        self._drain_counted = self.stops > 0  # a signal came first: it was this warm stop
        self.info["draining"] = True
        self.stops = max(self.stops, 1)
        self.wake.wake(b"d")  # an idle main loop looks at ``stops`` now (b"d" is no stop byte)
        log.info("the broker asked this worker to drain: leaving after the job in hand, if any")

    # ------------------------------------------------------------------ beats
    def beat(self, now: float, parent_pid: int | None) -> None:
        """Heartbeat time (either thread, baton in hand): beat, and reconnect if silent."""
        self.next_beat = now + self.cfg.heartbeat
        if parent_pid is not None and os.getppid() != parent_pid:
            self.stops = max(self.stops, 1)  # orphaned: stop warmly
        self.send(protocol.HEARTBEAT_FRAMES)
        if not self.welcomed and self.monitor is not None:
            why = handshake_failure(self.monitor, self.cfg.broker, self.keys)
            if why:
                log.error("%s; retrying", why)
        if self.reconnect_due:
            log.info("broker asked us to register again: reconnecting to %s", self.cfg.broker)
            self.connect()
            return
        silent = now - self.last_heard
        if silent > self.broker_interval * self.broker_liveness:
            log.warning("no word from the broker for %.1fs: reconnecting to %s",
                        silent, self.cfg.broker)
            self.connect()

    # ------------------------------------------------------------------ reading
    def readable(self) -> bool:
        """Whether a message waits (cheaper than a receive that finds none: no exception)."""
        assert self.dealer is not None
        return sockets.readable(self.dealer)

    def read(self) -> None:
        """Read what the broker sent; a JOB to run lands in :attr:`next` (read no further)."""
        assert self.dealer is not None
        while True:
            try:
                frames = sockets.recv(self.dealer, sockets.NOBLOCK)
            except zmq.Again:
                return
            self.last_heard = now = time.monotonic()
            try:
                msg = protocol.decode_broker(frames)
            except ProtocolError as exc:
                self.bad_messages += 1
                self._bad_log.warning("ignored a bad message from the broker (%d so far): %s",
                                      self.bad_messages, exc, now=now)
                continue
            if isinstance(msg, protocol.Dispatches):
                if msg.answered >= self.sent_answers:
                    self.unconfirmed = None  # the broker has applied every answer sent
                if self.stops:
                    for job in reversed(msg.jobs):  # newest first: they keep their order
                        self.send(protocol.encode_return(job.job_id, job.attempt, job.token))
                    continue
                for job in msg.jobs:
                    self._hold(job)
                continue
            if isinstance(msg, protocol.Dispatch) and self.prefetch > 1:
                self.unconfirmed = None  # a broker without prefetch: JOB follows our answer
                self._hold(msg)
                continue
            if isinstance(msg, protocol.Dispatch):
                if self.job is not None or self.stops or self.next is not None:
                    # Not ready for it (a stop crossed the dispatch): hand it straight back.
                    self.send(protocol.encode_return(msg.job_id, msg.attempt, msg.token))
                    continue
                # The broker sends JOB only after it applied our last answer.
                self.unconfirmed = None
                self.abandon = None
                self.job = (msg.job_id, msg.attempt, msg.token)
                self.next = msg
                return  # run it now; whatever else waits is read on the next turn
            if isinstance(msg, protocol.Abandon):
                if self.job is not None and self.job[:2] == (msg.job_id, msg.attempt):
                    self.abandon = msg
                elif self.held:
                    self._drop_held(msg)
                continue  # for an attempt already answered: nothing to stop
            if isinstance(msg, protocol.DrainOrder):
                self._drain()
                continue
            if isinstance(msg, protocol.Ack):
                u = self.unconfirmed
                if u is not None and u[0] == msg.job_id and u[1] == msg.attempt:
                    self.unconfirmed = None
            elif isinstance(msg, protocol.Welcome):
                if self.broker_id is not None and msg.broker_id != self.broker_id:
                    log.info("registered with a new broker (%s)", msg.broker_id)
                self.broker_id = msg.broker_id
                self.broker_interval = msg.heartbeat
                self.broker_liveness = msg.liveness
                self.max_message_size = msg.max_message_size
                self.welcomed = True
            elif isinstance(msg, protocol.Disconnect):
                if now - self.connected_at < 1.0:
                    # Told again right after registering: do not spin; reconnect at the beat.
                    self.reconnect_due = True
                    continue
                log.info("broker asked us to register again (%s)", msg.reason)
                self.connect()
                return
            # Heartbeat: hearing anything is enough.
