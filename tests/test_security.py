"""CURVE roles, key reload, limits: real brokers, workers and clients with real keys."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
import zmq

from respworkers import protocol
from respworkers.client import Client, fetch_status
from respworkers.config import load
from respworkers.errors import BrokerUnavailable
from respworkers.security import ClientKeys, client_keys, keygen

from conftest import Cluster, wait_for

pytestmark = pytest.mark.timeout(90)


class Keys:
    """broker, client, worker and stranger key pairs; allowed folders for clients and workers."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "keys"
        for name in ("broker", "client", "worker", "stranger"):
            keygen(name, self.dir)
        self.clients = root / "allowed-clients"
        self.workers = root / "allowed-workers"
        self.clients.mkdir()
        self.workers.mkdir()
        shutil.copy(self.dir / "client.key", self.clients)
        shutil.copy(self.dir / "worker.key", self.workers)

    def pair(self, name: str) -> ClientKeys:
        keys = client_keys(str(self.dir / f"{name}.key_secret"), str(self.dir / "broker.key"), "t")
        assert keys is not None
        return keys


def secured(cluster: Cluster, extra_broker: str = "") -> Keys:
    keys = Keys(cluster.root)
    conf = cluster.root / "respworkers.toml"
    conf.write_text(
        f'[broker]\nclients = "{cluster.clients}"\nworkers = "{cluster.workers}"\n'
        f'status = "{cluster.status}"\njournal = "{cluster.journal}"\n'
        'secret_key = "keys/broker.key_secret"\n'  # relative to the config file
        'client_keys = "allowed-clients"\nworker_keys = "allowed-workers"\n'
        f"{extra_broker}"
        f'[worker]\nbroker = "{cluster.workers}"\n'
        'secret_key = "keys/worker.key_secret"\nbroker_key = "keys/broker.key"\n'
        f'[client]\nbroker = "{cluster.clients}"\nstatus = "{cluster.status}"\n'
        'secret_key = "keys/client.key_secret"\nbroker_key = "keys/broker.key"\n'
        "request_timeout = 3.0\n"
    )
    return keys


def start_secured_broker(cluster: Cluster, keys: Keys) -> None:
    cluster.rw("broker", name="broker")  # reads ./respworkers.toml
    wait_for(lambda: _status(cluster, keys.pair("client")), 15, what="the secured broker")


def _status(cluster: Cluster, keys: ClientKeys | None) -> dict | None:
    try:
        return fetch_status(cluster.status, 0.5, keys=keys)
    except BrokerUnavailable:
        return None


def test_roles_are_enforced_and_traffic_flows_for_the_right_keys(cluster: Cluster) -> None:
    keys = secured(cluster)
    start_secured_broker(cluster, keys)
    cluster.rw("worker", "jobs_fixtures:Tester", "-n", "1", name="worker")
    good = keys.pair("client")
    wait_for(lambda: len((_status(cluster, good) or {}).get("workers", [])) == 1, 20,
             what="the worker with a worker key to register")

    # the right client key: jobs run, end to end, encrypted
    with Client.from_config(load(cluster.root / "respworkers.toml").client) as c:
        assert c.run("secret").endswith(b":secret")
    r = cluster.run("submit", "-p", "via-cli")
    assert r.returncode == 0 and ":via-cli" in r.stdout

    # a stranger's key is refused, clearly
    with Client(cluster.clients, keys=keys.pair("stranger"), request_timeout=3) as c, \
            pytest.raises(BrokerUnavailable, match="refused this key"):
        c.submit("nope")
    # a worker key cannot submit jobs ...
    with Client(cluster.clients, keys=keys.pair("worker"), request_timeout=3) as c, \
            pytest.raises(BrokerUnavailable, match="refused this key"):
        c.submit("nope")
    # ... nor read the status
    with pytest.raises(BrokerUnavailable, match="refused this key"):
        fetch_status(cluster.status, 2, keys=keys.pair("worker"))
    # no keys at all against a secured broker
    with Client(cluster.clients, request_timeout=3) as c, pytest.raises(BrokerUnavailable):
        c.submit("nope")
    # a client key cannot register as a worker
    bad = cluster.root / "bad-worker.toml"
    bad.write_text(
        f'[worker]\nbroker = "{cluster.workers}"\n'
        'secret_key = "keys/client.key_secret"\nbroker_key = "keys/broker.key"\n'
    )
    imposter = cluster.rw("worker", "jobs_fixtures:Tester", "-c", str(bad), name="imposter")
    wait_for(lambda: "refused this key" in imposter.output(), 15,
             what="the imposter worker to be told its key was refused")
    snap = fetch_status(cluster.status, 3, keys=good)
    assert len(snap["workers"]) == 1
    refused = snap["security"]["refused"]
    assert refused.get("clients", 0) >= 2 and refused.get("workers", 0) >= 1
    assert refused.get("status", 0) >= 1
    assert snap["security"]["allowed_keys"] == {"clients": 1, "workers": 1, "status": 1}


