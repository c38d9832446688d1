"""The per-job features of protocol v3, driven through BrokerCore with a fake clock (and, for
restarts, over a real sqlite journal in a temp folder): retry backoff and where retries go,
delays and expiry, priorities, tenant fair shares, ABANDON, progress, and the operators'
requests (list, requeue, purge). End-to-end versions with real processes are in
test_features_e2e.py.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from test_broker_core import C1, C2, C3, T0, W1, W2, W3, W4, WALL0, Harness, ids

from respworkers import protocol as p
from respworkers.broker import admin
from respworkers.broker.core import BrokerCore
from respworkers.broker.journal import SqliteJournal

pytestmark = pytest.mark.timeout(60)

Q = p.DEFAULT_QUEUE


# ================================================================================================
# helpers
# ================================================================================================


class Edge:
    """A random source whose jitter is always at one end of its range (0: low, 1: high)."""

    def __init__(self, where: float) -> None:
        self.where = where

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.where


def jitter(h: Harness, where: float | None) -> Harness:
    """Pin the retry policy's jitter (None: a seeded real one)."""
    h.core.policy.rng = random.Random(1234) if where is None else Edge(where)  # type: ignore[assignment]
    return h


def sub(h: Harness, job_id: str, queue: str = Q, client: bytes = C1, payload: bytes = b"x",
        flush: bool = True, **options: Any) -> None:
    """SUBMIT with any job options (priority, delay, expires, tenant, backoff, ...)."""
    h.core.on_client(client, p.encode_submit(job_id, queue, p.Options(**options), [payload]))
    if flush:
        h.core.flush()


def sub_many(h: Harness, job_ids: list[str], queue: str = Q, client: bytes = C1, **options: Any) -> None:
    """SUBMITS in batches of MAX_BATCH, every job with the same options."""
    opts = p.Options(**options)
    for i in range(0, len(job_ids), p.MAX_BATCH):
        h.core.on_client(client, p.encode_submits(
            [p.encode_submit(j, queue, opts, [b"x"]) for j in job_ids[i:i + p.MAX_BATCH]]))
    h.core.flush()


def replies(h: Harness, client: bytes) -> list[Any]:
    """Decoded replies to one client since the last look, ACCEPTED left out."""
    out = [p.decode_reply(f) for f in h.raw_to_client(client)]
    return [r for r in out if not isinstance(r, p.Accepted)]


def fail(h: Harness, wid: bytes, job_id: str, attempt: int, text: str = "boom", then: str = "",
         after: float | None = None, ready: bool = True) -> None:
    """ERROR with a then-word: "" (policy), "retry" (after seconds), "fail", "abandoned"."""
    h.core.on_worker(wid, p.encode_worker_error(job_id, attempt, h.token(job_id, attempt), ready,
                                                text, then, after))


def progress(h: Harness, wid: bytes, job_id: str, attempt: int, report: dict[str, Any],
             token: bytes | None = None) -> None:
    token = h.token(job_id, attempt) if token is None else token
    h.core.on_worker(wid, p.encode_worker_progress(job_id, attempt, token,
                                                   p.json.dumps(report).encode()))


def runs_in(h: Harness, job_id: str) -> float:
    """Seconds until a scheduled job may run, from INFO's runs_at (exact, not rounded)."""
    info = h.info(job_id)
    assert info["state"] == "scheduled", info
    return info["runs_at"] - h.wall


def abandons(h: Harness, wid: bytes) -> list[p.Abandon]:
    return [m for m in h.to_worker(wid) if isinstance(m, p.Abandon)]


def worker_row(h: Harness, wid: bytes) -> dict[str, Any]:
    return next(w for w in h.snap()["workers"] if w["id"] == wid.hex())


def drive(h: Harness, wids: list[bytes], stop: Any, limit: int = 100_000) -> list[str]:
    """Workers that answer every JOB at once, in the order the JOBs were sent; returns the
    dispatch order until ``stop(order)`` is true (or nothing is left to answer)."""
    order: list[str] = []
    pos = 0
    while not stop(order) and len(order) < limit:
        out = h.worker_out
        while pos < len(out) and not (out[pos][0] in wids and out[pos][1][0].startswith(b"RWW3 JOB ")):
            pos += 1
        if pos >= len(out):
            break
        wid, frames = out[pos]
        pos += 1
        job = p.decode_broker(frames)
        order.append(job.job_id)
        h.result(wid, job.job_id, job.attempt)
    h.worker_out.clear()
    return order


def list_jobs(h: Harness, **query: Any) -> dict[str, Any]:
    h.core.on_client(C3, p.encode_list_jobs(query))
    (page,) = replies(h, C3)
    assert isinstance(page, p.JobsPage)
    return page.page


def requeue(h: Harness, *job_ids: str) -> dict[str, Any]:
    h.core.on_client(C3, p.encode_requeue(list(job_ids)))
    h.core.flush()  # REQUEUED is sent once the change is journaled
    (report,) = replies(h, C3)
    assert isinstance(report, p.Requeued)
    return report.report


def purge(h: Harness, queue: str) -> tuple[int, int]:
    h.core.on_client(C3, p.encode_purge(queue))
    (purged,) = replies(h, C3)
    assert isinstance(purged, p.Purged) and purged.queue == queue
    return purged.cancelled, purged.left


# ================================================================================================
# backoff: when a retry runs
# ================================================================================================


@pytest.mark.parametrize("where, factor", [(1.0, 1.0), (0.0, 0.5)])
def test_backoff_doubles_per_attempt_is_capped_and_jittered_within_half_to_full(where, factor):
    h = jitter(Harness(backoff=2.0, backoff_max=10.0, tries=6), where)
    h.hello(W1)
    sub(h, "j")
    expected = [2.0, 4.0, 8.0, 10.0, 10.0]  # 2 * 2^(attempt-1), at most 10
    for attempt, base in enumerate(expected, 1):
        assert ids(h.jobs_to(W1)) == [("j", attempt)]
        fail(h, W1, "j", attempt)
        delay = runs_in(h, "j")
        assert delay == pytest.approx(base * factor), attempt
        assert h.snap()["scheduled"] == 1 and h.snap()["queued"] == 0
        h.advance(delay - 0.01)
        assert h.jobs_to(W1) == [] and h.info("j")["state"] == "scheduled"
        h.advance(0.01)
    assert ids(h.jobs_to(W1)) == [("j", 6)]
    fail(h, W1, "j", 6, "last")
    assert [type(r) for r in replies(h, C1)] == [p.Failed]


