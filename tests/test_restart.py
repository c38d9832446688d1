"""Nothing is lost: broker crashes and restarts, worker reconnects, the journal, cancel."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time

import pytest

from conftest import Cluster, wait_for

pytestmark = pytest.mark.timeout(120)


def test_broker_kill9_mid_batch_every_result_reaches_the_client_once(cluster: Cluster) -> None:
    broker = cluster.broker()
    cluster.pool("jobs_fixtures:Tester", 4)
    n = 3000
    received: dict[str, list[bytes]] = {}
    with cluster.client() as c:
        ids = [c.submit(f"job-{i}", id=f"j{i}") for i in range(n)]
        results = c.results(ids, timeout=100)
        for _ in range(n // 3):  # a third done, the rest queued or in flight
            r = next(results)
            received.setdefault(r.id, []).append(r.payload)
        broker.signal(signal.SIGKILL)
        broker.wait(5)
        cluster.broker()  # same endpoints, same journal
        for r in results:
            assert r.ok, (r.id, r.status, r.error)
            received.setdefault(r.id, []).append(r.payload)
    assert len(received) == n
    assert all(len(v) == 1 for v in received.values())  # exactly once to the client
    assert all(received[f"j{i}"][0].endswith(f":job-{i}".encode()) for i in range(n))


def test_idle_workers_come_back_by_themselves_after_a_broker_restart(cluster: Cluster) -> None:
    broker = cluster.broker()
    pool = cluster.pool(n=2)
    first_children = set(pool.children())
    broker.signal(signal.SIGKILL)
    broker.wait(5)
    wait_for(lambda: pool.output().count("no word from the broker") >= 2, 15,
             what="both workers to notice the broker is gone")
    cluster.broker()
    started = time.monotonic()
    wait_for(lambda: len(cluster.workers_registered()) == 2, 15,
             what="both workers to register with the new broker")
    took = time.monotonic() - started
    with cluster.client() as c:
        assert c.run("after-restart", timeout=5).endswith(b":after-restart")
    assert set(pool.children()) == first_children  # same processes: not restarted
    assert took < 10


def test_job_running_during_broker_restart_is_claimed_not_rerun(cluster: Cluster) -> None:
    broker = cluster.broker()
    cluster.pool(n=2)
    with cluster.client() as c:
        job = c.submit("sleep:3", id="long-one")
        wait_for(lambda: any(w["state"] == "busy" for w in cluster.snapshot()["workers"]),
                 what="the job to start")
        c.wait_confirmed([job], timeout=10)  # confirmed, hence journaled
        broker.signal(signal.SIGKILL)
        broker.wait(5)
        cluster.broker()
        result = c.result(job, timeout=30)
        assert result.endswith(b":sleep:3")
        info = c.query(job)
        assert info is not None
        assert info["attempt"] == 1  # the worker re-registered holding it: no second run
        assert cluster.snapshot()["totals"]["done"] == 1


def test_results_can_be_fetched_later_from_another_client_and_after_restart(
    cluster: Cluster,
) -> None:
    broker = cluster.broker()
    cluster.pool(n=1)
    with cluster.client() as c:
        c.submit("keep-me", id="fetch-later")
        c.outcome("fetch-later", timeout=10)
    broker.signal(signal.SIGTERM)
    assert broker.wait(10) == 0
    broker = cluster.broker()
    with cluster.client() as other:
        assert other.result("fetch-later", timeout=10).endswith(b":keep-me")
        assert other.query("fetch-later")["state"] == "done"  # type: ignore[index]
    broker.signal(signal.SIGTERM)  # the journal is locked while its broker runs
    assert broker.wait(10) == 0
    row = sqlite3.connect(cluster.journal).execute(
        "SELECT state FROM jobs WHERE id='fetch-later'").fetchone()
    assert row == ("done",)


def test_confirmed_jobs_survive_when_no_worker_ever_ran_them(cluster: Cluster) -> None:
    broker = cluster.broker()
    with cluster.client() as c:
        ids = [c.submit(f"q{i}", queue="later") for i in range(50)]
        c.wait_confirmed(ids, timeout=10)  # confirmed means journaled: that is the promise
    broker.signal(signal.SIGKILL)
    broker.wait(5)
    cluster.broker()
    assert cluster.snapshot()["queued"] == 50
    cluster.pool("jobs_fixtures:Tester", 2, "-q", "later")
    with cluster.client() as c:
        got = {r.id: r for r in c.results(ids, timeout=30)}
    assert all(got[i].ok for i in ids) and len(got) == 50


def test_duplicate_submit_runs_once(cluster: Cluster) -> None:
    cluster.broker()
    cluster.pool(n=2)
    with cluster.client() as a, cluster.client() as b:
        a.submit("sleep:0.5", id="same")
        b.submit("sleep:0.5", id="same")
        a.submit("sleep:0.5", id="same")
        assert a.result("same", timeout=10) == b.result("same", timeout=10)
        assert list(a.results([], timeout=0.3)) == []
    snap = cluster.snapshot()
    assert snap["totals"]["submitted"] == 1
    assert sum(w["done"] for w in snap["workers"]) == 1


def test_cancel_running_job_tells_the_client_and_stops_the_worker(cluster: Cluster) -> None:
    cluster.broker()
    pool = cluster.pool(n=1)
    first = set(pool.children())
    with cluster.client() as c, cluster.client() as other:
        job = c.submit("sleep:60", id="to-cancel")
        queued = c.submit("never", id="queued-cancel")
        wait_for(lambda: any(w["job"] == "to-cancel" for w in cluster.snapshot()["workers"]),
                 what="the job to start")
        assert other.cancel("queued-cancel")["state"] == "cancelled"  # type: ignore[index]
        assert other.cancel("to-cancel")["state"] == "cancelled"  # type: ignore[index]
        assert c.outcome(job, timeout=5).status == "cancelled"
        assert c.outcome(queued, timeout=5).status == "cancelled"
        # the worker is told to stop: the job is interrupted (Cancelled), and the same
        # process takes new work at once, long before the 60 s sleep would have ended
        assert c.run("next", timeout=5).endswith(b":next")
    snap = cluster.snapshot()
    assert snap["totals"]["cancelled"] == 2 and snap["totals"]["abandoned"] == 1
    assert snap["totals"]["duplicates"] == 0 and set(pool.children()) == first
    assert "stopped (the job was cancelled)" in pool.output()


def test_client_keeps_waiting_while_the_broker_is_down(cluster: Cluster) -> None:
    broker = cluster.broker()
    cluster.pool(n=1)
    outcome: list = []
    with cluster.client() as c:
        job = c.submit("sleep:0.2", id="waits")
        c.outcome(job, timeout=10)
        broker.signal(signal.SIGKILL)
        broker.wait(5)
        job2 = c.submit("while-down", id="sent-while-down")  # not confirmed yet
        waiting = threading.Event()  # the client has found the broker silent and waits on
        c.on_event = lambda note: "not answering" in note and waiting.set()
        t = threading.Thread(target=lambda: outcome.append(c.outcome(job2, timeout=40)))
        t.start()
        assert waiting.wait(20), "the client never noticed the broker was down"
        cluster.broker()
        t.join(45)
    assert outcome and outcome[0].ok and outcome[0].payload.endswith(b":while-down")


def test_rw_submit_tells_of_a_broker_restart_once(cluster: Cluster) -> None:
    broker = cluster.broker()
    cluster.pool(n=1)
    release = cluster.root / "release"
    sub = cluster.rw("submit", "-p", f"wait:{release}", "--broker", cluster.clients, name="submit")
    wait_for(lambda: any(w["state"] == "busy" for w in cluster.snapshot()["workers"]), 20,
             what="the job to start")
    broker.signal(signal.SIGKILL)
    broker.wait(5)
    wait_for(lambda: "not answering" in sub.output(), 20, what="rw submit to notice")
    cluster.broker()
    wait_for(lambda: "reconnected" in sub.output(), 20, what="rw submit to reconnect")
    wait_for(lambda: any(w["state"] == "busy" for w in cluster.snapshot()["workers"]), 20,
             what="the worker to come back holding the job")
    release.touch()
    assert sub.wait(20) == 0
    out = sub.output()
    assert f":wait:{release}" in out
    assert out.count("not answering") == 1, out
    assert out.count("reconnected to the broker") == 1, out
