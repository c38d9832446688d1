"""The sqlite journal on real files: batching, restore, locking, bad files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from respworkers import protocol as p
from respworkers.broker.core import BrokerCore
from respworkers.broker.journal import SCHEMA_VERSION, JournalError, SqliteJournal, open_journal
from respworkers.broker.model import (
    DONE,
    FAILED,
    QUEUED,
    SCHEDULED,
    Job,
    Waiter,
    pack_frames,
    unpack_frames,
)
from respworkers.broker.notify import Notifier
from respworkers.config import BrokerConfig

pytestmark = pytest.mark.timeout(30)


def make_core(path: Path) -> tuple[BrokerCore, list]:
    sent: list = []
    core = BrokerCore(BrokerConfig(heartbeat=1000.0), lambda r, f: sent.append(("c", f)),
                      lambda r, f: sent.append(("w", list(f))), SqliteJournal(path))
    core.set_time(1000.0, 1_700_000_000.0)
    core.tick()
    return core, sent


def answer(core: BrokerCore, sent: list, job_id: str, payload: list[bytes]) -> None:
    """Worker w1 answers the last JOB it was sent for ``job_id``, echoing its token."""
    for kind, frames in reversed(sent):
        if kind == "w" and frames[0].startswith(b"RWW3 JOB %s " % job_id.encode()):
            job = p.decode_broker(frames)
            core.on_worker(b"w1", p.encode_worker_result(job_id, job.attempt, job.token, True, payload))
            return
    raise AssertionError(f"no JOB {job_id} was sent")


def test_frames_round_trip() -> None:
    for frames in ([], [b""], [b"a", b"", b"\x00" * 70000]):
        assert unpack_frames(pack_frames(frames)) == frames


def test_a_job_changed_many_times_in_one_turn_is_one_row(tmp_path: Path) -> None:
    core, sent = make_core(tmp_path / "j.db")
    core.on_worker(b"w1", p.encode_hello(["default"], {"name": "w1"}))
    core.on_client(b"c1", p.encode_submit("j1", p.DEFAULT_QUEUE, None, [b"in"]))  # dispatched at once
    answer(core, sent, "j1", [b"out"])
    core.flush()
    assert core.journal.describe()["rows"] == 1
    core.on_client(b"c1", p.encode_submit("j2", p.DEFAULT_QUEUE, None, [b"in"]))
    core.flush()
    answer(core, sent, "j2", [b"out2"])
    core.flush()
    assert core.journal.describe()["rows"] == 3  # j2: insert, then its outcome


def test_restore_matches_what_was_confirmed(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    core, sent = make_core(path)
    core.on_worker(b"w1", p.encode_hello(["default"], {"name": "w1"}))
    for i in range(4):
        core.on_client(b"c1", p.encode_submit(f"j{i}", p.DEFAULT_QUEUE, p.Options(7.0, 2),
                                              [b"in", bytes([i])]))
    answer(core, sent, "j0", [b"done0"])  # j1 starts
    core.on_client(b"c1", p.encode_job_ref(p.CANCEL, "j3"))
    core.flush()
    core.on_client(b"c1", p.encode_submit("lost", p.DEFAULT_QUEUE, None, [b"x"]))  # never committed
    core.journal.db.close()  # killed: no clean close
    core.journal._unlock()  # type: ignore[attr-defined]  # and its lock goes with the process

    again, _ = make_core(path)
    counts = again.restore(again.journal.load())
    assert counts == {"queued": 1, "interrupted": 1, "scheduled": 0, "finished": 2}
    assert "lost" not in again.jobs
    assert again.jobs["j0"].result == [b"done0"] and again.jobs["j0"].state == "done"
    assert again.jobs["j3"].state == "cancelled"
    j2 = again.jobs["j2"]
    assert (j2.state, j2.payload, j2.timeout, j2.tries) == ("queued", [b"in", b"\x02"], 7.0, 2)
    assert again.jobs["j1"].attempt == 0  # the interrupted attempt does not count


def test_one_broker_per_journal_and_clear_errors(tmp_path: Path) -> None:
    first = SqliteJournal(tmp_path / "j.db")
    with pytest.raises(JournalError, match="in use by another broker"):
        SqliteJournal(tmp_path / "j.db")
    first.close()
    SqliteJournal(tmp_path / "j.db").close()
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(JournalError, match="not a usable sqlite file"):
        SqliteJournal(bad)
    assert open_journal(":memory:").describe()["kind"] == "memory"


SCHEMA_1 = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, queue TEXT NOT NULL, timeout REAL NOT NULL,
    tries INTEGER NOT NULL, attempt INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL,
    payload BLOB, result BLOB, reason TEXT NOT NULL DEFAULT '', error TEXT NOT NULL DEFAULT '',
    tried TEXT NOT NULL DEFAULT '', created REAL NOT NULL, started REAL NOT NULL DEFAULT 0,
    finished REAL NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema', '1');
"""


