"""Many workers on many hosts from one process: raw DEALERs speaking RWW3 HELLO.

``python -m fake_workers ENDPOINT COUNT HOSTS``: each DEALER says it runs on one of
HOSTS fake hosts (``vm-NN``); it heartbeats, holds every job it gets (busy) unless the
payload starts with ``fail``, which it answers with an error. Prints ``ready`` once all
have registered (WELCOME), then runs until killed.
"""

from __future__ import annotations

import sys
import time

import zmq

from respworkers import protocol


def main(endpoint: str, count: int, hosts: int) -> None:
    ctx = zmq.Context()
    poller = zmq.Poller()
    socks = []
    for i in range(count):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        host = f"vm-{i % hosts:02d}.rack-{i % hosts // 4}.example.internal"
        info = {"name": f"{host}:{10000 + i}", "host": host, "pid": 10000 + i,
                "heartbeat": 1.0, "slot": f"slot-{i}", "incarnation": f"inc-{i}"}
        sock.send_multipart(protocol.encode_hello(["default", "reports"] if i % 3 else ["default"],
                                                  info))
        poller.register(sock, zmq.POLLIN)
        socks.append(sock)
    welcomed: set[int] = set()
    next_beat = time.monotonic() + 0.3
    while True:
        for sock, _ in poller.poll(100):
            msg = protocol.decode_broker(sock.recv_multipart())
            if isinstance(msg, protocol.Welcome):
                welcomed.add(id(sock))
                if len(welcomed) == count:
                    print("ready", flush=True)
            elif isinstance(msg, protocol.Dispatch) and msg.payload[0].startswith(b"fail"):
                sock.send_multipart(protocol.encode_worker_error(
                    msg.job_id, msg.attempt, msg.token, True,
                    f"ValueError: {msg.payload[0].decode()} went wrong " + "x" * 150))
        if time.monotonic() >= next_beat:
            next_beat = time.monotonic() + 0.3
            for sock in socks:
                sock.send_multipart(protocol.HEARTBEAT_FRAMES)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
