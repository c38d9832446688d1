"""A delaying, "lossy" TCP relay: latency and loss where the kernel has no netem.

    python relay.py --settings S.json --stats STATS.json LISTEN=TARGET [LISTEN=TARGET ...]

LISTEN and TARGET are HOST:PORT. Every accepted connection gets its own connection to
TARGET; each chunk read from one side is written to the other ``delay`` seconds after it
was read, in order (a chunk never overtakes an earlier one of the same direction).

Loss, honestly: a relay between two TCP connections cannot drop a packet, because each
side's kernel acknowledges and would retransmit it; what a lost segment costs a TCP
stream is the time until it is retransmitted. So with probability ``loss`` a chunk is
held ``penalty`` seconds longer (default 0.2 s, Linux's minimum RTO, which is what a lone
lost segment of a request/response exchange waits for), and everything behind it on
that connection waits too (head-of-line blocking, as on a real TCP connection). The
bytes always arrive. ``tc netem`` (used by the tests where it exists) drops real packets.

The settings file (JSON ``{"delay": s, "loss": p, "penalty": s, "commands": [...]}``) is
read again when it changes, so one relay serves a run without and one with latency.
Commands (each applied once, by its ``id``) hold back traffic of particular connections,
as TCP does with the segments of a connection whose packets are lost for a while (they
arrive late, in order, even after the sender closed its socket):

* ``{"id": ..., "do": "deafen", "route": PORT, "seconds": s}``: what the broker sends on
  the route's connections open now is held until ``s`` seconds from now;
* ``{"id": ..., "do": "hold_next", "route": PORT, "seconds": s}``: on the next new
  connection of the route, what the connecting side sends from its first ZeroMQ message on
  (after the ZMTP greeting and the security handshake's commands: :class:`ZmtpScanner`) is
  held ``s`` seconds. The stats file gets, per
listening port and in all, ``{"chunks": n, "bytes": n, "penalised": n, "connections": n}``
about every 0.2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import sys
from typing import Any


class ZmtpScanner:
    """Finds where the first message starts in what a ZMTP 3 peer sends: after the 64-byte
    greeting come frames (flags byte, 1- or 8-byte size, body); the handshake's are commands
    (flags bit 0x04) and, with CURVE, so are the messages: MESSAGE commands (RFC 26)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.offset = 0  # stream offset of buf[0]
        self.greeted = False
        self.found: int | None = None  # stream offset of the first message frame

    def feed(self, data: bytes) -> int | None:
        """Stream offset of the first message frame, once it is known."""
        if self.found is not None:
            return self.found
        self.buf += data
        while True:
            if not self.greeted:
                if len(self.buf) < 64:
                    return None
                self._skip(64)
                self.greeted = True
            if len(self.buf) < 2:
                return None
            flags = self.buf[0]
            head = 9 if flags & 0x02 else 2
            if len(self.buf) < head:
                return None
            size = int.from_bytes(self.buf[1:head], "big")
            if not flags & 0x04:
                self.found = self.offset  # a plain message frame (NULL security)
                return self.found
            if len(self.buf) < head + 8:
                return None
            if bytes(self.buf[head:head + 8]) == b"\x07MESSAGE":
                self.found = self.offset
                return self.found
            if len(self.buf) < head + size:
                return None
            self._skip(head + size)

    def _skip(self, n: int) -> None:
        del self.buf[:n]
        self.offset += n


class Conn:
    """One relayed connection: its route and what is held back on it."""

    def __init__(self, route: str) -> None:
        self.route = route
        self.deaf_until = 0.0  # loop time: downstream chunks are held until then
        self.scanner: ZmtpScanner | None = None  # upstream: from the first message on ...
        self.hold_for = 0.0  # ... everything is held this long
        self.up_bytes = 0