def test_keys_added_and_removed_take_effect_without_restart(cluster: Cluster) -> None:
    keys = secured(cluster)
    start_secured_broker(cluster, keys)
    broker = cluster.procs[0]
    stranger = keys.pair("stranger")
    assert _status(cluster, stranger) is None
    shutil.copy(keys.dir / "stranger.key", keys.clients)  # the folder is watched
    wait_for(lambda: _status(cluster, stranger), 10, what="the added key to be accepted")
    (keys.clients / "stranger.key").unlink()
    wait_for(lambda: _status(cluster, stranger) is None, 10, what="the removed key to be refused")
    # SIGHUP reloads at once as well
    shutil.copy(keys.dir / "stranger.key", keys.clients)
    broker.signal(signal.SIGHUP)
    wait_for(lambda: _status(cluster, stranger), 10, what="the key after SIGHUP")
    assert "allowed keys: clients 2" in broker.output()


def test_non_loopback_binding_without_keys_is_announced(cluster: Cluster) -> None:
    broker = cluster.rw("broker", "--clients", "tcp://*:*", "--workers", cluster.workers,
                        "--status", cluster.status, "--journal", ":memory:", name="broker")
    wait_for(lambda: "WITHOUT AUTHENTICATION" in broker.output(), 10, what="the warning")
    assert "anyone who can reach it can submit jobs" in broker.output()


def test_queue_limit_refuses_with_broker_full(cluster: Cluster) -> None:
    conf = cluster.root / "small.toml"
    conf.write_text("[broker]\nmax_queued = 5\nmax_tries = 4\nmax_timeout = 100\n")
    cluster.broker("-c", str(conf))  # no workers: everything stays queued
    with cluster.client() as c:
        ids = [c.submit(f"q{i}") for i in range(8)]
        outcomes = {r.id: r for r in c.results(ids[5:], timeout=10)}
        assert all(r.status == "refused" and r.reason == "full" for r in outcomes.values())
        assert "broker full" in outcomes[ids[7]].error
        assert c.query(ids[0])["state"] == "queued"  # type: ignore[index]
        with pytest.raises(ValueError, match="max_tries of 4"):
            c.submit("x", tries=5)  # the client knows the broker's limits
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(cluster.clients)
    try:  # a client that does not check is refused by the broker
        raw.send_multipart(protocol.encode_submit("over", "default", protocol.Options(None, 5), [b"x"]))
        assert raw.poll(5000)
        reply = protocol.decode_reply(raw.recv_multipart())
        assert isinstance(reply, protocol.Refused) and "max_tries of 4" in reply.text
    finally:
        raw.close()
    r = cluster.run("submit", "-p", "one-more", "--broker", cluster.clients)
    assert r.returncode == 1 and "refused (full)" in r.stdout
    r = cluster.run("submit", "-p", "x", "--timeout", "500", "--broker", cluster.clients)
    assert r.returncode == 2 and "max_timeout of 100s" in r.stderr
    assert "nothing was submitted" in r.stderr
    assert cluster.snapshot()["totals"]["refused"] >= 5


def test_message_size_limit(cluster: Cluster) -> None:
    conf = cluster.root / "small.toml"
    conf.write_text("[broker]\nmax_message_size = 2048\n")
    cluster.broker("-c", str(conf))
    cluster.pool(n=1)
    with cluster.client() as c:
        with pytest.raises(ValueError, match="max_message_size of 2048"):
            c.submit(b"x" * 4096)  # the client knows the limit from the broker's PONG
        assert c.run(b"y" * 1000).endswith(b"y" * 1000)
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(cluster.clients)
    try:
        # a little over: refused by the broker with a reason
        raw.send_multipart([b"RWC3 SUBMIT big default -", b"z" * 2500])
        assert raw.poll(5000)
        reply = raw.recv_multipart()
        assert reply[0] == b"RWC3 REFUSED big limit" and len(reply) == 2
        assert b"max_message_size of 2048" in reply[1]
        # far over: libzmq drops the connection before Python sees it; the broker lives on
        raw.send_multipart([b"RWC3 SUBMIT huge default -", b"z" * 200_000])
    finally:
        raw.close()
    with cluster.client() as c:
        assert c.run("still-alive", timeout=10).endswith(b":still-alive")
