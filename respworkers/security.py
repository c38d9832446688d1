"""CURVE encryption and ZAP authentication, from pyzmq, with one folder of allowed keys per role.

The broker's three endpoints are three ZAP domains: ``clients``, ``workers`` and
``status``. Each domain allows the public keys found in its own folder, so a client
key cannot register as a worker and a worker key cannot submit jobs or read the
status (unless an operator puts the same key in both folders). Key files are
pyzmq certificates, as written by ``rw keygen`` (``zmq.auth.create_certificates``).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, NamedTuple

import zmq
import zmq.auth
from zmq.utils import z85

from .errors import ConfigError
from .util import RateLimitedLog

log = logging.getLogger(__name__)

#: The three roles (and ZAP domains): one key folder and one endpoint each.
ROLE_CLIENTS, ROLE_WORKERS, ROLE_STATUS = "clients", "workers", "status"

#: How often (seconds) the broker looks at the key folders for added or removed keys.
WATCH_INTERVAL = 1.0


class KeyPair(NamedTuple):
    public: bytes
    secret: bytes


def _read_certificate(path: str, what: str) -> tuple[Path, bytes, bytes | None]:
    p = Path(os.path.expanduser(path))
    if not p.is_file():
        raise ConfigError(f"{what}: no key file at {p} (create one with: rw keygen NAME)")
    try:
        public, secret = zmq.auth.load_certificate(str(p))
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{what}: {p} is not a key file: {exc}") from None
    return p, public, secret


def load_secret(path: str, what: str) -> KeyPair:
    """Read a ``.key_secret`` certificate (public and secret key), naming ``what`` on error."""
    p, public, secret = _read_certificate(path, what)
    if not secret:
        raise ConfigError(f"{what}: {p} holds only a public key; give the .key_secret file")
    return KeyPair(public, secret)


def load_public(path: str, what: str) -> bytes:
    return _read_certificate(path, what)[1]


def keygen(name: str, folder: str | os.PathLike[str] = ".") -> tuple[Path, Path]:
    """Write NAME.key (public, to hand out) and NAME.key_secret (keep private)."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"bad key name {name!r}: use a plain file name such as 'broker'")
    d = Path(folder)
    # Only the last level: a mistyped -d must not silently create a whole tree elsewhere.
    try:
        d.mkdir(exist_ok=True)
    except FileNotFoundError:
        raise ConfigError(f"cannot create {d}: its parent folder {d.parent} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot create {d}: {exc.strerror or exc}") from None
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    for p in (public, secret):
        if p.exists():
            raise ConfigError(f"{p} already exists; remove it or choose another name")
    pub, sec = zmq.auth.create_certificates(str(d), name)
    os.chmod(sec, 0o600)
    return Path(pub), Path(sec)


class ClientKeys(NamedTuple):
    """What a client or worker needs to talk to a secured broker."""

    own: KeyPair
    broker: bytes


def client_keys(secret_key: str, broker_key: str, section: str) -> ClientKeys | None:
    """Keys from a ``[client]`` or ``[worker]`` section, or None when security is off."""
    if not secret_key and not broker_key:
        return None
    if not (secret_key and broker_key):
        raise ConfigError(f"[{section}] needs both secret_key and broker_key to use CURVE")
    return ClientKeys(load_secret(secret_key, f"[{section}] secret_key"),
                      load_public(broker_key, f"[{section}] broker_key"))


def secure_client(sock: zmq.Socket[Any], keys: ClientKeys | None) -> None:
    """Make ``sock`` a CURVE client of the broker (call before connect)."""
    if keys is None:
        return
    sock.curve_publickey = keys.own.public
    sock.curve_secretkey = keys.own.secret
    sock.curve_serverkey = keys.broker


_HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


def watch_handshakes(sock: zmq.Socket[Any]) -> zmq.Socket[Any]:
    """A monitor of ``sock``'s handshakes, for :func:`handshake_events`."""
    return sock.get_monitor_socket(_HANDSHAKE_FAILURES | zmq.EVENT_HANDSHAKE_SUCCEEDED)


def handshake_failure(monitor: zmq.Socket[Any], endpoint: str, keys: ClientKeys | None) -> str | None:
    """Why the broker would not talk to us, if a handshake failed since the last call."""
    return handshake_events(monitor, endpoint, keys)[1]


