"""Every bad argument to a client method raises InvalidArgument (a ValueError) naming the
argument, before anything is sent: the blocking, thread-safe and asyncio clients alike."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Callable

import pytest

from respworkers import Client, InvalidArgument, InvalidType, ThreadSafeClient, aio
from respworkers.cli import exit_code
from respworkers.errors import RespWorkersError

from conftest import Cluster

pytestmark = pytest.mark.timeout(60)

#: (what the call is, the call on a client, the argument it must name)
BAD: list[tuple[str, Callable[[Any], Any], str]] = [
    ("queue with a space", lambda c: c.submit(b"x", queue="bad queue"), "queue"),
    ("queue not a str", lambda c: c.submit(b"x", queue=5), "queue"),
    ("timeout below 0", lambda c: c.submit(b"x", timeout=-1), "timeout"),
    ("timeout over max_timeout", lambda c: c.submit(b"x", timeout=500), "timeout"),
    ("tries 0", lambda c: c.submit(b"x", tries=0), "tries"),
    ("tries over max_tries", lambda c: c.submit(b"x", tries=5), "tries"),
    ("priority 10", lambda c: c.submit(b"x", priority=10), "priority"),
    ("delay and eta", lambda c: c.submit(b"x", delay=1, eta=time.time() + 5), "eta"),
    ("expires below 0", lambda c: c.submit(b"x", expires=-1), "expires"),
    ("tenant with a space", lambda c: c.submit(b"x", tenant="a b"), "tenant"),
    ("backoff as text", lambda c: c.submit(b"x", backoff="soon"), "backoff"),
    ("backoff_max below 0", lambda c: c.submit(b"x", backoff_max=-1), "backoff_max"),
    ("id with a space", lambda c: c.submit(b"x", id="has space"), "id"),
    ("id empty", lambda c: c.submit(b"x", id=""), "id"),
    ("id not a str", lambda c: c.submit(b"x", id=42), "id"),
    ("payload not bytes", lambda c: c.submit(42), "payload"),
    ("payload over max_message_size", lambda c: c.submit(b"x" * 5000), "payload"),
    ("an unknown field", lambda c: c.submit_many([b"ok", {"payload": b"x", "colour": 1}]), "colour"),
    ("a job without payload", lambda c: c.submit_many([{"id": "no-payload"}]), "payload"),
    ("a job's bad queue", lambda c: c.submit_many([{"payload": b"x", "queue": ""}]), "queue"),
    ("a job's bad timeout", lambda c: c.submit_many([b"ok", {"payload": b"x", "timeout": 0}]),
     "timeout"),
    ("jobs as one str", lambda c: c.submit_many("abc"), "jobs"),
    ("run with an unknown option", lambda c: c.run(b"x", colour=1), "colour"),
    ("map with one id for all", lambda c: c.map([b"x", b"y"], id="same"), "id"),
    ("map of one str", lambda c: c.map("abc"), "payloads"),
    ("result of a bad id", lambda c: c.result("bad id"), "job_id"),
    ("result of None", lambda c: c.result(None), "job_id"),
    ("result with a negative timeout", lambda c: c.result("fine", timeout=-1), "timeout"),
    ("outcome with a text timeout", lambda c: c.outcome("fine", timeout="soon"), "timeout"),
    ("query of an empty id", lambda c: c.query(""), "job_id"),
    ("cancel of a bad id", lambda c: c.cancel("a b"), "job_id"),
    ("attach of a bad id", lambda c: c.attach("a\nb"), "job_id"),
    ("results of one str", lambda c: c.results("abc"), "job_ids"),
    ("results with a bad id", lambda c: c.results(["fine", "a b"]), "job_ids"),
    ("results with a bad timeout", lambda c: c.results(["fine"], timeout=float("nan")), "timeout"),
    ("watch of a bad id", lambda c: c.watch("a b"), "job_id"),
    ("wait_confirmed with a bad id", lambda c: c.wait_confirmed(["a b"]), "job_ids"),
    ("jobs in no such state", lambda c: c.jobs(state="bogus"), "state"),
    ("jobs of a bad queue", lambda c: c.jobs(queue="bad q"), "queue"),
    ("jobs, limit 0", lambda c: c.jobs(limit=0), "limit"),
    ("requeue of one str", lambda c: c.requeue("abc"), "job_ids"),
    ("requeue of a bad id", lambda c: c.requeue(["fine", "a b"]), "job_ids"),
    ("purge of a bad queue", lambda c: c.purge("bad q"), "queue"),
    ("close with a negative timeout", lambda c: c.close(timeout=-1), "timeout"),
]


def limited_broker(cluster: Cluster) -> None:
    conf = cluster.root / "limits.toml"
    conf.write_text("[broker]\nmax_tries = 4\nmax_timeout = 100\nmax_message_size = 4096\n")
    cluster.broker("-c", str(conf))


def check(exc: InvalidArgument, argument: str, what: str) -> None:
    assert isinstance(exc, ValueError) and isinstance(exc, RespWorkersError)
    assert exc.argument == argument, (what, exc.argument, str(exc))
    assert argument in str(exc), (what, str(exc))


@pytest.mark.parametrize("kind", [Client, ThreadSafeClient])
def test_every_bad_argument_of_the_blocking_clients(cluster: Cluster, kind: type[Client]) -> None:
    limited_broker(cluster)
    with kind(cluster.clients, status=cluster.status) as c:
        for what, call, argument in BAD:
            with pytest.raises(InvalidArgument) as err:
                got = call(c)
                if isinstance(got, Iterator):
                    next(got)
            check(err.value, argument, what)
        assert c.session.pending == {} and c.session.outbox == type(c.session.outbox)()
        with pytest.raises(TypeError):  # a payload of the wrong type is a TypeError too
            c.submit(object())  # type: ignore[arg-type]
    assert cluster.snapshot()["totals"]["submitted"] == 0  # nothing of it was sent
    for ctor, argument in ((lambda: kind(cluster.clients, request_timeout=0), "request_timeout"),
                           (lambda: kind("no-such-transport"), "broker")):
        with pytest.raises(InvalidArgument) as err:
            ctor()
        check(err.value, argument, argument)


def test_every_bad_argument_of_the_asyncio_client(cluster: Cluster) -> None:
    limited_broker(cluster)

    async def main() -> None:
        async with aio.Client(cluster.clients, status=cluster.status) as c:
            for what, call, argument in BAD:
                with pytest.raises(InvalidArgument) as err:
                    got = call(c)
                    if isinstance(got, AsyncIterator):
                        await got.__anext__()
                    else:
                        await got
                check(err.value, argument, what)
            assert c.session.pending == {}
            with pytest.raises(InvalidType):
                await c.submit(object())  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="request_timeout"):
            aio.Client(cluster.clients, request_timeout=-5)

    asyncio.run(asyncio.wait_for(main(), 40))
    assert cluster.snapshot()["totals"]["submitted"] == 0


def test_the_cli_says_bad_usage_for_a_bad_argument(cluster: Cluster) -> None:
    assert exit_code(InvalidArgument("queue 'a b' is not a queue name", "queue")) == 2
    cluster.broker()
    r = cluster.run("requeue", "--failed", "--queue", "bad queue", "--broker", cluster.clients)
    assert r.returncode == 2 and "queue 'bad queue' is not a queue name" in r.stderr
    assert "Traceback" not in r.stderr
