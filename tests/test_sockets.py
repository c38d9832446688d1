"""The pyzmq internals the hot path relies on (respworkers/sockets.py): if a pyzmq release
changes them, this fails first, loudly, instead of the broker failing in the field."""

from __future__ import annotations

import pytest
import zmq

from respworkers import sockets

pytestmark = pytest.mark.timeout(10)


def test_backend_socket_methods_take_int_flags_and_move_whole_messages() -> None:
    assert callable(zmq.backend.Socket.send) and callable(zmq.backend.Socket.recv)
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://sockets-test")
        b.connect("inproc://sockets-test")
        assert not sockets.readable(b) and sockets.ready([(a, sockets.POLLIN), (b, sockets.POLLIN)]) == []
        sockets.send(a, [b"one", b"", b"three"])
        assert b.poll(1000)
        assert sockets.readable(b) and not sockets.readable(a)
        assert sockets.ready([(a, sockets.POLLIN), (b, sockets.POLLIN)]) == [(b, sockets.POLLIN)]
        assert sockets.recv(b, sockets.NOBLOCK) == [b"one", b"", b"three"]
        assert not sockets.readable(b)
        with pytest.raises(zmq.Again):
            sockets.recv(b, sockets.NOBLOCK)
        router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        router.bind("inproc://sockets-router")
        dealer.setsockopt(zmq.ROUTING_ID, b"d1")
        dealer.connect("inproc://sockets-router")
        dealer.send_multipart([b"hi", b"there"])
        assert router.poll(1000)
        assert sockets.router_recv(router) == (b"d1", [b"hi", b"there"])
        sockets.router_sender(router)(b"d1", [b"back"])
        assert dealer.poll(1000) and dealer.recv_multipart() == [b"back"]
        for s in (router, dealer):
            s.close(0)
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def test_a_routing_id_frame_carries_the_key_zap_admitted() -> None:
    """What revocation ties a connection to its key with (Frame.get, public API), as our own
    ZAP handler (respworkers.security.ZapHandler) answers libzmq."""
    from zmq.utils import z85

    from respworkers.security import ZapHandler

    ctx = zmq.Context()
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    zap = ZapHandler(ctx)
    zap.allowed = {"clients": frozenset([z85.decode(client_public)])}
    r, d, stranger = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        r.zap_domain = b"clients"
        r.curve_server = True
        r.curve_publickey, r.curve_secretkey = server_public, server_secret
        port = r.bind_to_random_port("tcp://127.0.0.1")
        for sock, (public, secret) in ((d, (client_public, client_secret)),
                                       (stranger, zmq.curve_keypair())):
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_serverkey = server_public
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://127.0.0.1:{port}")
            sock.send(b"x")
        assert r.poll(5000)
        frame = r.recv(copy=False)
        assert frame.get("User-Id") == client_public.decode()
        assert r.recv() == b"x"
        assert not r.poll(500)  # the stranger's key was refused: its message never arrives
        assert zap.refused == {"clients": 1}
    finally:
        for sock in (r, d, stranger):
            sock.close(0)
        zap.stop()
        ctx.term()