def test_a_schema_1_journal_is_migrated_with_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_1)
    db.execute("INSERT INTO jobs (id, seq, queue, timeout, tries, state, payload, created)"
               " VALUES ('old-1', 7, 'default', 5.0, 2, 'queued', ?, 1.0)", (pack_frames([b"p"]),))
    db.commit()
    db.close()
    journal = SqliteJournal(path)
    (row,) = journal.load()
    assert (row.id, row.seq, row.state, row.payload, row.timeout) == ("old-1", 7, "queued", [b"p"], 5.0)
    journal.close()
    check = sqlite3.connect(path)
    assert check.execute("SELECT value FROM meta WHERE key='schema'").fetchone() == (str(SCHEMA_VERSION),)
    assert check.execute("SELECT count(*) FROM sqlite_master WHERE name='jobs_old'").fetchone() == (0,)


def test_retention_deletes_the_rows_of_forgotten_jobs(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    sent: list = []
    core = BrokerCore(BrokerConfig(heartbeat=1.0, retention=10.0),
                      lambda r, f: sent.append(("c", f)), lambda r, f: sent.append(("w", list(f))),
                      SqliteJournal(path))
    core.set_time(1000.0, 1_700_000_000.0)
    core.on_worker(b"w1", p.encode_hello(["default"], {"name": "w1"}))
    for i in range(3):
        core.on_client(b"c1", p.encode_submit(f"j{i}", p.DEFAULT_QUEUE, None, [b"in"]))
        answer(core, sent, f"j{i}", [b"out"])
    core.flush()
    core.set_time(1020.0, 1_700_000_020.0)  # past retention
    core.tick()
    core.flush()
    assert list(core.journal.load()) == [] and core.jobs == {}


def test_group_commit_confirms_a_turn_later_when_quiet_and_batches_under_load(tmp_path: Path) -> None:
    sent: list = []
    core = BrokerCore(BrokerConfig(heartbeat=1000.0, commit_interval=0.01),
                      lambda r, f: sent.append(f), lambda r, f: None, SqliteJournal(tmp_path / "j.db"))
    core.set_time(1000.0, 1_700_000_000.0)
    core.tick()
    core.on_client(b"c1", p.encode_submit("a", p.DEFAULT_QUEUE, None, [b"x"]))
    core.maybe_flush()  # quiet until now: one turn of grace (a quick outcome may join it)
    assert sent == [] and core.journal.dirty()
    assert core.next_wake() == pytest.approx(1000.001)  # or a millisecond, whichever is first
    core.set_time(1000.0002, 1_700_000_000.0002)
    core.maybe_flush()  # the next turn: committed and confirmed
    assert sent == [[b"RWC3 ACCEPTED a"]] and core.journal.describe()["batches"] == 1
    core.set_time(1000.004, 1_700_000_000.004)
    core.on_client(b"c1", p.encode_submit("b", p.DEFAULT_QUEUE, None, [b"x"]))
    core.maybe_flush()
    core.set_time(1000.006, 1_700_000_000.006)
    core.on_client(b"c1", p.encode_submit("c", p.DEFAULT_QUEUE, None, [b"x"]))
    core.maybe_flush()
    assert len(sent) == 1 and core.journal.dirty()  # within the interval: not yet
    assert core.next_wake() == pytest.approx(1000.0102)  # but the loop wakes for it
    core.set_time(1000.0102, 1_700_000_000.0102)
    core.maybe_flush()  # under load: no grace, committed when due
    assert sent[-1] == [b"RWC3 ACCEPTED b c"] and not core.journal.dirty()
    assert core.journal.describe()["batches"] == 2
    assert core.next_wake() == pytest.approx(2000.0)  # nothing left: the next heartbeat
    core.set_time(1000.5, 1_700_000_000.5)
    core.on_client(b"c1", p.encode_submit("d", p.DEFAULT_QUEUE, None, [b"x"]))
    core.maybe_flush()
    assert len(sent) == 2
    core.set_time(1000.502, 1_700_000_000.502)  # no turn came sooner: the grace has passed
    core.maybe_flush()
    assert sent[-1] == [b"RWC3 ACCEPTED d"]


def test_recent_failures_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    core, sent = make_core(path)
    core.on_worker(b"w1", p.encode_hello(["default"], {"name": "w1"}))
    core.on_client(b"c1", p.encode_submit("bad", p.DEFAULT_QUEUE, p.Options(None, 1), [b"in"]))
    job = next(p.decode_broker(f) for kind, f in reversed(sent) if kind == "w" and b" JOB " in f[0])
    core.on_worker(b"w1", p.encode_worker_error("bad", 1, job.token, True, "ValueError: boom"))
    core.flush()
    assert [f["id"] for f in core.snapshot()["recent_failures"]] == ["bad"]
    core.journal.close()
    again, _ = make_core(path)
    again.restore(again.journal.load())
    (failure,) = again.snapshot()["recent_failures"]
    assert (failure["id"], failure["reason"], failure["error"]) == ("bad", "error", "ValueError: boom")


def test_a_dispatch_is_written_narrowly_and_a_later_change_whole(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    core, sent = make_core(path)
    core.on_client(b"c1", p.encode_submit("j1", p.DEFAULT_QUEUE, None, [b"in"]))
    core.on_client(b"c1", p.encode_submit("j2", p.DEFAULT_QUEUE, None, [b"in"]))
    core.flush()  # both queued, on disk
    core.on_worker(b"w1", p.encode_hello(["default"], {"name": "w1"}))  # j1 dispatched
    core.flush()
    row = core.journal.db.execute(
        "SELECT state, attempt, tried, started > 0, tokens != '', payload IS NOT NULL "
        "FROM jobs WHERE id='j1'").fetchone()
    assert row == ("running", 1, "w1", 1, 1, 1)
    answer(core, sent, "j1", [b"out"])  # j2 dispatched in the same turn as j1's outcome
    core.flush()
    rows = dict(core.journal.db.execute("SELECT id, state || ' ' || attempt FROM jobs"))
    assert rows == {"j1": "done 1", "j2": "running 1"}
    assert core.journal.db.execute("SELECT result, payload FROM jobs WHERE id='j1'").fetchone() == (
        pack_frames([b"out"]), None)  # the outcome's whole row, not the dispatch's narrow one


def test_the_log_is_copied_into_the_file_by_a_thread_not_by_commits(tmp_path: Path) -> None:
    import os
    import time

    path = tmp_path / "j.db"
    core, _ = make_core(path)
    core.flush()
    empty = os.path.getsize(path)
    for i in range(2000):
        core.on_client(b"c1", p.encode_submit(f"j{i}", p.DEFAULT_QUEUE, None, [b"x" * 200]))
    core.flush()  # one commit: far below the pages at which a commit checkpoints by itself
    assert os.path.getsize(f"{path}-wal") > 400_000
    deadline = time.monotonic() + 10
    while os.path.getsize(path) < empty + 400_000:  # the thread copied the rows into the file
        assert time.monotonic() < deadline, "no checkpoint within 10 s"
        time.sleep(0.02)
    assert core.journal.describe()["checkpoints"] >= 1
    core.journal.close()
    again, _ = make_core(path)
    assert again.restore(again.journal.load())["queued"] == 2000


# Fields a job keeps only in the broker's memory (who waits, where it is queued, its deadline).
_NOT_STORED = {"waiters", "worker", "deadline", "qtoken", "lane", "watchers", "retry_since"}


def _job_attributes() -> list[str]:
    """Job's attributes: its __slots__, or for the compiled build (whose classes have none)
    the data descriptors it defines."""
    names = getattr(Job, "__slots__", None)
    if names is None:
        names = [n for n, v in vars(Job).items() if not n.startswith("_")
                 and hasattr(v, "__set__") and not isinstance(v, property)]
    assert "payload" in names and "tokens" in names
    return list(names)


def _fields(job: Job) -> dict[str, object]:
    return {name: getattr(job, name) for name in _job_attributes() if name not in _NOT_STORED}


def test_every_stored_field_survives_a_restart_of_many_jobs(tmp_path: Path) -> None:
    """Jobs with every field set, and plain ones whose lazily made fields are still the
    shared empty ones: a restored broker holds them exactly as they were, and what is
    added to a restored job afterwards (a waiter, a worker tried) is its own."""
    path = tmp_path / "j.db"
    journal = SqliteJournal(path)
    jobs: list[Job] = []
    for i in range(1, 2001):
        job = Job(f"job-{i}", f"q{i % 3}", [b"in", b"%d" % i], 30.0 + i % 2, 3, i, 1_700_000_000.0 + i,
                  priority=i % 10, tenant=f"t{i % 4}" if i % 2 else "")
        if i % 5 == 1:  # ended, with everything an end and its attempts leave
            job.state = FAILED
            job.attempt = 2
            job.tried = ("w1", f"w{i % 7}")
            job.started, job.finished = job.created + 1, job.created + 2
            job.result = [b"out", b""]
            job.reason, job.error = "error", f"boom {i}\nline 2"
            job.history = [{"state": "failed", "attempt": 1}]
        elif i % 5 == 2:  # waiting to run again, with its own policy
            job.state = SCHEDULED
            job.attempt = 1
            job.tried = ("w2",)
            job.not_before, job.expires_at = job.created + 60, job.created + 600
            job.backoff, job.backoff_max = 1.5, 30.0
            job.progress = {"done": i, "at": 1.0, "attempt": 1}
            job.tokens = {b"a" * 32: 1}
        elif i % 5 == 3:
            job.state = DONE
            job.attempt = 1
            job.tried = ("w3",)
            job.started, job.finished = job.created + 1, job.created + 2
            job.result = [b"r" * (i % 300)]
            job.payload = None
        jobs.append(job)
        journal.submitted(job)
    journal.commit()
    journal.close()

    journal = SqliteJournal(path)
    restored = {job.id: job for job in journal.load()}
    journal.close()
    assert list(restored) == [job.id for job in jobs]  # in submission order
    for job in jobs:
        again = restored[job.id]
        assert _fields(again) == _fields(job), job.id
        assert type(again.tried) is tuple and again.waiters == ()
    plain = restored["job-5"]
    assert plain.tried == () and plain.tokens is None and plain.history is None
    Notifier.wait(plain, b"c1", Waiter.BATCH)
    plain.tried += ("w9",)
    assert plain.waiters == ((b"c1", Waiter.BATCH),) and plain.tried == ("w9",)
    assert restored["job-10"].waiters == () and restored["job-10"].tried == ()
    # equal values read from different rows are one object each (a million rows: no copies)
    assert restored["job-3"].queue is restored["job-6"].queue
    assert restored["job-1"].tried[0] is restored["job-6"].tried[0]


def test_restored_broker_serves_its_jobs_with_lazily_made_fields(tmp_path: Path) -> None:
    """Queued jobs restored by a broker run, tell their waiters and journal their tries."""
    path = tmp_path / "j.db"
    core, _ = make_core(path)
    core.on_client(b"c1", p.encode_submits([p.encode_submit(f"j{i}", p.DEFAULT_QUEUE, None, [b"in"])
                                            for i in range(50)]))
    core.flush()
    core.journal.close()
    core, sent = make_core(path)
    assert core.restore(core.journal.load())["queued"] == 50
    core.wait(b"c2", "j0", Waiter.PROTO)
    core.on_worker(b"w1", p.encode_hello(["default"], {"name": "w1"}))
    answer(core, sent, "j0", [b"out"])
    assert [f[0] for kind, f in sent if kind == "c"] == [b"RWC3 RESULT j0"]
    core.flush()
    assert core.jobs["j0"].tried == ("w1",) and core.jobs["j1"].tried == ("w1",)
    core.journal.close()
    journal = SqliteJournal(path)
    again = {job.id: job for job in journal.load()}
    journal.close()
    assert again["j0"].state is DONE and again["j0"].tried == ("w1",)
    assert again["j2"].tried == () and again["j2"].state is QUEUED


def _checkpoint_threads() -> int:
    import threading

    return sum(1 for t in threading.enumerate() if t.name == "rw-checkpoint" and t.is_alive())


def test_no_checkpoint_thread_outlives_its_journal(tmp_path: Path) -> None:
    import os

    before = _checkpoint_threads()
    path = tmp_path / "j.db"
    core, _ = make_core(path)
    core.on_client(b"c1", p.encode_submit("a", p.DEFAULT_QUEUE, None, [b"x"]))
    os.unlink(path)  # deleted under the broker: closing writes it again, with a new thread
    core.journal.close()
    assert _checkpoint_threads() == before
    again = SqliteJournal(path)  # an existing journal the broker could not start with
    assert _checkpoint_threads() == before + 1
    again.remove_if_created()
    assert _checkpoint_threads() == before and path.exists()
    SqliteJournal(path).close()  # and its lock went with it


def test_the_checkpoint_thread_finds_a_journal_whose_path_has_uri_characters(tmp_path: Path) -> None:
    import os
    import time

    folder = tmp_path / "a?b#c%41"
    path = folder / "j?x#y.db"
    core, _ = make_core(path)
    for i in range(500):
        core.on_client(b"c1", p.encode_submit(f"j{i}", p.DEFAULT_QUEUE, None, [b"x" * 200]))
    core.flush()
    deadline = time.monotonic() + 10
    while core.journal.describe()["checkpoints"] == 0:
        assert time.monotonic() < deadline, "no checkpoint within 10 s"
        time.sleep(0.02)
    assert core.journal.describe()["checkpoint_failures"] == 0
    core.journal.close()
    assert sorted(os.listdir(folder)) == ["j?x#y.db"]  # no stray file at a cut-off path
    assert sorted(os.listdir(tmp_path)) == ["a?b#c%41"]
