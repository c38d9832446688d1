"""The asyncio client against real broker and worker processes: many concurrent awaits on
one client, results as an async iterator, cancel and query, a broker killed and restarted
while awaits are pending, and what closing promises."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from typing import Any

import pytest

from respworkers import aio
from respworkers.errors import BrokerUnavailable, ClientClosed, JobFailed

from conftest import Cluster, wait_for

pytestmark = pytest.mark.timeout(120)


def client(cluster: Cluster, **kw: Any) -> aio.Client:
    kw.setdefault("request_timeout", 5.0)
    return aio.Client(cluster.clients, status=cluster.status, **kw)


def run(coro: Any, timeout: float = 90) -> Any:
    """Run a test's coroutine, bounded below pytest-timeout so a hang shows where it was."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_many_concurrent_awaits_on_one_client(cluster: Cluster) -> None:
    cluster.broker()
    cluster.pool(n=4)

    async def main() -> None:
        async with client(cluster) as c:
            got = await asyncio.gather(*(c.run(f"job-{i}") for i in range(200)))
            assert [g.split(b":", 1)[1] for g in got] == [f"job-{i}".encode() for i in range(200)]

            # Many tasks awaiting the same job: every one gets its outcome, and it is then gone.
            job = await c.submit("sleep:0.5")
            same = await asyncio.gather(*(c.result(job, timeout=20) for _ in range(20)),
                                        c.outcome(job, timeout=20))
            assert len({r for r in same[:20]}) == 1 and same[0].endswith(b":sleep:0.5")
            assert same[20].ok and same[20].payload == same[0]
            assert c.session.done == {} and c.session.claims == {}

            # A failure reaches its awaiter as JobFailed, the others are untouched.
            ok, bad = await asyncio.gather(c.run("fine"), c.run("raise", tries=1),
                                           return_exceptions=True)
            assert isinstance(ok, bytes) and isinstance(bad, JobFailed) and bad.reason == "error"
            mapped = await c.map([f"sleep:0.0{30 - i:02d}" for i in range(30)])  # input order
            assert [m.split(b":", 1)[1] for m in mapped] == [
                f"sleep:0.0{30 - i:02d}".encode() for i in range(30)]

    run(main())


def test_results_as_an_async_iterator(cluster: Cluster) -> None:
    cluster.broker()
    cluster.pool(n=3)

    async def main() -> None:
        async with client(cluster) as c:
            ids = await c.submit_many([f"sleep:{(i % 5) / 50}" for i in range(60)]
                                      + [{"payload": "raise", "tries": 1, "id": "will-fail"}])
            seen = Counter()
            async for r in c.results(ids, timeout=30):
                seen[r.id] += 1
            assert set(seen) == set(ids) and set(seen.values()) == {1}
            # Outcomes came in finishing order while other tasks awaited on the same client.
            more = await c.submit_many([f"sleep:{0.3 - i / 10}" for i in range(3)])
            order = [r.id async for r in c.results(more, timeout=20)]
            assert order == list(reversed(more))

            # A job nobody serves: the iterator stops at its timeout, and nothing is lost.
            stuck = await c.submit("x", queue="nobody")
            with pytest.raises(TimeoutError):
                async for _ in c.results([stuck], timeout=0.3):
                    pass
            assert (await c.cancel(stuck))["state"] == "cancelled"  # type: ignore[index]
            assert (await c.outcome(stuck, timeout=5)).status == "cancelled"

    run(main())


def test_query_cancel_watch_and_the_operators_requests(cluster: Cluster) -> None:
    cluster.broker()
    cluster.pool(n=1)

    async def main() -> None:
        async with client(cluster) as c:
            waiting = await c.submit_many([{"payload": "x", "queue": "later", "id": f"w{i}"}
                                           for i in range(5)])
            await c.wait_confirmed(waiting, timeout=10)
            infos = await asyncio.gather(*(c.query(j) for j in waiting), c.query("no-such-job"))
            assert [i["state"] for i in infos[:5]] == ["queued"] * 5  # type: ignore[index]
            assert infos[5] is None
            # Questions about one job from many tasks at once: each gets its own answer.
            both = await asyncio.gather(c.query("w0"), c.cancel("w0"), c.query("w0"))
            assert [b["state"] for b in both] == ["queued", "cancelled", "cancelled"]  # type: ignore[index]
            assert (await c.outcome("w0", timeout=5)).status == "cancelled"
            assert await c.cancel("no-such-job") is None

            listed = await c.jobs(queue="later")
            assert {j["id"] for j in listed} == set(waiting)
            assert await c.purge("later") == 4
            report = await c.requeue(["w1", "nope"])
            assert report["requeued"] == ["w1"] and report["unknown"] == ["nope"]
            assert (await c.cancel("w1"))["state"] == "cancelled"  # type: ignore[index]

            job = await c.submit("progress:3:0.3")
            reports = [r async for r in c.watch(job, timeout=20)]
            assert reports and reports[-1]["fraction"] == 1.0
            assert (await c.outcome(job, timeout=10)).ok
            assert (await c.status())["totals"]["done"] >= 1

    run(main())


