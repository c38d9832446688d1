"""The broker process: three ROUTER sockets, one poll loop, the core's timers.

This is the hot path. Per message it does one ``recv_multipart``, one call into
the core and whatever sends the core asks for; no logging, no scans.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from types import FrameType
from typing import Any, Callable

import zmq

from .. import protocol, sockets
from ..config import BrokerConfig
from ..errors import ConfigError, ProtocolError, RespWorkersError
from ..security import CLIENTS, STATUS, WORKERS, BrokerSecurity, is_loopback
from .core import BrokerCore
from .journal import Journal, open_journal

log = logging.getLogger(__name__)

#: Messages taken from one socket before looking at the others (fairness between sockets).
BATCH = 500



class BindError(RespWorkersError):
    """An endpoint could not be bound (in use, bad interface, no permission)."""


class BrokerServer:
    def __init__(
        self, cfg: BrokerConfig, journal: Journal | None = None, ctx: zmq.Context | None = None
    ) -> None:
        self.cfg = cfg
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self.security: BrokerSecurity | None = None
        if cfg.secret_key:
            if not (cfg.client_keys and cfg.worker_keys):
                raise ConfigError("[broker] secret_key needs client_keys and worker_keys folders")
            # The ZAP handler must run before the first handshake, so before binding.
            self.security = BrokerSecurity(self.ctx, cfg.secret_key, {
                CLIENTS: cfg.client_keys, WORKERS: cfg.worker_keys,
                STATUS: cfg.status_keys or cfg.client_keys,
            })
        else:
            for name in (CLIENTS, WORKERS, STATUS):
                endpoint = getattr(cfg, name)
                if not is_loopback(endpoint):
                    log.warning(
                        "binding the %s endpoint %s WITHOUT AUTHENTICATION: anyone who can "
                        "reach it can %s. Set [broker] secret_key, client_keys and worker_keys "
                        "(README: Security).", name, endpoint,
                        {CLIENTS: "submit jobs and read their results",
                         WORKERS: "register as a worker and receive job data",
                         STATUS: "read the broker's state"}[name],
                    )
        self._reload = False
        self.clients = self._bind("clients", cfg.clients, unlimited_send=True)
        self.workers = self._bind("workers", cfg.workers, unlimited_send=False)
        self.status = self._bind("status", cfg.status, unlimited_send=False)
        endpoints = {
            name: sock.getsockopt_string(zmq.LAST_ENDPOINT)
            for name, sock in (("clients", self.clients), ("workers", self.workers),
                               ("status", self.status))
        }
        self.endpoints = endpoints
        self.core = BrokerCore(
            cfg, sockets.router_sender(self.clients), sockets.router_sender(self.workers),
            journal, endpoints)
        self._stop = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def _bind(self, name: str, endpoint: str, unlimited_send: bool) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 2000)
        # libzmq disconnects a peer that sends a larger frame: garbage never reaches Python.
        # The core refuses jobs whose frames add up to more.
        sock.setsockopt(zmq.MAXMSGSIZE, self.cfg.max_message_size + 1024)
        if self.security is not None:
            self.security.secure(sock, name)
        if unlimited_send:
            # Results must not be dropped because a client reads slowly; the core
            # bounds what it holds, not the socket.
            sock.setsockopt(zmq.SNDHWM, 0)
            # Clients pick their own routing id; a reconnecting client takes its id over.
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise BindError(f"cannot bind the {name} endpoint {endpoint}: {exc}") from None
        return sock

    # ----------------------------------------------------------------- signals
    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the loop cleanly; the wakeup fd interrupts a long poll."""
        signal.set_wakeup_fd(self._wake_w)
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
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # ----------------------------------------------------------------- loop
    def run(self) -> None:
        core = self.core
        clients, workers, status = self.clients, self.workers, self.status
        on_client, on_worker = core.on_client, core.on_worker
        poller = zmq.Poller()
        poller.register(clients, zmq.POLLIN)
        poller.register(workers, zmq.POLLIN)
        poller.register(status, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        monotonic, wall = time.monotonic, time.time
        again = zmq.Again
        recv = sockets.router_recv

        def drain(sock: zmq.Socket, handle: Callable[[bytes, list[bytes]], None]) -> None:
            """Up to BATCH messages from one socket, then the others get their turn."""
            for _ in range(BATCH):
                try:
                    rid, frames = recv(sock)
                except again:
                    return
                handle(rid, frames)
        core.set_time(monotonic(), wall())
        core.start_recovery()  # restore() may have taken a while: the window starts now
        wake = core.tick()
        log.info(
            "broker %s listening: clients %s, workers %s, status %s",
            core.broker_id, self.endpoints["clients"], self.endpoints["workers"],
            self.endpoints["status"],
        )
        while not self._stop:
            now = monotonic()
            events = dict(poller.poll(max(0.0, (wake - now) * 1000.0)))
            core.set_time(monotonic(), wall())
            if clients in events:
                drain(clients, on_client)
            if workers in events:
                drain(workers, on_worker)
            if status in events:
                self._serve_status()
            if self._wake_r in events:
                try:
                    os.read(self._wake_r, 4096)
                except OSError:
                    pass
            if self._reload and self.security is not None:  # SIGHUP: at once
                self._reload = False
                self.security.reload()
            if core.now >= wake:
                core.tick()
                if self.security is not None:
                    self.security.watch(core.now)
            core.send_results()
            core.maybe_flush()
            wake = core.next_wake()
        self._shutdown()

    def _serve_status(self) -> None:
        for _ in range(BATCH):
            try:
                frames = self.status.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            rid, body = frames[0], frames[1:]
            try:
                protocol.decode_status_request(body)
            except ProtocolError as exc:
                self.core.count_bad("status", exc)
                self.status.send_multipart([rid, *protocol.encode_status_invalid(str(exc))])
                continue
            self.status.send_multipart([rid, *protocol.encode_snapshot(self.snapshot())])

    def _shutdown(self) -> None:
        log.info("broker stopping: flushing the journal")
        self.core.accepting = False
        self.core.send_results()
        self.core.flush()
        self.core.journal.close()
        self.close()
        log.info("broker stopped")

    def close(self) -> None:
        for sock in (self.clients, self.workers, self.status):
            sock.close()
        if self.security is not None:
            self.security.stop()
        if self._own_ctx:
            self.ctx.term()  # waits (up to each socket's LINGER) for replies still queued
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def snapshot(self) -> dict[str, Any]:
        snap = self.core.snapshot()
        snap["security"] = self.security.describe() if self.security else {"curve": False}
        return snap


def run_broker(cfg: BrokerConfig) -> None:
    """Entry point of ``rw broker``: open the journal, restore, run until SIGTERM/SIGINT."""
    journal = open_journal(cfg.journal, cfg.journal_sync)
    try:
        server = BrokerServer(cfg, journal)
    except BaseException:
        journal.close()
        raise
    counts = server.core.restore(journal.load())
    if any(counts.values()):
        log.info(
            "journal %s: %d queued and %d interrupted jobs to run, %d finished kept",
            cfg.journal, counts["queued"], counts["interrupted"], counts["finished"],
        )
    server.install_signal_handlers()
    server.run()