def test_backoff_jitter_spreads_between_half_and_full_delay():
    h = jitter(Harness(backoff=4.0, tries=3), None)
    h.hello(W1)
    n = 300
    for i in range(n):
        sub(h, f"j{i}", payload=b"%d" % i)
    delays = []
    for i in range(n):  # each fails once on W1, which then takes the next
        assert ids(h.jobs_to(W1)) == [(f"j{i}", 1)]
        fail(h, W1, f"j{i}", 1)
        delays.append(runs_in(h, f"j{i}"))
    assert all(2.0 - 1e-9 <= d <= 4.0 + 1e-9 for d in delays)
    assert min(delays) < 2.2 and max(delays) > 3.8  # really spread over the range
    assert len({round(d, 3) for d in delays}) > n // 2


def test_job_option_beats_worker_class_beats_broker_config():
    h = jitter(Harness(backoff=1.0, backoff_max=600.0, tries=5), 1.0)
    h.hello(W1, info={"name": "w1", "backoff": 4.0, "backoff_max": 6.0})  # the class's
    h.hello(W2, queues=("plain",))  # announces nothing: the broker's

    def delays(job_id: str, wid: bytes, queue: str = Q, **options: Any) -> list[float]:
        """The delay before each of three retries of a job failing on ``wid``."""
        sub(h, job_id, queue=queue, **options)
        out = []
        for attempt in (1, 2, 3):
            assert ids(h.jobs_to(wid)) == [(job_id, attempt)]
            fail(h, wid, job_id, attempt)
            out.append(runs_in(h, job_id) if h.info(job_id)["state"] == "scheduled" else 0.0)
            h.advance(out[-1])
        assert ids(h.jobs_to(wid)) == [(job_id, 4)]
        h.result(wid, job_id, 4)
        return out

    assert delays("worker", W1) == pytest.approx([4.0, 6.0, 6.0])
    assert delays("job", W1, backoff=0.5) == pytest.approx([0.5, 1.0, 2.0])  # the class's cap
    assert delays("capped", W1, backoff=5.0, backoff_max=7.0) == pytest.approx([5.0, 7.0, 7.0])
    assert delays("now", W1, backoff=0.0) == [0.0, 0.0, 0.0]  # whatever the class says
    assert delays("broker", W2, queue="plain") == pytest.approx([1.0, 2.0, 4.0])
    assert delays("broker-capped", W2, queue="plain", backoff_max=1.5) == pytest.approx(
        [1.0, 1.5, 1.5])


def test_retry_after_from_the_worker_is_exact_and_uses_a_try():
    h = jitter(Harness(backoff=100.0, tries=3), 0.0)  # neither backoff nor jitter applies
    h.hello(W1)
    sub(h, "j", backoff=50.0)
    h.job_to(W1)
    fail(h, W1, "j", 1, "Retry: later", then="retry", after=2.5)
    assert runs_in(h, "j") == pytest.approx(2.5)
    h.advance(2.49)
    assert h.jobs_to(W1) == []
    h.advance(0.01)
    assert ids(h.jobs_to(W1)) == [("j", 2)]
    fail(h, W1, "j", 2, "Retry: now", then="retry", after=0.0)  # after=0: at once
    assert ids(h.jobs_to(W1)) == [("j", 3)]
    fail(h, W1, "j", 3, "Retry: again", then="retry", after=1.0)  # no tries left
    (failed,) = replies(h, C1)
    assert isinstance(failed, p.Failed) and failed.error == "Retry: again"
    assert h.info("j")["attempt"] == 3


def test_fail_from_the_worker_ends_the_job_at_once_with_tries_left():
    h = Harness(backoff=1.0, tries=5)
    h.hello(W1)
    h.hello(W2)
    sub(h, "j")
    h.job_to(W1)
    fail(h, W1, "j", 1, "Fail: malformed payload", then="fail")
    (failed,) = replies(h, C1)
    assert failed == p.Failed("j", p.FAIL_ERROR, "Fail: malformed payload")
    info = h.info("j")
    assert (info["state"], info["attempt"], info["tries"]) == ("failed", 1, 5)
    assert h.jobs_to(W2) == [] and h.snap()["scheduled"] == 0
    assert h.snap()["totals"]["retried"] == 0 and h.snap()["totals"]["failed"] == 1


def test_a_lost_worker_and_a_timeout_also_back_off():
    h = jitter(Harness(backoff=3.0, tries=4), 1.0)
    h.hello(W1, info={"name": "w1", "slot": "slot-1", "backoff": 7.0})
    h.hello(W2, queues=("t",))
    sub(h, "lost")
    sub(h, "slow", queue="t", timeout=5.0)
    h.job_to(W1)
    h.job_to(W2)
    h.core.on_worker(b"pool", p.encode_vacate("slot-1"))  # its pool saw it die
    info = h.info("lost")
    assert info["state"] == "scheduled" and info["attempt"] == 1
    assert runs_in(h, "lost") == pytest.approx(7.0)  # the lost worker's class said 7
    h.hello(W3)
    h.advance(5.0)  # the time limit of "slow"
    assert runs_in(h, "slow") == pytest.approx(3.0)  # the broker's backoff
    fail(h, W2, "slow", 1, "TimeLimit")  # the timed-out attempt stops: W2 is idle
    assert h.jobs_to(W2) == [] and h.jobs_to(W3) == []
    h.advance(1.99)
    assert h.jobs_to(W3) == []
    h.advance(0.01)  # 7 s after the loss
    assert ids(h.jobs_to(W3)) == [("lost", 2)]
    h.advance(0.99)
    assert h.jobs_to(W2) == []
    h.advance(0.01)  # 3 s after the time-out
    assert ids(h.jobs_to(W2)) == [("slow", 2)]


# ================================================================================================
# retry elsewhere: which worker a retry goes to
# ================================================================================================


def test_retry_waits_for_a_busy_worker_that_has_not_tried_it():
    h = Harness(retry_elsewhere_wait=5.0)
    h.hello(W1)
    h.hello(W2)
    sub(h, "j1")
    sub(h, "j2")
    assert ids(h.jobs_to(W1)) == [("j1", 1)] and ids(h.jobs_to(W2)) == [("j2", 1)]
    fail(h, W1, "j1", 1)  # W1 is idle now, but W2 has not tried j1
    assert h.jobs_to(W1) == []
    assert h.worker_state(W1) == "idle" and h.info("j1")["state"] == "queued"
    h.advance(4.0)
    assert h.jobs_to(W1) == []
    h.result(W2, "j2", 1)
    assert ids(h.jobs_to(W2)) == [("j1", 2)]
    assert h.info("j1")["workers_tried"] == ["w1", "w2"]


