"""The Python client against a real broker: closing delivers or says it did not, bounded state."""

from __future__ import annotations

import os
import signal

import pytest

from respworkers.errors import BrokerUnavailable

from conftest import Cluster, wait_for

pytestmark = pytest.mark.timeout(60)


def test_closing_at_once_delivers_every_submission(cluster: Cluster) -> None:
    cluster.broker("--journal", ":memory:")
    with cluster.client() as c:  # submit, then close at once: nothing may be dropped on the way
        ids = [c.submit(b"x" * 65536, id=f"quick-{i}", queue="nobody") for i in range(300)]
    with cluster.client() as c:
        missing = [j for j in ids if c.query(j) is None]
    assert missing == []


def test_closing_says_which_submissions_the_broker_did_not_confirm(cluster: Cluster) -> None:
    broker = cluster.broker()
    c = cluster.client(request_timeout=1.0)
    c.query("warm-up")  # first contact made
    os.kill(broker.pid, signal.SIGSTOP)  # the broker cannot answer now
    try:
        ids = [c.submit(f"p{i}", id=f"maybe-{i}", queue="nobody") for i in range(3)]
        with pytest.raises(BrokerUnavailable, match="3 submitted job.s. not confirmed") as err:
            c.close()
        assert all(i in str(err.value) for i in ids)
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    with cluster.client() as again:  # delivered after all, once the broker ran again
        wait_for(lambda: all(again.query(i) is not None for i in ids), 10, what="the jobs")


def test_a_closed_client_no_longer_counts_as_waiting(cluster: Cluster) -> None:
    cluster.broker()
    with cluster.client() as c:
        job = c.submit("x", id="left-behind", queue="nobody")
        c.wait_confirmed([job], timeout=5)
        assert c.query(job)["waiting_clients"] == 1  # type: ignore[index]
    with cluster.client() as other:
        wait_for(lambda: (other.query(job) or {}).get("waiting_clients") == 0, 5,
                 what="the closed client to be forgotten as a waiter")


def test_answers_nobody_asked_for_are_not_kept(cluster: Cluster) -> None:
    cluster.broker()
    with cluster.client() as c:
        outcomes = list(c.results([f"never-{i}" for i in range(500)], timeout=10))
        assert {r.status for r in outcomes} == {"unknown"}
        assert c.query("never-1") is None
        assert c.session.answers == {}  # the bound is the point of this test


def test_no_message_the_client_sends_is_over_the_brokers_frame_limit(cluster: Cluster) -> None:
    """libzmq closes the connection of a peer sending a frame over max_message_size + 1024,
    without a word: command lines of SUBMITS and WAIT must stay under it too."""
    conf = cluster.root / "small.toml"
    conf.write_text("[broker]\nmax_message_size = 2048\n")
    cluster.broker("-c", str(conf))
    long_ids = [f"{'x' * 150}-{i}" for i in range(1000)]  # 1000 x ~160 bytes on one line: 160 KB
    with cluster.client() as c:
        c.submit_many([{"payload": b"p", "id": i, "queue": "nobody"} for i in long_ids])
        c.wait_confirmed(long_ids, timeout=20)
    with cluster.client() as c:
        assert list(c.results([f"{'y' * 150}-{i}" for i in range(500)], timeout=20))  # WAIT


def test_job_ids_are_random_hex_and_unique_across_threads_and_forks() -> None:
    import os
    import re
    import threading

    from respworkers.client import new_job_id

    ids: list[str] = []

    def take() -> None:
        got = [new_job_id() for _ in range(2000)]
        ids.extend(got)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(ids) == 8000 and len(set(ids)) == 8000
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    new_job_id()  # the parent's pool has ids left over: a child must not hand them out
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child writes its next ids and leaves at once
        os.write(w, " ".join(new_job_id() for _ in range(8)).encode())
        os._exit(0)
    os.close(w)
    try:
        child = os.read(r, 4096).decode().split()
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    parent = [new_job_id() for _ in range(8)]
    assert len(child) == 8 and not set(child) & set(parent)
