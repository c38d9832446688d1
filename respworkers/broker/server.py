"""The broker process: three ROUTER sockets, one poll loop, the core's timers.

This is the hot path. Per message it does one receive, one call into the core and
whatever sends the core asks for; no logging, no scans. A loop turn is bounded in
time (each socket is read for at most :data:`TURN_BUDGET` seconds), so heartbeats,
pings and status requests are answered within a fraction of a second under any load.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from math import ceil
from types import FrameType
from typing import Any, Callable

import zmq

from .. import protocol, sockets
from ..config import BrokerConfig
from ..errors import ConfigError, ProtocolError, RespWorkersError
from ..security import ROLE_CLIENTS, ROLE_STATUS, ROLE_WORKERS, BrokerSecurity, is_loopback
from ..util import WakePipe
from .channel import SEND_HWM, ClientChannel, router_sender
from .core import BrokerCore
from .journal import Journal, SqliteJournal, open_journal
from .metrics import Exporter, load_prometheus

log = logging.getLogger(__name__)

#: Messages taken from one socket before looking at the others (fairness between sockets).
READS_PER_SOCKET = 500
#: Seconds one socket may be read in one loop turn before the others and the timers get theirs.
TURN_BUDGET = 0.01
#: Client messages other than PING held while a large journal loads (then read later).
MAX_DEFERRED = 10_000

Handler = Callable[[bytes, list[bytes]], None]


class BindError(RespWorkersError):
    """An endpoint could not be bound (in use, bad interface, no permission)."""


class _Stopped(Exception):
    """SIGTERM or SIGINT while the journal was still loading."""


def _ipc_in_use(path: str) -> bool:
    """Whether a process accepts connections on this Unix socket path."""
    import socket as _socket

    if not os.path.exists(path):
        return False
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
        return True
    except OSError:
        return False  # a leftover file of a broker that is gone: taking it over is right
    finally:
        probe.close()


class BrokerServer:
    """Owns the sockets. Clients and status are bound at once, so that a broker restoring a
    large journal already answers pings ("starting"); workers only once it is restored."""

    def __init__(
        self, cfg: BrokerConfig, journal: Journal | None = None, ctx: zmq.Context[Any] | None = None
    ) -> None:
        self.cfg = cfg
        # Checked before anything is bound: a missing extra is a usage error (exit 2).
        prom = load_prometheus() if cfg.metrics else None
        self.metrics: Exporter | None = None
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.security: BrokerSecurity | None = None
        if cfg.secret_key:
            if not (cfg.client_keys and cfg.worker_keys):
                raise ConfigError("[broker] secret_key needs client_keys and worker_keys folders")
            # The ZAP handler must run before the first handshake, so before binding.
            self.security = BrokerSecurity(self.ctx, cfg.secret_key, {
                ROLE_CLIENTS: cfg.client_keys, ROLE_WORKERS: cfg.worker_keys,
                ROLE_STATUS: cfg.status_keys or cfg.client_keys,
            })
        else:
            self._warn_exposed()
        self._reload = False
        self.state = "starting"
        self.restored = 0
        self.longest_turn = 0.0  #: the longest loop turn so far (seconds without polling)
        self.longest_turn_cpu = 0.0  #: the most CPU time one loop turn took
        self._deferred: list[tuple[bytes, list[bytes]]] = []
        self.clients = self._socket("clients", client=True)
        self.status = self._socket("status")
        self.workers = self._socket("workers")
        self._bind(self.clients, "clients", cfg.clients)
        self._bind(self.status, "status", cfg.status)
        self.endpoints = {
            "clients": self.clients.getsockopt_string(zmq.LAST_ENDPOINT),
            "status": self.status.getsockopt_string(zmq.LAST_ENDPOINT),
            "workers": cfg.workers,
        }
        send_client = router_sender(self.clients)
        if self.security is not None:
            send_client = self.security.guard_sender(ROLE_CLIENTS, send_client)
        self.channel = ClientChannel(send_client)
        self.core = BrokerCore(
            cfg, self.channel.send, sockets.router_sender(self.workers), journal, self.endpoints)
        self._send_status = sockets.router_sender(self.status)
        self._stop = False
        self.wake = WakePipe()
        if prom is not None:
            try:
                self.metrics = Exporter(cfg.metrics, prom)
            except BaseException:
                self.close()
                raise
            self.core.record_metrics(self.metrics.recorder)

    def _warn_exposed(self) -> None:
        for name in (ROLE_CLIENTS, ROLE_WORKERS, ROLE_STATUS):
            endpoint = getattr(self.cfg, name)
            if not is_loopback(endpoint):
                log.warning(
                    "binding the %s endpoint %s WITHOUT AUTHENTICATION: anyone who can "
                    "reach it can %s. Set [broker] secret_key, client_keys and worker_keys "
                    "(README: Security).", name, endpoint,
                    {ROLE_CLIENTS: "submit jobs and read their results",
                     ROLE_WORKERS: "register as a worker and receive job data",
                     ROLE_STATUS: "read the broker's state"}[name],
                )

    def _socket(self, name: str, client: bool = False) -> zmq.Socket[Any]:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 2000)
        # libzmq disconnects a peer that sends a larger frame: garbage never reaches Python.
        # The core refuses jobs whose frames add up to more.
        sock.setsockopt(zmq.MAXMSGSIZE, self.cfg.max_message_size + 1024)
        if self.security is not None:
            self.security.secure(sock, name)
        if client:
            # A client that does not read makes sends to it fail at once, instead of
            # growing the broker's memory: the channel holds a bounded backlog.
            sock.setsockopt(zmq.SNDHWM, SEND_HWM)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # Clients pick their own routing id; a reconnecting client takes its id over.
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        return sock

    def _bind(self, sock: zmq.Socket[Any], name: str, endpoint: str) -> None:
        if endpoint.startswith("ipc://") and _ipc_in_use(endpoint[6:]):
            # libzmq would silently take the path over from the process listening there.
            raise BindError(f"cannot bind the {name} endpoint {endpoint}: another process is "
                            "listening there (is a broker already running?)")
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            raise BindError(f"cannot bind the {name} endpoint {endpoint}: {exc}") from None

    # ----------------------------------------------------------------- start-up
    def restore(self, journal: Journal) -> dict[str, int]:
        """Load the journal while answering pings and status requests, then bind workers.

        The cyclic collector is off meanwhile: the load makes millions of objects that all
        live on, and a growing heap would have it walk them all again and again (a third
        of a large load's time); they are frozen out of its sight after (see _quiet_gc)."""
        gc.disable()
        try:
            counts = self.core.restore(journal.load(), self._serve_while_starting)
        finally:
            gc.enable()
            gc.freeze()
        for rid, frames in self._deferred:  # what clients sent meanwhile, in order
            self.core.on_client(rid, frames)
        self._deferred.clear()
        self._bind(self.workers, "workers", self.cfg.workers)
        self.endpoints["workers"] = self.workers.getsockopt_string(zmq.LAST_ENDPOINT)
        self.state = "running"
        return counts

    def _serve_while_starting(self, rows: int) -> None:
        """Between restore steps: PING gets a PONG saying "starting", status a snapshot;
        everything else a client sends waits (in order) until the journal is loaded."""
        if self._stop:
            raise _Stopped
        self.restored = rows
        self.core.set_time(time.monotonic(), time.time())
        for _ in range(READS_PER_SOCKET):
            if len(self._deferred) >= MAX_DEFERRED:
                break
            try:
                rid, frames = self._recv(self.clients, ROLE_CLIENTS)
            except zmq.Again:
                break
            if rid is None:
                continue
            if frames and frames[0] == protocol.PING_FRAMES[0]:  # PING's extra frames are ignored
                self.channel.send(rid, protocol.encode_pong(
                    self.core.broker_id, {**self.core.limits, "starting": True}))
            else:
                self._deferred.append((rid, frames))
        self._serve_status()
        self.channel.flush()
        if self.metrics is not None and self.core.now >= self.metrics.next_publish:
            self.metrics.publish(self.core, self.state)

    # ----------------------------------------------------------------- signals
    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the loop cleanly; the wakeup fd interrupts a long poll."""
        self.wake.catch_signals()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._reload = True  # re-read the key folders
        else:
            self.stop()

    def stop(self) -> None:
        self._stop = True
        self.wake.wake()

    # ----------------------------------------------------------------- receiving
    def _recv(self, sock: zmq.Socket[Any], domain: str) -> tuple[Any, list[bytes]]:
        """(routing id, frames), or (None, frames) for a peer whose key was revoked."""
        if self.security is None:
            return sockets.router_recv(sock)
        return self.security.recv(sock, domain)

    # ----------------------------------------------------------------- loop
    @staticmethod
    def _quiet_gc() -> None:
        """Keep Python's cyclic garbage collector off the broker's long-lived objects.

        A full collection walks every tracked object: with a million jobs held it stalls
        the loop for about a second, and a growing heap triggers one at every 25% of
        growth. So full collections are off, and objects that have lived through a
        heartbeat are moved out of the collector's sight (gc.freeze, at every tick): it
        only ever scans what is young. The broker breaks its own reference cycles (a job
        and the worker holding it) when a job ends or a worker leaves, so what it drops
        later is freed by reference counting and needs no collector.
        """
        gc.collect()
        gc.freeze()
        # Young collections stay automatic; full ones would scan everything since the last
        # freeze (a burst of jobs), so they happen only as the freeze at each tick.
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, 1 << 30)

    def run(self) -> None:
        core = self.core
        clients, workers, status = self.clients, self.workers, self.status
        poller = zmq.Poller()
        poller.register(clients, zmq.POLLIN)
        poller.register(workers, zmq.POLLIN)
        poller.register(status, zmq.POLLIN)
        wake_fd = self.wake.fileno()
        poller.register(wake_fd, zmq.POLLIN)
        monotonic, wall = time.monotonic, time.time
        again = zmq.Again
        security = self.security
        if security is None:
            recv_clients = recv_workers = sockets.router_recv
        else:
            def recv_clients(sock: zmq.Socket[Any]) -> tuple[Any, list[bytes]]:
                return security.recv(sock, ROLE_CLIENTS)

            def recv_workers(sock: zmq.Socket[Any]) -> tuple[Any, list[bytes]]:
                return security.recv(sock, ROLE_WORKERS)

        def drain(sock: zmq.Socket[Any], handle: Handler,
                  recv: Callable[[zmq.Socket[Any]], tuple[Any, list[bytes]]]) -> None:
            """Up to READS_PER_SOCKET messages or TURN_BUDGET seconds from one socket, then the rest."""
            until = core.turn_ends = monotonic() + TURN_BUDGET
            for _ in range(READS_PER_SOCKET):
                try:
                    rid, frames = recv(sock)
                except again:
                    return
                if rid is not None:
                    handle(rid, frames)
                if monotonic() >= until:
                    return

        def take_clients() -> None:
            """Batches left over from the last turn first; new messages only once they are in."""
            if core.intake_pending():
                core.turn_ends = monotonic() + TURN_BUDGET
                core.resume_intake()
                if core.intake_pending():
                    return
            drain(clients, core.on_client, recv_clients)

        self._quiet_gc()
        core.set_time(monotonic(), wall())
        core.start_recovery()  # restore() may have taken a while: the window starts now
        wake = core.tick()
        log.info(
            "broker %s listening: clients %s, workers %s, status %s",
            core.broker_id, self.endpoints["clients"], self.endpoints["workers"],
            self.endpoints["status"],
        )
        longest = longest_cpu = 0.0
        notifier = core.notifier
        cpu = time.thread_time  # a syscall: read once per turn
        last_cpu = cpu()
        metrics = self.metrics
        if metrics is not None:
            metrics.publish(core, self.state)
        ready = sockets.ready
        busy_sockets = [(clients, sockets.POLLIN), (workers, sockets.POLLIN),
                        (status, sockets.POLLIN)]
        while not self._stop:
            # Under load more messages wait by the end of a turn: asking the sockets is
            # cheaper than a poll of them all and the wake pipe. Poll only when none has any
            # (signals set _stop themselves; the wake pipe is drained at the next poll).
            events: Any = ready(busy_sockets)
            if events:
                events = dict(events)
            else:
                events = dict(poller.poll(ceil(max(0.0, (wake - monotonic()) * 1000.0))))
            began = monotonic()
            core.set_time(began, wall())
            if clients in events or core.intake_pending():
                take_clients()
                core.set_time(monotonic(), wall())
            if workers in events:
                drain(workers, core.on_worker, recv_workers)
                core.set_time(monotonic(), wall())
            if status in events:
                self._serve_status()
            if wake_fd in events:
                self.wake.drain()
            if security is not None:
                if self._reload:  # SIGHUP: at once
                    self._reload = False
                    security.reload()
                if core.now >= wake:
                    security.watch(core.now)
                for wid in security.take_revoked(ROLE_WORKERS):
                    core.revoke_worker(wid)
            if core.now >= wake:
                core.tick()
                gc.freeze()  # see _quiet_gc
            if notifier.outbox:  # batched outcomes ended in this turn
                core.send_results()
            core.maybe_flush()
            if self.channel.pending():
                self.channel.flush()
            if metrics is not None and core.now >= metrics.next_publish:
                metrics.publish(core, self.state)  # O(queues + workers), twice a second
            wake = core.next_wake()
            if metrics is not None and metrics.next_publish < wake:
                wake = metrics.next_publish
            if core.intake_pending():
                wake = core.now  # submissions wait to be taken in: do not sleep
            elif self.channel.pending():
                wake = min(wake, core.now + 0.01)  # a slow client's backlog: look again soon
            busy = monotonic() - began
            if busy > longest:
                longest = self.longest_turn = busy
            # What the turn computed, whatever else the machine did (and the poll before it,
            # which costs next to nothing in CPU however long it waits).
            now_cpu = cpu()
            busy, last_cpu = now_cpu - last_cpu, now_cpu
            if busy > longest_cpu:
                longest_cpu = self.longest_turn_cpu = busy
        self._shutdown()

    def _serve_status(self) -> None:
        for _ in range(READS_PER_SOCKET):
            try:
                rid, body = self._recv(self.status, ROLE_STATUS)
            except zmq.Again:
                return
            if rid is None:
                continue
            try:
                protocol.decode_status_request(body)
            except ProtocolError as exc:
                self.core.count_bad("status", exc)
                self._send_status(rid, protocol.encode_status_invalid(str(exc)))
                continue
            self._send_status(rid, protocol.encode_snapshot(self.snapshot()))

    def _shutdown(self) -> None:
        log.info("broker stopping: flushing the journal")
        self.state = "stopping"
        self.core.accepting = False
        self.core.send_results()
        self.core.flush()
        self.core.send_owed_acks()  # the answers are durable now
        self.channel.flush()
        self.core.journal.close()
        self.close()
        log.info("broker stopped")

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        for sock in (self.clients, self.workers, self.status):
            sock.close()
        if self.security is not None:
            self.security.stop()
        if self._own_ctx:
            self.ctx.term()  # waits (up to each socket's LINGER) for replies still queued
        self.wake.close()

    def snapshot(self) -> dict[str, Any]:
        snap = self.core.snapshot()
        snap["broker"]["state"] = self.state
        if self.state == "starting":
            snap["broker"]["restored"] = self.restored
        snap["clients"] = self.channel.describe()
        snap["broker"]["longest_turn"] = round(self.longest_turn, 4)
        snap["broker"]["longest_turn_cpu"] = round(self.longest_turn_cpu, 4)
        snap["security"] = self.security.describe() if self.security else {"curve": False}
        return snap


def run_broker(cfg: BrokerConfig) -> None:
    """Entry point of ``rw broker``: open the journal, bind, restore, run until SIGTERM/SIGINT."""
    journal = open_journal(cfg.journal, cfg.journal_sync)
    try:
        server = BrokerServer(cfg, journal)
    except BaseException:
        if isinstance(journal, SqliteJournal):
            journal.remove_if_created()  # a broker that could not start leaves nothing behind
        else:
            journal.close()
        raise
    server.install_signal_handlers()
    try:
        counts = server.restore(journal)
    except BaseException as exc:
        server.close()
        journal.close()
        if isinstance(exc, _Stopped):
            log.info("broker stopped while loading its journal")
            return
        raise
    if any(counts.values()):
        log.info(
            "journal %s: %d queued and %d interrupted jobs to run, %d finished kept",
            cfg.journal, counts["queued"], counts["interrupted"], counts["finished"],
        )
    server.run()