class Relay:
    def __init__(self, settings_path: str, stats_path: str | None, seed: int,
                 log_chunks: bool = False) -> None:
        self.log_chunks = log_chunks
        self.settings_path = settings_path
        self.stats_path = stats_path
        self.settings: dict[str, float] = {"delay": 0.0, "loss": 0.0, "penalty": 0.2}
        self._mtime = 0.0
        self.rng = random.Random(seed)
        self.stats: dict[str, dict[str, int]] = {}
        self.conns: set[Conn] = set()
        self.applied: list[str] = []
        self.holds: dict[str, list[tuple[int, float]]] = {}
        self.reload()

    def counters(self, route: str) -> dict[str, int]:
        c = self.stats.get(route)
        if c is None:
            c = self.stats[route] = {"chunks": 0, "bytes": 0, "penalised": 0, "connections": 0}
        return c

    def reload(self) -> None:
        try:
            mtime = os.stat(self.settings_path).st_mtime
        except OSError:
            return
        if mtime == self._mtime:
            return
        try:
            with open(self.settings_path) as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return  # being written: next time
        self._mtime = mtime
        self.settings.update({k: float(v) for k, v in data.items() if k in self.settings})
        for cmd in data.get("commands", []):
            if cmd["id"] in self.applied:
                continue
            self.applied.append(cmd["id"])
            route = str(cmd["route"])
            if cmd["do"] == "deafen":
                until = asyncio.get_event_loop().time() + float(cmd["seconds"])
                for conn in self.conns:
                    if conn.route == route:
                        conn.deaf_until = until
            elif cmd["do"] == "hold_next":
                self.holds.setdefault(route, []).append(float(cmd["seconds"]))

    async def housekeeping(self) -> None:
        while True:
            self.reload()
            if self.stats_path:
                tmp = self.stats_path + ".tmp"
                total = {k: sum(c[k] for c in self.stats.values())
                         for k in ("chunks", "bytes", "penalised", "connections")}
                with open(tmp, "w") as fh:
                    json.dump({**total, "routes": self.stats, "settings": self.settings,
                               "applied": self.applied}, fh)
                os.replace(tmp, self.stats_path)
            await asyncio.sleep(0.2)

    def due(self, now: float, last: float, stats: dict[str, int]) -> float:
        s = self.settings
        at = now + s["delay"]
        if s["loss"] > 0 and self.rng.random() < s["loss"]:
            at += s["penalty"]
            stats["penalised"] += 1
        return max(at, last)  # in order: never before the chunk ahead of it

    async def pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                   stats: dict[str, int], conn: Conn, upstream: bool) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                at, data = await queue.get()
                wait = at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    return
                dst.write(data)
                await dst.drain()

        sender = asyncio.ensure_future(deliver())
        last = 0.0
        try:
            while not sender.done():
                data = await src.read(65536)
                if not data:
                    queue.put_nowait((max(loop.time() + self.settings["delay"], last), data))
                    break
                now = loop.time()
                last = self.due(now, last, stats)
                parts = [(last, data)]
                if upstream and conn.scanner is not None:
                    start = conn.scanner.feed(data)
                    if start is not None:  # from there on, held
                        cut = max(0, start - conn.up_bytes)
                        held = max(last, now + conn.hold_for)
                        parts = [(last, data[:cut]), (held, data[cut:])]
                        last = held
                elif not upstream and conn.deaf_until > now:
                    last = max(last, conn.deaf_until)
                    parts = [(last, data)]
                if upstream:
                    conn.up_bytes += len(data)
                for at, part in parts:
                    if part:
                        queue.put_nowait((at, part))
                        if self.log_chunks:
                            print(f"{conn.route} {id(conn) % 10000} {'up' if upstream else 'down'}"
                                  f" {len(part)}B +{at - now:.3f}s", flush=True)
                stats["chunks"] += 1
                stats["bytes"] += len(data)
            await sender
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sender.cancel()
            dst.close()

    async def serve(self, route: str, target: tuple[str, int], reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        stats = self.counters(route)
        stats["connections"] += 1
        conn = Conn(route)
        holds = self.holds.get(route)
        if holds:
            conn.scanner = ZmtpScanner()
            conn.hold_for = holds.pop(0)
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            writer.close()
            return
        for w in (writer, up_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # When either direction ends (EOF, reset), both connections are closed.
        self.conns.add(conn)
        try:
            await asyncio.gather(self.pump(reader, up_writer, stats, conn, True),
                                 self.pump(up_reader, writer, stats, conn, False),
                                 return_exceptions=True)
        finally:
            self.conns.discard(conn)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def amain(args: argparse.Namespace) -> None:
    relay = Relay(args.settings, args.stats, args.seed, args.log_chunks)
    servers: list[Any] = []
    for spec in args.routes:
        listen, _, target = spec.partition("=")
        lhost, lport = _hostport(listen)
        dest = _hostport(target)
        relay.counters(str(lport))
        servers.append(await asyncio.start_server(
            lambda r, w, route=str(lport), dest=dest: relay.serve(route, dest, r, w),
            lhost, lport, reuse_address=True))
    print(f"relay listening: {' '.join(args.routes)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    house = asyncio.ensure_future(relay.housekeeping())
    await stop.wait()
    house.cancel()
    for s in servers:
        s.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", required=True)
    parser.add_argument("--stats")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--log-chunks", action="store_true", help="print every chunk relayed")
    parser.add_argument("routes", nargs="+", metavar="LISTEN=TARGET")
    asyncio.run(amain(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