def test_retry_is_offered_to_any_worker_after_retry_elsewhere_wait():
    h = Harness(retry_elsewhere_wait=5.0)
    h.hello(W1)
    h.hello(W2)
    sub(h, "j1")
    sub(h, "j2")
    h.jobs_to(W1)
    h.jobs_to(W2)
    fail(h, W1, "j1", 1)
    h.advance(4.99)
    assert h.jobs_to(W1) == []
    h.advance(0.01)  # waited long enough: the idle worker that tried it takes it
    assert ids(h.jobs_to(W1)) == [("j1", 2)]
    assert h.jobs_to(W2) == []


def test_after_the_wait_a_tried_worker_takes_the_retry_when_it_is_next_ready():
    h = Harness(retry_elsewhere_wait=5.0)
    h.hello(W1)
    h.hello(W2)
    sub(h, "j1")
    sub(h, "j2")
    sub(h, "j3")  # queued: work W1 may take meanwhile
    h.jobs_to(W1)
    h.jobs_to(W2)
    fail(h, W1, "j1", 1)
    assert ids(h.jobs_to(W1)) == [("j3", 1)]  # not the retry: other work instead
    sub(h, "j4")
    h.advance(6.0)  # nobody idle when the wait ended
    h.result(W1, "j3", 1)
    assert ids(h.jobs_to(W1)) == [("j1", 2)]  # the retry first now, before j4


def test_retry_goes_at_once_to_a_tried_worker_when_every_worker_of_the_queue_tried_it():
    h = Harness(retry_elsewhere_wait=5.0)
    h.hello(W1)
    sub(h, "solo")
    h.job_to(W1)
    fail(h, W1, "solo", 1)
    assert ids(h.jobs_to(W1)) == [("solo", 2)]  # the only worker: no wait
    h.result(W1, "solo", 2)

    h.hello(W2)
    h.hello(W3, queues=("elsewhere",))  # has not tried it, but does not serve its queue
    sub(h, "pair")
    assert ids(h.jobs_to(W1)) == [("pair", 1)]
    fail(h, W1, "pair", 1)
    assert ids(h.jobs_to(W2)) == [("pair", 2)]  # the untried idle one
    fail(h, W2, "pair", 2)
    assert ids(h.jobs_to(W1)) == [("pair", 3)]  # both tried it: at once


# ================================================================================================
# delay and expiry
# ================================================================================================


def test_delayed_job_is_scheduled_counted_and_runs_at_its_time():
    h = Harness()
    h.hello(W1)
    sub(h, "later", delay=10.0)
    assert h.jobs_to(W1) == []
    info = h.info("later")
    assert info["state"] == "scheduled"
    assert info["runs_at"] == pytest.approx(WALL0 + 10.0) and info["runs_in"] == pytest.approx(10.0)
    snap = h.snap()
    assert snap["scheduled"] == 1 and snap["queued"] == 0
    assert snap["queues"][Q]["scheduled"] == 1 and snap["queues"][Q]["queued"] == 0
    assert h.core.next_wake() == pytest.approx(h.mono + 10.0)  # the loop wakes up for it
    h.advance(9.99)
    assert h.jobs_to(W1) == []
    h.advance(0.01)
    assert ids(h.jobs_to(W1)) == [("later", 1)]
    snap = h.snap()
    assert snap["scheduled"] == 0 and snap["queues"][Q]["scheduled"] == 0
    assert h.info("later")["runs_at"] is None


def test_delayed_jobs_queue_in_the_order_their_time_comes():
    h = Harness()
    sub(h, "c", delay=3.0)
    sub(h, "a", delay=1.0)
    sub(h, "now")
    sub(h, "b", delay=2.0)
    h.advance(5.0)
    h.hello(W1)
    assert drive(h, [W1], lambda order: len(order) == 4) == ["now", "a", "b", "c"]


def test_job_not_started_by_its_expiry_ends_expired():
    h = Harness()
    sub(h, "e", expires=5.0)
    sub(h, "ok", queue="other", expires=5.0)
    sub(h, "sched", delay=10.0, expires=5.0)  # still waiting for its delay at its expiry
    h.ref(C2, p.WAIT, "e")
    h.advance(4.99)
    assert h.info("e")["state"] == "queued"
    h.advance(0.01)
    for job_id in ("e", "ok", "sched"):
        info = h.info(job_id)
        assert (info["state"], info["reason"], info["started"]) == ("expired", "expired", None)
    snap = h.snap()
    assert snap["totals"]["expired"] == 3 and snap["totals"]["failed"] == 0
    assert snap["queued"] == 0 and snap["scheduled"] == 0
    h.hello(W1)
    assert h.jobs_to(W1) == []  # it never runs
    # every waiter was told it ended, once
    assert len(replies(h, C1)) == 3 and len(replies(h, C2)) == 1


def test_expiry_is_checked_at_dispatch_when_the_timetable_has_not_run_yet():
    h = Harness()
    sub(h, "e", expires=5.0)
    sub(h, "keep")
    h.mono += 6.0
    h.wall += 6.0
    h.core.set_time(h.mono, h.wall)  # no tick: the timetable is late
    h.hello(W1)
    assert ids(h.jobs_to(W1)) == [("keep", 1)]
    assert h.info("e")["state"] == "expired"


def test_waiters_of_an_expired_job_get_expired():
    h = Harness()
    sub(h, "e", expires=5.0)
    h.ref(C2, p.WAIT, "e")
    h.advance(5.0)
    assert replies(h, C1) == [p.Expired("e")]
    assert replies(h, C2) == [p.Expired("e")]
    h.ref(C3, p.WAIT, "e")  # asked after it ended
    assert replies(h, C3) == [p.Expired("e")]


def test_a_running_job_never_expires():
    h = Harness()
    h.hello(W1)
    sub(h, "e", expires=5.0)
    h.job_to(W1)
    h.advance(30.0)
    assert h.info("e")["state"] == "running"
    h.result(W1, "e", 1, payload=[b"made it"])
    assert replies(h, C1) == [p.Result("e", [b"made it"])]
    assert h.snap()["totals"]["expired"] == 0


