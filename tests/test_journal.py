"""The sqlite journal on real files: batching, restore, locking, bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from respworkers import protocol as p
from respworkers.broker.core import BrokerCore
from respworkers.broker.journal import (
    JournalError,
    SqliteJournal,
    open_journal,
    pack_frames,
    unpack_frames,
)
from respworkers.config import BrokerConfig

pytestmark = pytest.mark.timeout(30)


def make_core(path: Path) -> tuple[BrokerCore, list]:
    sent: list = []
    core = BrokerCore(BrokerConfig(heartbeat=1000.0), lambda r, f: sent.append(("c", f)),
                      lambda r, f: sent.append(("w", list(f))), SqliteJournal(path))
    core.set_time(1000.0, 1_700_000_000.0)
    core.tick()
    return core, sent


def test_frames_round_trip() -> None:
    for frames in ([], [b""], [b"a", b"", b"\x00" * 70000]):
        assert unpack_frames(pack_frames(frames)) == frames


def test_a_job_changed_many_times_in_one_turn_is_one_row(tmp_path: Path) -> None:
    core, _ = make_core(tmp_path / "j.db")
    core.on_worker(b"w1", p.encode_hello(["default"], {"name": "w1"}, None, 0))
    core.on_client(b"c1", p.encode_submit("j1", "", None, None, [b"in"]))  # dispatched at once
    core.on_worker(b"w1", p.encode_worker_result("j1", 1, True, [b"out"]))
    core.flush()
    assert core.journal.describe()["rows"] == 1
    core.on_client(b"c1", p.encode_submit("j2", "", None, None, [b"in"]))
    core.flush()
    core.on_worker(b"w1", p.encode_worker_result("j2", 1, True, [b"out2"]))
    core.flush()
    assert core.journal.describe()["rows"] == 3  # j2: insert, then its outcome


def test_restore_matches_what_was_confirmed(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    core, _ = make_core(path)
    core.on_worker(b"w1", p.encode_hello(["default"], {"name": "w1"}, None, 0))
    for i in range(4):
        core.on_client(b"c1", p.encode_submit(f"j{i}", "", 7.0, 2, [b"in", bytes([i])]))
    core.on_worker(b"w1", p.encode_worker_result("j0", 1, True, [b"done0"]))  # j1 starts
    core.on_client(b"c1", p.encode_job_ref(p.CANCEL, "j3"))
    core.flush()
    core.on_client(b"c1", p.encode_submit("lost", "", None, None, [b"x"]))  # never committed
    core.journal.db.close()  # killed: no clean close

    again, _ = make_core(path)
    counts = again.restore(again.journal.load())
    assert counts == {"queued": 1, "interrupted": 1, "finished": 2}
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