def handshake_events(
    monitor: zmq.Socket[Any], endpoint: str, keys: ClientKeys | None
) -> tuple[int, str | None]:
    """Handshakes that succeeded since the last call, and why the last failure failed.

    A success after the first one means the connection was re-established: replies
    sent meanwhile may have been dropped by the broker's ROUTER.
    """
    from zmq.utils.monitor import recv_monitor_message

    why = None
    succeeded = 0
    while monitor.poll(0):
        event = recv_monitor_message(monitor)["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            succeeded += 1
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            why = (f"the broker at {endpoint} refused this key (its public key is not in the "
                   "broker's folder of allowed keys for this role)")
        elif why is None:
            why = (f"secure handshake with {endpoint} failed: "
                   + ("check broker_key (is it this broker's public key?)" if keys else
                      "the broker requires CURVE keys; set secret_key and broker_key"))
    return succeeded, why


def is_loopback(endpoint: str) -> bool:
    """ipc:// and inproc:// are local; tcp:// is local only on a loopback host."""
    scheme, _, rest = endpoint.partition("://")
    if scheme != "tcp":
        return True
    host = rest.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: reachable from elsewhere


ZAP_ENDPOINT = "inproc://zeromq.zap.01"  #: where libzmq asks (RFC 27, ZAP)


class ZapHandler:
    """ZeroMQ's authentication protocol (ZAP, RFC 27), answered in a thread of its own.

    libzmq asks, for each CURVE handshake, whether the client key may use that socket's
    domain; the answer names the key as the connection's User-Id, which the broker then
    reads on every message. The allowed keys are replaced whole (one assignment) when the
    folders are reloaded, so the thread never sees a half-made set.
    """

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        self.ctx = ctx
        self.allowed: dict[str, frozenset[bytes]] = {}  # domain -> binary public keys
        self.refused: dict[str, int] = {}
        self._log = RateLimitedLog(log)
        self._stop_endpoint = f"inproc://rw-zap-stop-{id(self)}"
        stop = ctx.socket(zmq.PAIR)
        stop.bind(self._stop_endpoint)
        self._stop = stop
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="rw-zap",
                                        daemon=True)
        self._thread.start()
        ready.wait(5)  # bound before the broker binds: no handshake goes unanswered

    def _serve(self, ready: threading.Event) -> None:
        sock = self.ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(ZAP_ENDPOINT)
        stop = self.ctx.socket(zmq.PAIR)
        stop.setsockopt(zmq.LINGER, 0)
        stop.connect(self._stop_endpoint)
        ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(stop, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if stop in events:
                    return
                if sock in events:
                    sock.send_multipart(self._answer(sock.recv_multipart()))
        finally:
            sock.close()
            stop.close()

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6:
            return [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"bad request", b"", b""]
        version, request_id, domain, _address, _identity, mechanism, *credentials = request
        name = domain.decode("utf-8", "replace")
        key = credentials[0] if mechanism == b"CURVE" and len(credentials) == 1 else b""
        if key and key in self.allowed.get(name, ()):
            return [version, request_id, b"200", b"OK", z85.encode(key), b""]
        self.refused[name] = self.refused.get(name, 0) + 1
        self._log.warning("refused a connection on the %s endpoint: key %s is not in the %s "
                          "folder (%d refused there so far)", name,
                          (z85.encode(key).decode()[:12] + "...") if key else "(none)", name,
                          self.refused[name])
        return [version, request_id, b"400", b"key not allowed", b"", b""]

    def stop(self) -> None:
        self._stop.send(b"stop")
        self._thread.join(5)
        self._stop.close(0)


class BrokerSecurity:
    """The broker's side: its key pair, the authenticator, and the watched key folders."""

    def __init__(self, ctx: zmq.Context[Any], secret_key: str, folders: dict[str, str]) -> None:
        self.keys = load_secret(secret_key, "[broker] secret_key")
        self.folders: dict[str, Path] = {}
        for domain, folder in folders.items():
            p = Path(os.path.expanduser(folder))
            if not p.is_dir():
                raise ConfigError(f"[broker] {domain}_keys: {p} is not a folder of public keys")
            self.folders[domain] = p
        self.auth = ZapHandler(ctx)
        self._stamps: dict[str, tuple[Any, ...]] = {}
        self._next_watch = 0.0
        self.reloads = 0
        # Revocation reaches live connections: each routing id is tied to the key its
        # connection authenticated with (ZAP's User-Id, read from the first frame of its
        # first message); a connection whose key leaves the folder is ignored from then on.
        self._allowed: dict[str, set[str]] = {d: set() for d in self.folders}
        self._peers: dict[str, dict[bytes, str]] = {d: {} for d in self.folders}
        self._blocked: dict[str, set[bytes]] = {d: set() for d in self.folders}
        self._revoked_now: dict[str, list[bytes]] = {d: [] for d in self.folders}
        self.revoked: dict[str, int] = {}  #: connections cut off per domain, since start
        self.ignored: dict[str, int] = {}  #: messages dropped from such connections
        self.reload()

    def _stamp(self, folder: Path) -> tuple[Any, ...]:
        try:
            return tuple(sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(folder)
                                if e.name.endswith(".key")))
        except OSError:
            return ()

    def reload(self) -> None:
        """Read every key folder again (SIGHUP, or a change seen by :meth:`watch`); cut off
        live connections whose key is no longer allowed."""
        keys: dict[str, frozenset[bytes]] = {}
        for domain, folder in self.folders.items():
            self._stamps[domain] = self._stamp(folder)
            try:
                z85_keys = [k if isinstance(k, bytes) else str(k).encode()
                            for k in zmq.auth.load_certificates(str(folder))]
            except (OSError, ValueError) as exc:
                log.error("cannot read the %s key folder %s: %s; keeping its keys as they were",
                          domain, folder, exc)
                keys[domain] = self.auth.allowed.get(domain, frozenset())
                continue
            keys[domain] = frozenset(z85.decode(k) for k in z85_keys if len(k) == 40)
            allowed = {z85.encode(k).decode() for k in keys[domain]}
            self._allowed[domain] = allowed
            blocked = self._blocked[domain]
            for rid, key in self._peers[domain].items():
                if key not in allowed and rid not in blocked:
                    self._block(domain, rid, key)
                elif key in allowed and rid in blocked:
                    blocked.discard(rid)  # the key is back
        self.auth.allowed = keys  # one assignment: the ZAP thread sees old or new, whole
        self.reloads += 1
        counts = {d: len(self._allowed[d]) for d in self.folders}
        log.info("allowed keys: %s", ", ".join(f"{d} {n}" for d, n in counts.items()))

    def _block(self, domain: str, rid: bytes, key: str) -> None:
        self._blocked[domain].add(rid)
        self._revoked_now[domain].append(rid)
        self.revoked[domain] = self.revoked.get(domain, 0) + 1
        log.warning("key %s... was revoked: ignoring its live connection on the %s endpoint",
                    key[:12], domain)

    def recv(self, sock: zmq.Socket[Any], domain: str) -> tuple[bytes | None, list[bytes]]:
        """One message from a CURVE ROUTER: (routing id, frames), or (None, frames) when the
        connection's key has been revoked. Raises zmq.Again when there is none."""
        rid_frame = sock.recv(zmq.NOBLOCK, copy=False)
        frames = []
        while sock.get(zmq.RCVMORE):
            frames.append(sock.recv(zmq.NOBLOCK))
        rid = rid_frame.bytes
        peers = self._peers[domain]
        key = peers.get(rid)
        if key is None:
            try:
                key = str(rid_frame.get("User-Id") or "")
            except zmq.ZMQError:  # no ZAP answer named it (cannot happen with CURVE on)
                key = ""
            if len(peers) >= 100_000:  # bounded; forgotten ids are learnt again from frames
                peers.clear()
            peers[rid] = key
            if key not in self._allowed[domain] and rid not in self._blocked[domain]:
                self._block(domain, rid, key)  # revoked between its handshake and now
        if rid in self._blocked[domain]:
            self.ignored[domain] = self.ignored.get(domain, 0) + 1
            return None, frames
        return rid, frames

    def guard_sender(
        self, domain: str, send: Callable[[bytes, list[bytes]], bool]
    ) -> Callable[[bytes, list[bytes]], bool]:
        """``send``, except that nothing goes to a connection whose key was revoked."""
        blocked = self._blocked[domain]

        def guarded(rid: bytes, frames: list[bytes]) -> bool:
            return True if rid in blocked else send(rid, frames)

        return guarded

    def take_revoked(self, domain: str) -> list[bytes]:
        """Routing ids cut off since the last call (the broker forgets such workers)."""
        out = self._revoked_now[domain]
        if out:
            self._revoked_now[domain] = []
        return out

    def watch(self, now: float) -> None:
        """Reload when a key file was added, removed or changed (checked once a second)."""
        if now < self._next_watch:
            return
        self._next_watch = now + WATCH_INTERVAL
        if any(self._stamp(f) != self._stamps.get(d) for d, f in self.folders.items()):
            self.reload()

    def secure(self, sock: zmq.Socket[Any], domain: str) -> None:
        """Make ``sock`` a CURVE server whose peers must hold a key of ``domain`` (before bind)."""
        sock.zap_domain = domain.encode()
        sock.curve_server = True
        sock.curve_publickey = self.keys.public
        sock.curve_secretkey = self.keys.secret

    def describe(self) -> dict[str, Any]:
        return {
            "curve": True,
            "allowed_keys": {d: len(self.auth.allowed.get(d, ())) for d in self.folders},
            "refused": dict(self.auth.refused),
            "reloads": self.reloads,
            "revoked": dict(self.revoked),
            "ignored": dict(self.ignored),
        }

    def stop(self) -> None:
        self.auth.stop()
