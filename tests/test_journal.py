"""The sqlite journal on real files: batching, restore, locking, bad files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from respworkers import protocol as p
from respworkers.broker.core import BrokerCore
from respworkers.broker.journal import SCHEMA_VERSION, JournalError, SqliteJournal, open_journal
from respworkers.broker.model import pack_frames, unpack_frames
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


def test_group_commit_confirms_at_once_when_quiet_and_batches_under_load(tmp_path: Path) -> None:
    sent: list = []
    core = BrokerCore(BrokerConfig(heartbeat=1000.0, commit_interval=0.01),
                      lambda r, f: sent.append(f), lambda r, f: None, SqliteJournal(tmp_path / "j.db"))
    core.set_time(1000.0, 1_700_000_000.0)
    core.tick()
    core.on_client(b"c1", p.encode_submit("a", p.DEFAULT_QUEUE, None, [b"x"]))
    core.maybe_flush()  # quiet until now: committed and confirmed in this turn
    assert sent == [[b"RWC3 ACCEPTED a"]] and core.journal.describe()["batches"] == 1
    core.set_time(1000.004, 1_700_000_000.004)
    core.on_client(b"c1", p.encode_submit("b", p.DEFAULT_QUEUE, None, [b"x"]))
    core.maybe_flush()
    core.set_time(1000.006, 1_700_000_000.006)
    core.on_client(b"c1", p.encode_submit("c", p.DEFAULT_QUEUE, None, [b"x"]))
    core.maybe_flush()
    assert len(sent) == 1 and core.journal.dirty()  # within the interval: not yet
    assert core.next_wake() == pytest.approx(1000.01)  # but the loop wakes for it
    core.set_time(1000.01, 1_700_000_000.01)
    core.maybe_flush()
    assert sent[-1] == [b"RWC3 ACCEPTED b c"] and not core.journal.dirty()
    assert core.journal.describe()["batches"] == 2
    assert core.next_wake() == pytest.approx(2000.0)  # nothing left: the next heartbeat


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