# ================================================================================================
# priorities
# ================================================================================================


def test_many_jobs_run_by_priority_and_fifo_among_equals():
    h = Harness()
    rng = random.Random(7)
    submitted = []
    for i in range(300):
        prio = rng.randrange(10)
        submitted.append((prio, i))
        sub(h, f"j{i}", priority=prio)
    h.hello(W1)
    order = drive(h, [W1], lambda order: len(order) == 300)
    expected = [f"j{i}" for prio, i in sorted(submitted, key=lambda t: (-t[0], t[1]))]
    assert order == expected


def test_default_priority_is_five():
    h = Harness()
    sub(h, "low", priority=4)
    sub(h, "default")
    sub(h, "high", priority=6)
    assert h.info("default")["priority"] == 5
    h.hello(W1)
    assert drive(h, [W1], lambda order: len(order) == 3) == ["high", "default", "low"]


def test_a_retry_goes_first_among_its_priority_but_not_above_a_higher_one():
    h = Harness()
    h.hello(W1)
    sub(h, "a")  # priority 5, runs at once
    sub(h, "b")
    sub(h, "c")
    sub(h, "hi", priority=7)
    sub(h, "lo", priority=3)
    assert ids(h.jobs_to(W1)) == [("a", 1)]
    fail(h, W1, "a", 1)  # the only worker: the retry takes the head of priority 5
    order = drive(h, [W1], lambda order: len(order) == 5)
    assert order == ["hi", "a", "b", "c", "lo"]


def test_a_worker_serving_several_queues_takes_the_highest_priority_across_them():
    h = Harness()
    sub(h, "a-p5", queue="a")
    sub(h, "b-p7", queue="b", priority=7)
    sub(h, "a-p7", queue="a", priority=7)
    sub(h, "b-p5", queue="b")
    sub(h, "c-p9", queue="c", priority=9)  # not served by W1
    h.hello(W1, queues=("a", "b"))
    order = drive(h, [W1], lambda order: len(order) == 4)
    assert order == ["b-p7", "a-p7", "a-p5", "b-p5"]
    assert h.info("c-p9")["state"] == "queued"


# ================================================================================================
# fair share between tenants
# ================================================================================================


def test_a_tenant_with_ten_jobs_is_not_stuck_behind_another_tenants_ten_thousand():
    h = Harness()
    workers = [W1, W2, W3, W4]
    for wid in workers:
        h.hello(wid)
    sub_many(h, [f"a{i}" for i in range(10_000)], tenant="A")
    sub_many(h, [f"b{i}" for i in range(10)], tenant="B")
    assert h.snap()["queues"][Q]["tenants"] == {"A": 10_000 - 4, "B": 10}
    order = drive(h, workers, lambda order: sum(j.startswith("b") for j in order) == 10)
    assert sum(j.startswith("b") for j in order) == 10
    assert len(order) <= 30, order  # all of B within the first few dozen dispatches
    a_jobs = [j for j in order if j.startswith("a")]
    assert a_jobs == [f"a{i}" for i in range(len(a_jobs))]  # FIFO within a tenant


def test_tenant_weights_give_a_proportional_share():
    h = Harness(tenant_weights={"heavy": 3})
    sub_many(h, [f"h{i}" for i in range(400)], tenant="heavy")
    sub_many(h, [f"l{i}" for i in range(400)], tenant="light")
    sub_many(h, [f"x{i}" for i in range(400)], queue="even", tenant="x")
    sub_many(h, [f"y{i}" for i in range(400)], queue="even", tenant="y")
    h.hello(W1)
    order = drive(h, [W1], lambda order: len(order) == 400)
    assert sum(j.startswith("h") for j in order) == 300
    assert sum(j.startswith("l") for j in order) == 100
    assert order[:8] == ["h0", "h1", "h2", "l0", "h3", "h4", "h5", "l1"]
    h.hello(W2, queues=("even",))
    order = drive(h, [W2], lambda order: len(order) == 200)
    assert sum(j.startswith("x") for j in order) == 100  # unweighted: turn about


def test_a_new_tenant_gets_its_turn_in_a_level_already_busy():
    h = Harness()
    h.hello(W1)
    sub_many(h, [f"a{i}" for i in range(50)], tenant="A")  # a0 runs at once
    order = drive(h, [W1], lambda order: len(order) == 10)
    sub(h, "b0", tenant="B")
    order = drive(h, [W1], lambda order: "b0" in order)
    assert len(order) <= 2


# ================================================================================================
# ABANDON: when a job ends, every worker still on an attempt of it is told to stop
# ================================================================================================


def test_abandon_when_another_attempt_finished_the_job_and_the_stop_is_no_failure():
    h = Harness()
    h.hello(W1)
    h.hello(W2)
    sub(h, "j", timeout=5.0)
    h.job_to(W1)
    h.advance(5.0)
    assert ids(h.jobs_to(W2)) == [("j", 2)]
    h.result(W2, "j", 2, payload=[b"from w2"])
    assert abandons(h, W1) == [p.Abandon("j", 1, "done")]
    assert abandons(h, W2) == []  # it answered: it holds nothing
    assert h.snap()["totals"]["abandoned"] == 1
    assert worker_row(h, W1)["state"] == "busy"
    fail(h, W1, "j", 1, "Cancelled: job j was done", then="abandoned")
    row = worker_row(h, W1)
    assert (row["state"], row["failed"]) == ("idle", 0)
    info = h.info("j")
    assert (info["state"], info["error"]) == ("done", "no answer within 5s (attempt 1 of 3 on w1)")
    assert h.snap()["totals"]["failed"] == 0
    assert replies(h, C1) == [p.Result("j", [b"from w2"])]


def test_abandon_to_every_holder_when_the_job_fails_after_a_timeout():
    h = Harness(tries=2)
    h.hello(W1)
    h.hello(W2)
    sub(h, "j", timeout=5.0)
    h.job_to(W1)
    h.advance(5.0)
    h.job_to(W2)
    fail(h, W2, "j", 2, "ValueError: no")
    assert abandons(h, W1) == [p.Abandon("j", 1, "failed")]
    assert abandons(h, W2) == []
    (failed,) = replies(h, C1)
    assert isinstance(failed, p.Failed) and failed.error == "ValueError: no"
    fail(h, W1, "j", 1, "Cancelled", then="abandoned")
    assert h.info("j")["error"] == "ValueError: no"  # the stop did not overwrite it
    assert worker_row(h, W1)["failed"] == 0 and worker_row(h, W2)["failed"] == 1

    h2 = Harness(tries=2)  # both attempts time out: both holders are told
    h2.hello(W1)
    h2.hello(W2)
    sub(h2, "k", timeout=5.0)
    h2.advance(5.0)
    h2.advance(5.0)
    assert abandons(h2, W1) == [p.Abandon("k", 1, "failed")]
    assert abandons(h2, W2) == [p.Abandon("k", 2, "failed")]
    assert h2.snap()["totals"]["abandoned"] == 2