def test_broker_killed_and_restarted_while_awaits_are_pending(cluster: Cluster) -> None:
    """kill -9 the broker with hundreds of awaits pending, start it again on the same
    endpoints and journal: every awaited job gets its outcome, each exactly once."""
    broker = cluster.broker()
    cluster.pool(n=4)
    n = 300

    async def main() -> None:
        async with client(cluster) as c:
            notes: list[str] = []
            c.on_event = notes.append
            runs = [asyncio.ensure_future(c.run(f"sleep:0.0{i:04d}", timeout=30)) for i in range(n)]
            ids = await c.submit_many([{"payload": f"it-{i}", "id": f"it-{i}"} for i in range(n)])
            seen: Counter[str] = Counter()

            async def iterate() -> None:
                async for r in c.results(ids, timeout=80):
                    assert r.ok, (r.id, r.status, r.error)
                    assert r.payload.endswith(f":{r.id}".encode())
                    seen[r.id] += 1

            reader = asyncio.ensure_future(iterate())
            while sum(f.done() for f in runs) < n // 4:
                await asyncio.sleep(0.01)
            broker.signal(signal.SIGKILL)
            await asyncio.get_running_loop().run_in_executor(None, broker.wait, 5)
            await asyncio.sleep(0.5)  # awaits pending on a dead broker
            assert sum(not f.done() for f in runs) > 0
            await asyncio.get_running_loop().run_in_executor(None, cluster.broker)
            got = await asyncio.gather(*runs)
            await reader
            assert all(g.endswith(f":sleep:0.0{i:04d}".encode()) for i, g in enumerate(got))
            assert set(seen) == set(ids) and set(seen.values()) == {1}
            assert c.session.pending == {} and c.session.done == {} and c.session.claims == {}
            assert any("reconnected" in note for note in notes)

    run(main(), 100)


def test_closing_at_once_delivers_every_submission(cluster: Cluster) -> None:
    cluster.broker("--journal", ":memory:")

    async def main() -> list[str]:
        async with client(cluster) as c:  # submit, close at once: nothing may be dropped
            ids = await c.submit_many([{"payload": b"x" * 65536, "id": f"quick-{i}",
                                        "queue": "nobody"} for i in range(300)])
            ids += await asyncio.gather(*(c.submit(b"y" * 1000, id=f"one-{i}", queue="nobody")
                                          for i in range(100)))
        async with client(cluster) as c:
            infos = await asyncio.gather(*(c.query(j) for j in ids))
        return [j for j, info in zip(ids, infos) if info is None]

    assert run(main()) == []


def test_closing_names_unconfirmed_jobs_and_ends_pending_awaits(cluster: Cluster) -> None:
    broker = cluster.broker()

    async def main() -> list[str]:
        c = client(cluster, request_timeout=1.0)
        await c.query("warm-up")  # first contact made
        waiting = asyncio.ensure_future(c.outcome("warm-up-job", timeout=60))
        os.kill(broker.pid, signal.SIGSTOP)  # the broker cannot answer now
        try:
            ids = [await c.submit(f"p{i}", id=f"maybe-{i}", queue="nobody") for i in range(3)]
            started = time.monotonic()
            with pytest.raises(BrokerUnavailable, match="3 submitted job.s. not confirmed") as err:
                await c.close()
            assert time.monotonic() - started < 5
            assert all(i in str(err.value) for i in ids)
            with pytest.raises(ClientClosed):  # the await still pending when it closed
                await waiting
            with pytest.raises(ClientClosed):  # and any call afterwards
                await c.query("x")
            await c.close()  # again: nothing to do
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        return ids

    ids = run(main())
    with cluster.client() as again:  # delivered after all, once the broker ran again
        wait_for(lambda: all(again.query(i) is not None for i in ids), 10, what="the jobs")


def test_leaving_on_an_error_does_not_wait_and_a_missing_broker_fails_every_await(
    cluster: Cluster,
) -> None:
    async def main() -> None:
        c = aio.Client(f"ipc://{cluster.root}/nobody-here", request_timeout=0.5)
        started = time.monotonic()
        outcomes = await asyncio.gather(c.run("a"), c.query("b"), c.jobs(), c.submit("c"),
                                        return_exceptions=True)
        assert all(isinstance(o, BrokerUnavailable) for o in outcomes), outcomes
        assert time.monotonic() - started < 3
        await c.close()

        cluster.broker()
        started = time.monotonic()
        with pytest.raises(KeyError):
            async with client(cluster) as c:
                await c.submit("x", queue="nobody")
                raise KeyError("the caller's own error")
        assert time.monotonic() - started < 3

    run(main())


def test_what_a_full_pipe_holds_back_is_sent_when_the_broker_reads_again(cluster: Cluster) -> None:
    broker = cluster.broker()
    cluster.pool(n=2)

    async def main() -> None:
        async with client(cluster) as c:
            await c.query("warm-up")
            os.kill(broker.pid, signal.SIGSTOP)  # it reads nothing: the pipe fills up
            try:
                ids = list(await asyncio.gather(*(c.submit(f"full-{i}", id=f"full-{i}")
                                                  for i in range(5000))))
                assert c.session.outbox  # held back, not dropped, and the submits returned
            finally:
                os.kill(broker.pid, signal.SIGCONT)
            await c.wait_confirmed(ids, timeout=30)
            got = {r.id: r async for r in c.results(ids, timeout=60)}
            assert len(got) == 5000 and all(r.ok for r in got.values())

    run(main())
