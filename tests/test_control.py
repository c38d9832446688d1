"""Remote control through the broker, driven through BrokerCore with a fake clock (and, for
restarts, a real sqlite journal in a temp folder): pausing and resuming a queue, draining
workers, and what bad requests get. End-to-end versions with real processes are in
test_control_e2e.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from test_broker_core import C1, C2, C3, W1, W2, W3, Harness, ids
from test_features import fail, journaled, replies, restart, sub

from respworkers import protocol as p
from respworkers.broker import admin
from respworkers.broker.journal import SqliteJournal

pytestmark = pytest.mark.timeout(60)


def pause(h: Harness, queue: str) -> p.Paused:
    h.core.on_client(C3, p.encode_pause(queue))
    h.core.flush()  # a change is told once journaled
    (reply,) = replies(h, C3)
    assert isinstance(reply, p.Paused) and reply.queue == queue, reply
    return reply


def resume(h: Harness, queue: str) -> p.Resumed:
    h.core.on_client(C3, p.encode_resume(queue))
    h.core.flush()
    (reply,) = replies(h, C3)
    assert isinstance(reply, p.Resumed) and reply.queue == queue, reply
    return reply


def drain(h: Harness, workers: tuple[str, ...] = (), hosts: tuple[str, ...] = (),
          everyone: bool = False) -> dict[str, Any]:
    h.core.on_client(C3, p.encode_drain(workers, hosts, everyone))
    (reply,) = replies(h, C3)
    assert isinstance(reply, p.Draining), reply
    return reply.report


def drains(h: Harness, wid: bytes) -> int:
    """DRAIN messages sent to one worker since the last look (others are discarded)."""
    return sum(isinstance(m, p.DrainOrder) for m in h.to_worker(wid))


def queue_row(h: Harness, queue: str) -> dict[str, Any]:
    return h.snap()["queues"][queue]


# ================================================================================================
# pause and resume
# ================================================================================================


def test_a_paused_queue_takes_and_keeps_jobs_and_resume_dispatches_at_once():
    h = Harness()
    h.hello(W1, queues=("q",))
    h.hello(W2, queues=("q",))
    reply = pause(h, "q")
    assert (reply.queued, reply.changed) == (0, True)
    for i in range(5):
        sub(h, f"j{i}", queue="q")
    assert h.jobs_to(W1) == [] and h.jobs_to(W2) == []
    assert all(h.info(f"j{i}")["state"] == "queued" for i in range(5))
    row = queue_row(h, "q")
    assert (row["paused"], row["queued"], row["idle"], row["running"]) == (True, 5, 2, 0)
    assert h.snap()["paused"] == ["q"]
    reply = resume(h, "q")
    assert (reply.dispatched, reply.queued, reply.changed) == (2, 3, True)
    assert ids(h.jobs_to(W1)) == [("j0", 1)] and ids(h.jobs_to(W2)) == [("j1", 1)]
    assert queue_row(h, "q")["paused"] is False and h.snap()["paused"] == []
    h.result(W1, "j0", 1)
    assert ids(h.jobs_to(W1)) == [("j2", 1)]  # dispatch as usual from now on


def test_a_worker_serving_several_queues_still_gets_the_other_queues_jobs():
    h = Harness()
    h.hello(W1, queues=("a", "b"))
    pause(h, "a")
    sub(h, "a1", queue="a", priority=9)  # higher priority, but its queue is paused
    sub(h, "b1", queue="b")
    sub(h, "b2", queue="b")
    assert ids(h.jobs_to(W1)) == [("b1", 1)]
    h.result(W1, "b1", 1)
    assert ids(h.jobs_to(W1)) == [("b2", 1)]
    h.result(W1, "b2", 1)
    assert h.jobs_to(W1) == [] and h.worker_state(W1) == "idle"
    assert resume(h, "a").dispatched == 1
    assert ids(h.jobs_to(W1)) == [("a1", 1)]


def test_in_a_paused_queue_delays_come_due_expiries_apply_and_running_jobs_finish():
    h = Harness()
    h.hello(W1, queues=("q",))
    h.hello(W2, queues=("q",))
    sub(h, "running", queue="q")
    assert ids(h.jobs_to(W1)) == [("running", 1)]
    pause(h, "q")
    sub(h, "later", queue="q", delay=10.0)
    sub(h, "short", queue="q", expires=5.0)
    h.ref(C2, p.WAIT, "short")
    assert h.info("later")["state"] == "scheduled"
    h.advance(5.0)
    assert h.info("short")["state"] == "expired"
    assert replies(h, C2) == [p.Expired("short")]
    h.advance(5.0)
    assert h.info("later")["state"] == "queued"  # due: queued, not dispatched
    assert h.jobs_to(W2) == []
    h.result(W1, "running", 1)  # the attempt under way finishes normally
    assert h.info("running")["state"] == "done"
    assert h.jobs_to(W1) == [] and h.jobs_to(W2) == []
    row = queue_row(h, "q")
    assert (row["queued"], row["scheduled"], row["idle"]) == (1, 0, 2)
    assert resume(h, "q").dispatched == 1


def test_a_retry_or_give_back_in_a_paused_queue_waits_for_resume():
    h = Harness(tries=3, retry_elsewhere_wait=1.0)
    h.hello(W1, queues=("q",))
    h.hello(W2, queues=("q",))
    sub(h, "r", queue="q")
    sub(h, "g", queue="q")
    assert ids(h.jobs_to(W1)) == [("r", 1)] and ids(h.jobs_to(W2)) == [("g", 1)]
    pause(h, "q")
    fail(h, W1, "r", 1)  # tries left, no backoff: queued at once, but not handed out
    h.give_back(W2, "g", 1)
    h.advance(2.0)  # past retry_elsewhere_wait: the offer goes nowhere either
    assert h.jobs_to(W1) == [] and h.jobs_to(W2) == []
    assert h.info("r")["state"] == "queued" and h.info("g")["state"] == "queued"
    h.hello(W3, queues=("q",))
    assert h.jobs_to(W3) == []
    assert resume(h, "q").dispatched == 2
    sent = ids(h.jobs_to(W1)) + ids(h.jobs_to(W3))
    assert sorted(sent) == [("g", 1), ("r", 2)]  # the give-back did not count a try


def test_pause_and_resume_say_whether_they_changed_anything_and_are_told_once_journaled():
    h = Harness()
    h.core.on_client(C3, p.encode_pause("q"))
    assert replies(h, C3) == []  # the change waits for the commit
    h.core.flush()
    assert replies(h, C3) == [p.Paused("q", 0, True)]
    h.core.on_client(C3, p.encode_pause("q"))  # nothing changes: told at once
    assert replies(h, C3) == [p.Paused("q", 0, False)]
    sub(h, "x", queue="q")
    assert pause(h, "q") == p.Paused("q", 1, False)
    assert resume(h, "q") == p.Resumed("q", 0, 1, True)  # nobody serves it
    h.core.on_client(C3, p.encode_resume("q"))
    assert replies(h, C3) == [p.Resumed("q", 0, 1, False)]
    h.core.on_client(C3, p.encode_resume("never-used"))
    assert replies(h, C3) == [p.Resumed("never-used", 0, 0, False)]


def test_an_unused_queue_may_be_paused_and_shows_in_the_status():
    h = Harness()
    pause(h, "later")
    snap = h.snap()
    assert snap["paused"] == ["later"]
    assert snap["queues"]["later"] == {"queued": 0, "scheduled": 0, "running": 0, "workers": 0,
                                       "idle": 0, "oldest_wait": None, "paused": True}
    h.hello(W1, queues=("later",))
    sub(h, "x", queue="later")
    assert h.jobs_to(W1) == []
    row = queue_row(h, "later")
    assert (row["queued"], row["workers"], row["idle"]) == (1, 1, 1)


def test_no_more_than_max_paused_queues(monkeypatch):
    monkeypatch.setattr(admin, "MAX_PAUSED", 2)
    h = Harness()
    pause(h, "a")
    pause(h, "b")
    assert pause(h, "a").changed is False  # already paused: not over the limit
    h.core.on_client(C3, p.encode_pause("c"))
    (reply,) = replies(h, C3)
    assert isinstance(reply, p.Invalid) and "too many paused queues" in reply.reason
    assert h.snap()["paused"] == ["a", "b"]
    assert h.snap()["bad_messages"] == {"clients: too many paused queues": 1}
    resume(h, "a")
    assert pause(h, "c").changed is True


# ================================================================================================
# drain
# ================================================================================================


def test_draining_an_idle_worker_sends_it_drain_and_it_gets_no_job():
    h = Harness()
    h.hello(W1)
    h.hello(W2)
    h.clear()
    report = drain(h, workers=("w1",))
    assert report == {"asked": [{"name": "w1", "job": None}], "unknown": []}
    assert drains(h, W1) == 1 and drains(h, W2) == 0
    assert h.worker_state(W1) == "draining"
    row = h.snap()["queues"]["default"]
    assert (row["workers"], row["idle"]) == (2, 1)
    sub(h, "j")
    assert h.jobs_to(W1) == [] and ids(h.jobs_to(W2)) == [("j", 1)]
    h.core.on_worker(W1, p.BYE_FRAMES)  # what the worker does next
    assert h.worker_state(W1) is None
    assert h.snap()["totals"]["drained"] == 1


def test_a_busy_worker_drained_delivers_its_result_uncharged_then_leaves():
    h = Harness(tries=1)
    h.hello(W1)
    sub(h, "j")
    sub(h, "next")
    assert ids(h.jobs_to(W1)) == [("j", 1)]
    report = drain(h, workers=("w1",))
    assert report == {"asked": [{"name": "w1", "job": "j"}], "unknown": []}
    assert drains(h, W1) == 1
    row = next(w for w in h.snap()["workers"] if w["name"] == "w1")
    assert (row["state"], row["job"]) == ("draining", "j")
    h.result(W1, "j", 1, ready=False)  # as a worker told to drain answers
    assert [type(m) for m in h.to_worker(W1)] == [p.Ack]  # no job: it is leaving
    info = h.info("j")
    assert (info["state"], info["attempt"]) == ("done", 1)
    assert replies(h, C1)[-1] == p.Result("j", [b"out"])
    h.core.on_worker(W1, p.BYE_FRAMES)
    assert h.info("next")["state"] == "queued"  # nothing lost, nothing charged
    h.hello(W2)
    assert ids(h.jobs_to(W2)) == [("next", 1)]
    totals = h.snap()["totals"]
    assert (totals["retried"], totals["failed"], totals["lost_workers"]) == (0, 0, 0)


def test_a_drained_worker_whose_answer_crossed_the_drain_gets_no_job():
    h = Harness()
    h.hello(W1)
    sub(h, "j")
    sub(h, "k")
    h.job_to(W1)
    drain(h, workers=("w1",))
    h.result(W1, "j", 1, ready=True)  # sent before it read DRAIN
    assert [type(m) for m in h.to_worker(W1)] == [p.DrainOrder, p.Ack]
    assert h.info("k")["state"] == "queued" and h.worker_state(W1) == "draining"


def test_drain_by_host_all_and_unknown_names():
    h = Harness()
    h.hello(W1, info={"name": "a:1", "host": "a"})
    h.hello(W2, info={"name": "a:2", "host": "a"})
    h.hello(W3, info={"name": "b:3", "host": "b"})
    h.clear()
    report = drain(h, workers=("b:3", "zz:9"), hosts=("a", "nowhere"))
    assert sorted(w["name"] for w in report["asked"]) == ["a:1", "a:2", "b:3"]
    assert report["unknown"] == ["zz:9", "nowhere"]
    assert [drains(h, w) for w in (W1, W2, W3)] == [1, 1, 1]
    assert h.snap()["totals"]["drained"] == 3
    report = drain(h, everyone=True)  # asked again: told again, counted once
    assert len(report["asked"]) == 3 and report["unknown"] == []
    assert [drains(h, w) for w in (W1, W2, W3)] == [1, 1, 1]
    assert h.snap()["totals"]["drained"] == 3
    for wid in (W1, W2, W3):
        h.core.on_worker(wid, p.BYE_FRAMES)
    assert drain(h, everyone=True) == {"asked": [], "unknown": []}


def test_a_drained_worker_that_reconnects_with_its_job_stays_draining():
    h = Harness()
    h.hello(W1)
    sub(h, "j")
    sub(h, "k")
    h.job_to(W1)
    drain(h, workers=("w1",))
    h.hello(W2, info={"name": "w1", "draining": True}, job_id="j", attempt=1,
            token=h.token("j", 1))  # the same process on a new socket
    assert h.worker_state(W2) == "draining"
    h.result(W2, "j", 1, ready=True)
    assert [type(m) for m in h.to_worker(W2)] == [p.Welcome, p.Ack]
    assert h.info("j")["state"] == "done" and h.info("k")["state"] == "queued"
    h.hello(W3, info={"name": "w3", "draining": True})  # idle and draining: not made ready
    assert h.jobs_to(W3) == [] and h.worker_state(W3) == "draining"


# ================================================================================================
# bad requests
# ================================================================================================


@pytest.mark.parametrize("frames, reason", [
    ([b"RWC3 PAUSE"], "bad PAUSE"),
    ([b"RWC3 PAUSE a b"], "bad PAUSE"),
    ([b"RWC3 PAUSE bad/name"], "bad queue"),
    ([b"RWC3 RESUME"], "bad RESUME"),
    ([b"RWC3 RESUME q", b"extra"], "bad RESUME"),
    ([b"RWC3 DRAIN"], "bad DRAIN"),
    ([b"RWC3 DRAIN w1", b"{}"], "bad DRAIN"),
    ([b"RWC3 DRAIN", b"{}"], "bad selector"),
    ([b"RWC3 DRAIN", b'{"workers": []}'], "bad selector"),
    ([b"RWC3 DRAIN", b'{"workers": "w1"}'], "bad selector"),
    ([b"RWC3 DRAIN", b'{"workers": [1]}'], "bad selector"),
    ([b"RWC3 DRAIN", b'{"hosts": [""]}'], "bad selector"),
    ([b"RWC3 DRAIN", b'{"all": 1}'], "bad selector"),
    ([b"RWC3 DRAIN", b"[1]"], "bad selector"),
    ([b"RWC3 DRAIN", b"{"], "bad selector"),
    ([b"RWC3 DRAIN", b'{"workers": ["' + b"x" * 9000 + b'"]}'], "bad selector"),
])
def test_malformed_control_requests_are_invalid_counted_and_change_nothing(frames, reason):
    h = Harness()
    h.hello(W1)
    h.clear()
    h.core.on_client(C1, frames)
    (reply,) = replies(h, C1)
    assert isinstance(reply, p.Invalid) and reply.reason.startswith(reason), reply
    snap = h.snap()
    assert snap["bad_messages"] == {f"clients: {reason}": 1}
    assert snap["paused"] == [] and h.worker_state(W1) == "idle" and drains(h, W1) == 0


# ================================================================================================
# restart through the sqlite journal
# ================================================================================================


def test_a_pause_survives_a_restart_and_so_does_a_resume(tmp_path):
    h = journaled(tmp_path / "j.db")
    pause(h, "q")
    pause(h, "empty")
    sub(h, "a", queue="q")
    sub(h, "b", queue="q", delay=2.0)
    h = restart(h, 1.0)
    assert h.snap()["paused"] == ["empty", "q"]
    h.hello(W1, queues=("q",))
    h.advance(10.0)  # past the hold-back window and the delay
    assert h.jobs_to(W1) == []
    assert (queue_row(h, "q")["queued"], queue_row(h, "q")["paused"]) == (2, True)
    reply = resume(h, "q")
    assert (reply.dispatched, reply.queued) == (1, 1)
    assert ids(h.jobs_to(W1)) == [("a", 1)]
    h = restart(h, 1.0)
    assert h.snap()["paused"] == ["empty"]


def test_a_job_running_at_a_restart_in_a_paused_queue_is_claimed_and_not_run_again(tmp_path):
    h = journaled(tmp_path / "j.db", heartbeat=1.0)
    h.hello(W1, queues=("q",))
    sub(h, "r", queue="q")
    h.job_to(W1)
    pause(h, "q")
    h = restart(h, 0.5)
    h.hello(W1, queues=("q",), job_id="r", attempt=1)  # its worker, still running it
    assert h.info("r")["state"] == "running"
    h.result(W1, "r", 1)
    assert h.info("r")["state"] == "done" and h.jobs_to(W1) == []
    h.hello(W2, queues=("q",))
    sub(h, "s", queue="q")
    h.advance(5.0)
    assert h.jobs_to(W2) == [] and h.info("s")["state"] == "queued"


def test_a_journal_deleted_under_the_broker_is_written_again_with_its_paused_queues(tmp_path):
    path = tmp_path / "j.db"
    journal = SqliteJournal(path)
    journal.queue_paused("a", True)
    journal.queue_paused("b", True)
    journal.queue_paused("b", False)
    journal.queue_paused("c", True)
    journal.commit()
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{path}{suffix}").exists():
            os.unlink(f"{path}{suffix}")
    journal.queue_paused("d", True)
    journal.commit()  # finds the file gone: writes everything again
    assert journal.rewrites == 1
    journal.close()
    again = SqliteJournal(path)
    assert again.paused_queues() == ["a", "c", "d"]
    again.close()


def test_the_null_journal_keeps_nothing_so_a_memory_broker_forgets_pauses():
    h = Harness()
    pause(h, "q")
    assert h.core.journal.paused_queues() == []


# ================================================================================================
# how rw status shows it
# ================================================================================================


def test_status_marks_paused_queues_and_draining_workers():
    from test_status import text_of

    from respworkers.status import render

    h = Harness()
    h.hello(W1, queues=("q",))
    h.hello(W2, queues=("q",))
    sub(h, "j", queue="q")
    pause(h, "q")
    pause(h, "spare")
    sub(h, "k", queue="q")
    drain(h, workers=("w1",))
    shown = text_of(render(h.snap()))
    assert "paused queues (nothing dispatched, jobs kept): q, spare" in shown
    assert "draining: 1 worker leaving after their job in hand" in shown
    assert "drained 1" in shown
    rows = {line.split()[0]: line for line in shown.splitlines() if line.strip()}
    assert "paused" in rows["q"] and "paused" in rows["spare"]
    assert "draining" in rows["w1"] and " j " in rows["w1"]
    assert "idle" in rows["w2"]