def test_abandon_when_a_running_job_is_cancelled():
    h = Harness()
    h.hello(W1)
    sub(h, "j")
    h.job_to(W1)
    h.ref(C2, p.CANCEL, "j")
    assert abandons(h, W1) == [p.Abandon("j", 1, "cancelled")]
    fail(h, W1, "j", 1, "Cancelled: job j was cancelled", then="abandoned")
    totals = h.snap()["totals"]
    assert (totals["cancelled"], totals["failed"], totals["abandoned"]) == (1, 0, 1)
    assert (worker_row(h, W1)["state"], worker_row(h, W1)["failed"]) == ("idle", 0)
    assert h.info("j")["state"] == "cancelled"
    assert replies(h, C1) == [p.Cancelled("j")]


def test_abandon_at_hello_for_a_claimed_job_that_ended_meanwhile():
    h = Harness()
    h.hello(W1)
    sub(h, "j")
    h.job_to(W1)
    token = h.token("j", 1)
    h.ref(C2, p.CANCEL, "j")
    h.core.drop_worker(h.core.workers.get(W1), "went away")  # it reconnects, job in hand
    h.to_worker(W1)
    h.hello(W1, job_id="j", attempt=1, token=token)
    assert abandons(h, W1) == [p.Abandon("j", 1, "cancelled")]
    h.hello(W2, job_id="gone", attempt=1, token=b"0" * 32)
    assert abandons(h, W2) == [p.Abandon("gone", 1, "unknown")]
    h.result(W1, "j", 1, token=token)  # it answers anyway: dropped
    assert h.info("j")["state"] == "cancelled" and h.snap()["totals"]["duplicates"] == 1


def test_no_abandon_for_a_job_that_ends_while_nobody_runs_it():
    h = Harness()
    h.hello(W1)
    sub(h, "j")
    h.job_to(W1)
    h.result(W1, "j", 1)
    sub(h, "queued", queue="none")
    h.ref(C2, p.CANCEL, "queued")
    assert abandons(h, W1) == []
    assert h.snap()["totals"]["abandoned"] == 0


# ================================================================================================
# progress
# ================================================================================================


def test_progress_latest_wins_only_from_the_holder_and_reaches_watchers():
    h = Harness()
    h.hello(W1)
    h.hello(W2)
    sub(h, "j", timeout=5.0)
    h.job_to(W1)
    h.core.on_client(C2, p.encode_watch("j"))
    assert replies(h, C2) == []  # nothing reported yet
    progress(h, W1, "j", 1, {"fraction": 0.2})
    progress(h, W1, "j", 1, {"fraction": 0.5, "message": "halfway", "meta": {"rows": 50}})
    got = replies(h, C2)
    assert [type(r) for r in got] == [p.Progress, p.Progress]
    assert got[1].progress["fraction"] == 0.5 and got[1].progress["message"] == "halfway"
    info = h.info("j")["progress"]
    assert (info["fraction"], info["message"], info["meta"], info["attempt"]) == (
        0.5, "halfway", {"rows": 50}, 1)
    assert worker_row(h, W1)["progress"]["fraction"] == 0.5  # shown in the status too

    h.advance(5.0)  # attempt 1 timed out: W2 holds attempt 2
    h.job_to(W2)
    progress(h, W1, "j", 1, {"fraction": 0.9})  # no longer the holder: ignored
    assert replies(h, C2) == [] and h.info("j")["progress"]["fraction"] == 0.5
    progress(h, W2, "j", 2, {"fraction": 0.1}, token=b"forged")  # not its token: ignored
    assert replies(h, C2) == [] and h.snap()["bad_messages"]
    progress(h, W2, "j", 2, {"fraction": 0.1})
    (news,) = replies(h, C2)
    assert news == p.Progress("j", {"fraction": 0.1, "at": pytest.approx(h.wall), "attempt": 2})
    assert h.info("j")["progress"]["attempt"] == 2

    h.core.on_client(C3, p.encode_watch("j"))  # a new watcher hears the latest at once
    assert [r.progress["fraction"] for r in replies(h, C3)] == [0.1]
    h.result(W2, "j", 2)
    h.core.on_client(C1, p.encode_watch("j"))  # ended: the last report, no more watching
    assert [r.progress["fraction"] for r in replies(h, C1) if isinstance(r, p.Progress)] == [0.1]


def test_progress_is_bounded_as_sent_and_checked_field_by_field():
    h = Harness()
    h.hello(W1)
    sub(h, "j")
    h.job_to(W1)
    h.core.on_client(C2, p.encode_watch("j"))
    # Raw UTF-8 under the limit stays under it as sent on to clients (no ASCII escapes).
    emoji = "\U0001F600" * 1000  # 4000 bytes of UTF-8, 12000 as ASCII escapes
    token = h.token("j", 1)
    h.core.on_worker(W1, p.encode_worker_progress(
        "j", 1, token, p.json.dumps({"message": emoji}, ensure_ascii=False).encode()))
    (news,) = h.raw_to_client(C2)
    assert len(news[1]) < p.MAX_INFO_BYTES and p.decode_reply(news).progress["message"] == emoji
    bad_before = sum(h.snap()["bad_messages"].values())
    for report in ({"fraction": 2}, {"fraction": "half"}, {"message": 5}, {"meta": [1]},
                   {"meta": {"n": 1e400}}, {"meta": {"n": [1e5] * 500}}):
        body = p.json.dumps(report).encode() if "1e400" not in str(report) else b'{"meta":{"n":1e400}}'
        h.core.on_worker(W1, p.encode_worker_progress("j", 1, token, body))
    assert h.raw_to_client(C2) == [] and h.info("j")["progress"]["message"] == emoji
    assert sum(h.snap()["bad_messages"].values()) == bad_before + 6


