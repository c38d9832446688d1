"""ThreadSafeClient against real broker and worker processes: one client hammered from
eight threads at once, and closing it while other threads wait."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Callable

import pytest

from respworkers import ThreadSafeClient
from respworkers.errors import ClientClosed, JobFailed

from conftest import Cluster

pytestmark = pytest.mark.timeout(120)


def threadsafe(cluster: Cluster, **kw: Any) -> ThreadSafeClient:
    kw.setdefault("request_timeout", 5.0)
    return ThreadSafeClient(cluster.clients, status=cluster.status, **kw)


def in_threads(n: int, work: Callable[[int], None], timeout: float = 90) -> None:
    """Run ``work(i)`` in n threads started together; re-raise the first error."""
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def body(i: int) -> None:
        try:
            start.wait(10)
            work(i)
        except BaseException as exc:  # reported below, with the thread's number
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not [t for t in threads if t.is_alive()], "threads still running: a call hung"
    if errors:
        raise errors[0]


def test_one_client_hammered_from_eight_threads(cluster: Cluster) -> None:
    cluster.broker()
    cluster.pool(n=4)
    seen: Counter[str] = Counter()
    seen_lock = threading.Lock()
    with threadsafe(cluster) as c:
        shared = c.submit("sleep:1", id="shared")

        def work(t: int) -> None:
            # Every thread waits for the same job: each gets its result.
            assert c.result(shared, timeout=30).endswith(b":sleep:1")
            for k in range(15):
                assert c.run(f"t{t}-run-{k}").endswith(f":t{t}-run-{k}".encode())
                ids = c.submit_many([{"payload": f"t{t}-{k}-{j}", "id": f"t{t}-{k}-{j}"}
                                     for j in range(10)])
                for r in c.results(ids, timeout=30):
                    assert r.ok and r.payload.endswith(f":{r.id}".encode())
                    with seen_lock:
                        seen[r.id] += 1
                info = c.query(ids[0])
                assert info is not None and info["state"] == "done"
                parked = c.submit("x", queue="nobody", id=f"t{t}-parked-{k}")
                assert c.cancel(parked)["state"] == "cancelled"  # type: ignore[index]
                assert c.outcome(parked, timeout=10).status == "cancelled"
                with pytest.raises(JobFailed):
                    c.result(c.submit("raise", tries=1), timeout=30)
            assert {j["id"] for j in c.jobs(state="cancelled", limit=1000)} >= {
                f"t{t}-parked-{k}" for k in range(15)}

        in_threads(8, work)
        assert len(seen) == 8 * 15 * 10 and set(seen.values()) == {1}
        assert c.session.pending == {} and c.session.done == {} and c.session.claims == {}
        assert c.session.asking == set() and not any(c.session.requests.values())


def test_closing_ends_the_waits_of_other_threads(cluster: Cluster) -> None:
    cluster.broker()
    c = threadsafe(cluster)
    job = c.submit("x", queue="nobody")
    c.wait_confirmed([job], timeout=10)
    ended: list[tuple[str, float]] = []

    def work(t: int) -> None:
        try:
            if t % 2:
                c.result(job, timeout=60)
            else:
                for _ in c.results([job], timeout=60):
                    pass
        except ClientClosed:
            ended.append(("closed", time.monotonic()))

    waiters = threading.Thread(target=in_threads, args=(6, work), daemon=True)
    waiters.start()
    try:
        time.sleep(1.0)  # all six are waiting, one of them polling the socket
        closed_at = time.monotonic()
    finally:
        c.close()
    waiters.join(10)
    assert not waiters.is_alive()
    assert len(ended) == 6 and all(at - closed_at < 3 for _, at in ended)
    with pytest.raises(ClientClosed):
        c.query(job)
    with threadsafe(cluster) as other:  # the closed client no longer counts as a waiter
        assert other.query(job)["waiting_clients"] == 0  # type: ignore[index]