def test_replies_come_in_request_order_and_a_cancel_tells_its_outcome_first():
    """docs/protocol.md 4.3 "Reply order"."""
    h = Harness()
    sub(h, "a", queue="later-q")
    sub(h, "b", queue="later-q", client=C2)  # C2 waits for b: its CANCEL causes an outcome
    replies(h, C1)
    replies(h, C2)
    h.ref(C2, p.QUERY, "a")
    h.ref(C2, p.CANCEL, "b")
    h.ref(C2, p.QUERY, "nope")
    h.core.on_client(C2, p.encode_watch("a"))
    h.ref(C2, p.QUERY, "b")
    got = replies(h, C2)
    assert [type(r).__name__ for r in got] == ["Info", "Cancelled", "Info", "Unknown", "Info"]
    assert [r.info["id"] for r in got if isinstance(r, p.Info)] == ["a", "b", "b"]
    assert [r.info["state"] for r in got if isinstance(r, p.Info)][1:] == ["cancelled"] * 2


def test_started_is_the_first_dispatch_and_survives_a_give_back_and_a_retry():
    """docs/protocol.md 4.2: ``started`` is when the first attempt was dispatched."""
    h = Harness()
    h.hello(W1)
    h.hello(W2)
    sub(h, "j", tries=3, backoff=0)
    h.job_to(W1)
    first = h.info("j")["started"]
    h.advance(1.0)
    h.give_back(W1, "j", 1)
    h.job_to(W2)
    h.advance(1.0)
    fail(h, W2, "j", 1)
    assert h.info("j")["started"] == first and h.info("j")["attempt"] >= 1


def test_unwait_stops_progress_reports():
    h = Harness()
    h.hello(W1)
    sub(h, "j")
    h.job_to(W1)
    h.core.on_client(C2, p.encode_watch("j"))
    progress(h, W1, "j", 1, {"fraction": 0.3})
    assert len(replies(h, C2)) == 1
    h.core.on_client(C2, p.encode_unwait(["j"]))
    progress(h, W1, "j", 1, {"fraction": 0.4})
    assert replies(h, C2) == []


def test_watching_an_unknown_job_says_unknown():
    h = Harness()
    h.core.on_client(C2, p.encode_watch("nope"))
    assert replies(h, C2) == [p.Unknown("nope")]


# ================================================================================================
# list jobs, requeue, purge
# ================================================================================================


def test_list_jobs_filters_newest_first_with_limit_and_cursor_paging():
    h = Harness()
    h.hello(W1, queues=("done-q",))
    for i in range(25):
        sub(h, f"q{i:02d}", queue="waits", priority=i % 10, tenant="t" if i % 2 else None)
    for i in range(5):
        sub(h, f"d{i}", queue="done-q")
    drive(h, [W1], lambda order: len(order) == 5)
    page = list_jobs(h)
    assert [j["id"] for j in page["jobs"]] == [f"d{i}" for i in range(4, -1, -1)] + [
        f"q{i:02d}" for i in range(24, -1, -1)]
    assert page["cursor"] is None
    row = next(j for j in page["jobs"] if j["id"] == "q03")
    assert {k: row[k] for k in ("queue", "state", "attempt", "tries", "priority", "tenant")} == {
        "queue": "waits", "state": "queued", "attempt": 0, "tries": 3, "priority": 3, "tenant": "t"}
    assert [j["id"] for j in list_jobs(h, state="done")["jobs"]] == [f"d{i}" for i in range(4, -1, -1)]
    assert len(list_jobs(h, queue="waits")["jobs"]) == 25
    assert list_jobs(h, queue="waits", state="done")["jobs"] == []
    # paging through the queued ones, 10 at a time: every job once, in order
    seen, cursor, pages = [], 0, 0
    while cursor is not None:
        page = list_jobs(h, state="queued", limit=10, cursor=cursor)
        assert len(page["jobs"]) <= 10
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["cursor"]
        pages += 1
    assert seen == [f"q{i:02d}" for i in range(24, -1, -1)] and pages == 3


@pytest.mark.parametrize("query, problem", [
    ({"state": "bogus"}, "state must be one of"),
    ({"queue": 7}, "queue must be a name"),
    ({"limit": 0}, "limit must be"),
    ({"limit": admin.MAX_PAGE + 1}, "limit must be"),
    ({"limit": True}, "limit must be"),
    ({"cursor": -1}, "cursor must be"),
    ({"cursor": "10"}, "cursor must be"),
])
def test_list_jobs_says_what_is_wrong_with_a_bad_query(query, problem):
    h = Harness()
    sub(h, "j")
    page = list_jobs(h, **query)
    assert page["jobs"] == [] and page["cursor"] is None
    assert problem in page["error"]


def test_requeue_runs_ended_jobs_again_with_fresh_tries_and_keeps_their_history():
    h = Harness(tries=2)
    h.hello(W1)
    sub(h, "failed")
    fail(h, W1, "failed", 1, "E1: first")
    fail(h, W1, "failed", 2, "E2: second\ntraceback")
    sub(h, "done")
    h.result(W1, "done", 1)
    sub(h, "cancelled", queue="idle-q")
    h.ref(C2, p.CANCEL, "cancelled")
    sub(h, "expired", queue="idle-q", expires=1.0)
    h.advance(1.0)
    sub(h, "queued", queue="idle-q")
    h.worker_out.clear()
    replies(h, C2)

    report = requeue(h, "failed", "cancelled", "expired", "done", "queued", "ghost")
    assert report == {"requeued": ["failed", "cancelled", "expired"], "unknown": ["ghost"],
                      "skipped": {"done": "done", "queued": "queued"}}
    assert h.snap()["totals"]["requeued"] == 3
    info = h.info("failed")
    assert (info["state"], info["attempt"], info["workers_tried"], info["error"]) == (
        "running", 1, ["w1"], None)  # ran again at once, attempt 1 of 2 again
    assert info["history"] == [{"state": "failed", "reason": "error", "error": "E2: second",
                                "attempts": 2, "finished": pytest.approx(WALL0)}]
    assert h.info("expired")["state"] == "queued"  # runs whatever its old expiry said
    assert h.info("expired")["history"][0]["state"] == "expired"
    assert h.info("cancelled")["history"][0]["reason"] == "cancelled"

    h.ref(C2, p.WAIT, "failed")  # a waiter hears the new outcome
    fail(h, W1, "failed", 1, "E3")
    fail(h, W1, "failed", 2, "E4")  # both fresh tries used
    assert replies(h, C2) == [p.Failed("failed", "error", "E4")]
    assert requeue(h, "failed")["requeued"] == ["failed"]
    history = h.info("failed")["history"]
    assert [e["error"] for e in history] == ["E2: second", "E4"]
    h.result(W1, "failed", 1, payload=[b"third time"])
    assert h.info("failed")["state"] == "done"
    assert requeue(h, "failed") == {"requeued": [], "unknown": [], "skipped": {"failed": "done"}}


def test_an_attempt_from_before_a_requeue_cannot_end_the_requeued_job():
    h = Harness()
    h.hello(W1)
    h.hello(W2)
    sub(h, "j")
    h.job_to(W1)
    old = h.token("j", 1)
    h.ref(C2, p.CANCEL, "j")  # W1 is told to abandon, but answers anyway, later
    assert requeue(h, "j")["requeued"] == ["j"]
    h.job_to(W2)
    assert h.info("j")["state"] == "running"
    h.result(W1, "j", 1, payload=(b"stale",), token=old)
    info = h.info("j")
    assert (info["state"], info["worker"]) == ("running", "w2")  # W2's attempt is the one
    assert h.snap()["totals"]["duplicates"] == 1
    h.result(W2, "j", 1, payload=(b"fresh",))
    assert h.core.jobs["j"].result == [b"fresh"]


def test_requeued_is_told_only_after_the_commit_and_refused_while_the_journal_fails():
    h = Harness()
    sub(h, "a", queue="later-q")
    sub(h, "b", queue="later-q")
    h.ref(C2, p.CANCEL, "a")
    h.ref(C2, p.CANCEL, "b")
    h.core.on_client(C3, p.encode_requeue(["a"]))
    assert replies(h, C3) == []  # not journaled yet
    h.core.flush()
    assert [r.report["requeued"] for r in replies(h, C3)] == [["a"]]
    h.core.commits.problem = "disk full"  # as the journal's write errors set it
    h.core.on_client(C3, p.encode_requeue(["b"]))
    (report,) = replies(h, C3)  # nothing changed: told at once
    assert report.report["skipped"] == {"b": "journal unavailable: disk full"}
    assert h.info("b")["state"] == "cancelled"


def test_purge_cancels_queued_and_scheduled_jobs_but_not_running_ones():
    h = Harness()
    h.hello(W1, queues=("q",))
    sub(h, "run", queue="q")
    assert ids(h.jobs_to(W1)) == [("run", 1)]
    for i in range(5):
        sub(h, f"queued{i}", queue="q", priority=i)
    for i in range(3):
        sub(h, f"later{i}", queue="q", delay=100.0)
    sub(h, "other", queue="keep")
    h.ref(C2, p.WAIT, "queued0")
    assert purge(h, "q") == (8, 0)
    assert h.info("run")["state"] == "running"
    assert all(h.info(f"queued{i}")["state"] == "cancelled" for i in range(5))
    assert all(h.info(f"later{i}")["state"] == "cancelled" for i in range(3))
    assert h.info("other")["state"] == "queued"
    assert replies(h, C2) == [p.Cancelled("queued0")]
    snap = h.snap()
    assert snap["queued"] == 1 and snap["scheduled"] == 0 and snap["totals"]["cancelled"] == 8
    assert purge(h, "q") == (0, 0) and purge(h, "nothing-here") == (0, 0)
    h.advance(200.0)
    h.result(W1, "run", 1)
    assert h.jobs_to(W1) == []  # nothing purged runs later


def test_purge_of_more_than_one_step_says_how_many_are_left():
    h = Harness()
    n = admin.PURGE_STEP * 2 + 500
    sub_many(h, [f"j{i}" for i in range(n - 100)], queue="big")
    sub_many(h, [f"s{i}" for i in range(100)], queue="big", delay=60.0)
    steps = []
    while True:
        cancelled, left = purge(h, "big")
        steps.append((cancelled, left))
        if not left:
            break
    assert steps == [(admin.PURGE_STEP, n - admin.PURGE_STEP),
                     (admin.PURGE_STEP, n - 2 * admin.PURGE_STEP), (500, 0)]
    assert h.snap()["totals"]["cancelled"] == n and h.snap()["queued"] == 0


# ================================================================================================
# restart through the sqlite journal
# ================================================================================================


class Journaled(Harness):
    """A Harness whose core writes to a sqlite journal, started at a given time (restored
    from that journal when it already holds jobs)."""

    def __init__(self, path: Path, at: float = 0.0, **overrides: Any) -> None:
        super().__init__(**overrides)
        self.core = BrokerCore(self.cfg, lambda rid, frames: self.client_out.append((rid, list(frames))),
                               self._to_worker, SqliteJournal(path))
        self.mono, self.wall = T0 + at, WALL0 + at
        self.core.set_time(self.mono, self.wall)
        self.counts = self.core.restore(self.core.journal.load())
        self.core.start_recovery()
        self.core.tick()


def journaled(path: Path, **overrides: Any) -> Journaled:
    h = Journaled(path, **overrides)
    h.overrides = overrides  # type: ignore[attr-defined]
    return h


def restart(h: Journaled, after: float) -> Journaled:
    h.core.flush()
    h.core.journal.db.close()  # type: ignore[attr-defined]
    h.core.journal._unlock()  # type: ignore[attr-defined]  # and its lock goes with the process
    again = Journaled(h.core.journal.path, h.wall - WALL0 + after, **h.overrides)  # type: ignore[attr-defined]
    again.overrides = h.overrides  # type: ignore[attr-defined]
    again.tokens.update(h.tokens)
    return again


def test_restart_keeps_scheduled_jobs_and_expiry_times(tmp_path):
    h = journaled(tmp_path / "j.db")
    sub(h, "later", delay=100.0)
    sub(h, "eta-expires", delay=100.0, expires=50.0)
    sub(h, "expires", queue="nobody", expires=30.0)
    h = restart(h, 10.0)
    assert h.counts == {"queued": 1, "interrupted": 0, "scheduled": 2, "finished": 0}
    assert h.info("later")["runs_at"] == pytest.approx(WALL0 + 100.0)
    assert h.info("expires")["expires_at"] == pytest.approx(WALL0 + 30.0)
    assert h.snap()["scheduled"] == 2
    h.hello(W1)
    h.advance(19.99)
    assert h.info("expires")["state"] == "queued"
    h.advance(0.01)
    assert h.info("expires")["state"] == "expired"
    h.advance(20.0)
    assert h.info("eta-expires")["state"] == "expired"
    h.advance(49.99)  # at WALL0 + 99.99
    assert h.jobs_to(W1) == []
    h.advance(0.01)
    assert ids(h.jobs_to(W1)) == [("later", 1)]


def test_restart_keeps_priority_and_tenant_order(tmp_path):
    h = journaled(tmp_path / "j.db")
    sub_many(h, [f"a{i}" for i in range(20)], tenant="A")
    sub_many(h, [f"b{i}" for i in range(3)], tenant="B")
    sub(h, "urgent", priority=9)
    sub(h, "whenever", priority=0)
    h = restart(h, 5.0)
    h.hello(W1)
    order = drive(h, [W1], lambda order: len(order) == 25)
    assert order[:7] == ["urgent", "a0", "b0", "a1", "b1", "a2", "b2"]
    assert order[7:24] == [f"a{i}" for i in range(3, 20)] and order[24] == "whenever"


def test_restart_keeps_a_retry_waiting_out_its_backoff(tmp_path):
    h = jitter(journaled(tmp_path / "j.db", backoff=20.0, tries=3), 1.0)
    h.hello(W1)
    sub(h, "bo")
    h.job_to(W1)
    fail(h, W1, "bo", 1, "E1")
    assert runs_in(h, "bo") == pytest.approx(20.0)
    h = restart(h, 5.0)
    assert h.counts["scheduled"] == 1
    info = h.info("bo")
    assert (info["state"], info["attempt"], info["error"]) == ("scheduled", 1, "E1")
    assert info["runs_at"] == pytest.approx(WALL0 + 20.0)
    h.hello(W1)
    h.advance(14.99)
    assert h.jobs_to(W1) == []
    h.advance(0.01)
    assert ids(h.jobs_to(W1)) == [("bo", 2)]


def test_restart_keeps_progress_and_the_worker_claims_its_job(tmp_path):
    h = journaled(tmp_path / "j.db", heartbeat=1.0)
    h.hello(W1)
    sub(h, "p")
    h.job_to(W1)
    progress(h, W1, "p", 1, {"fraction": 0.75, "message": "nearly"})
    h = restart(h, 1.0)
    assert h.counts["interrupted"] == 1
    assert h.info("p")["progress"]["fraction"] == 0.75
    h.hello(W1, job_id="p", attempt=1)  # the same worker, still running it
    assert h.info("p")["state"] == "running" and h.info("p")["progress"]["message"] == "nearly"
    h.result(W1, "p", 1, payload=[b"once"])
    info = h.info("p")
    assert (info["state"], info["attempt"]) == ("done", 1)


def test_restart_keeps_history_after_requeue_and_ended_outcomes(tmp_path):
    h = journaled(tmp_path / "j.db", tries=1)
    h.hello(W1)
    sub(h, "rq")
    fail(h, W1, "rq", 1, "E1: broken")
    sub(h, "fl")
    fail(h, W1, "fl", 1, "E2: also broken")
    sub(h, "ex", queue="nobody", expires=1.0)
    h.advance(1.0)
    assert requeue(h, "rq")["requeued"] == ["rq"]
    h.result(W1, "rq", 1, payload=[b"fixed"])
    h = restart(h, 2.0)
    info = h.info("rq")
    assert (info["state"], [e["error"] for e in info["history"]]) == ("done", ["E1: broken"])
    fl = h.info("fl")
    assert (fl["state"], fl["reason"], fl["error"]) == ("failed", "error", "E2: also broken")
    ex = h.info("ex")
    assert (ex["state"], ex["reason"]) == ("expired", "expired")
    h.ref(C2, p.WAIT, "fl")
    h.ref(C2, p.WAIT, "rq")
    assert replies(h, C2) == [p.Failed("fl", "error", "E2: also broken"), p.Result("rq", [b"fixed"])]
    assert [f["id"] for f in h.snap()["recent_failures"]] == ["fl"]  # rq was requeued, then done


def test_restart_with_a_requeued_job_still_waiting_runs_it_once(tmp_path):
    h = journaled(tmp_path / "j.db", tries=1)
    h.hello(W1)
    sub(h, "rq")
    fail(h, W1, "rq", 1, "E1")
    assert requeue(h, "rq")["requeued"] == ["rq"]
    h.give_back(W1, "rq", 1)  # the worker hands it back: it waits, queued
    h = restart(h, 1.0)
    info = h.info("rq")
    assert (info["state"], info["attempt"], len(info["history"])) == ("queued", 0, 1)
    h.hello(W2)
    assert ids(h.jobs_to(W2)) == [("rq", 1)]


def test_a_requeued_expired_job_is_not_expired_again_by_a_restart(tmp_path):
    h = journaled(tmp_path / "j.db")
    sub(h, "ex", queue="later-q", expires=1.0)
    h.advance(1.0)
    assert requeue(h, "ex")["requeued"] == ["ex"]
    h = restart(h, 1.0)
    assert h.info("ex")["state"] == "queued"
    h.hello(W1, queues=("later-q",))
    assert ids(h.jobs_to(W1)) == [("ex", 1)]


def test_a_queued_retry_restored_after_a_restart_is_offered_after_the_wait(tmp_path):
    h = journaled(tmp_path / "j.db", retry_elsewhere_wait=5.0)
    h.hello(W1)
    h.hello(W2)
    sub(h, "r")
    sub(h, "long")
    fail(h, W1, "r", 1)  # waits for W2, busy with "long"
    assert h.info("r")["state"] == "queued"
    h = restart(h, 1.0)
    h.hello(W2, job_id="long", attempt=1)  # still running "long"
    h.hello(W1)  # tried "r": leaves it for W2, for retry_elsewhere_wait at most
    h.advance(6.0)
    assert ids(h.jobs_to(W1)) == [("r", 2)]


def test_a_job_running_at_a_restart_is_claimed_not_expired(tmp_path):
    h = journaled(tmp_path / "j.db", heartbeat=1.0)
    h.hello(W1)
    sub(h, "e", expires=2.0)
    h.job_to(W1)
    for _ in range(5):  # past its expiry, still running (and beating): fine
        h.advance(1.0)
        h.beat(W1)
    assert h.info("e")["state"] == "running"
    h = restart(h, 0.5)
    h.hello(W1, job_id="e", attempt=1)
    assert h.info("e")["state"] == "running"
    h.result(W1, "e", 1)
    assert h.info("e")["state"] == "done"
