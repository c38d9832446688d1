"""Where the broker records jobs so that nothing it confirmed is lost.

The core calls four verbs per job (submitted, attempted, finished, forgotten); the
journal buffers them and writes each batch in one transaction at :meth:`commit`,
which the core calls (group commit: at once after a quiet spell, under load at most
once per ``commit_interval``) *before* it confirms (ACCEPTED) the submissions of the
batch. So a confirmed job is on disk, and the journal costs one transaction per batch
rather than one per message.

The sqlite journal runs in WAL mode. ``sync = "normal"`` (the default) survives a
crash of the broker process (kill -9, OOM); ``"full"`` also survives a power cut or
kernel crash, at the price of an fsync per batch.
"""

from __future__ import annotations

import os
import sqlite3
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import RespWorkersError

if TYPE_CHECKING:
    from .core import Job

MEMORY = ":memory:"
SCHEMA_VERSION = 2

# seq (the broker's submission order) is the rowid: rows are appended in key order and
# every write finds its row by an integer. The job id needs no index: the broker keeps
# ids in memory and reads the whole table once, at start-up.
_JOBS = """
CREATE TABLE IF NOT EXISTS jobs (
    seq      INTEGER PRIMARY KEY,
    id       TEXT NOT NULL,
    queue    TEXT NOT NULL,
    timeout  REAL NOT NULL,
    tries    INTEGER NOT NULL,
    attempt  INTEGER NOT NULL DEFAULT 0,
    state    TEXT NOT NULL,
    payload  BLOB,
    result   BLOB,
    reason   TEXT NOT NULL DEFAULT '',
    error    TEXT NOT NULL DEFAULT '',
    tried    TEXT NOT NULL DEFAULT '',
    created  REAL NOT NULL,
    started  REAL NOT NULL DEFAULT 0,
    finished REAL NOT NULL DEFAULT 0
);
"""
_META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
_COLUMNS = ("seq, id, queue, timeout, tries, attempt, state, payload, result, reason, error,"
            " tried, created, started, finished")

_LEN = struct.Struct(">I")


class JournalError(RespWorkersError):
    """The journal cannot be opened or written (in use, unreadable, wrong version)."""


def pack_frames(frames: list[bytes]) -> bytes:
    """Frames as one blob: each frame prefixed with its 4-byte big-endian length."""
    return b"".join(_LEN.pack(len(f)) + f for f in frames)


def unpack_frames(blob: bytes) -> list[bytes]:
    out, pos, end = [], 0, len(blob)
    while pos < end:
        (n,) = _LEN.unpack_from(blob, pos)
        pos += 4
        out.append(blob[pos:pos + n])
        pos += n
    return out


class Stored(NamedTuple):
    """A job as read back from the journal at start-up."""

    id: str
    seq: int
    queue: str
    timeout: float
    tries: int
    attempt: int
    state: str
    payload: list[bytes] | None
    result: list[bytes] | None
    reason: str
    error: str
    tried: list[str]
    created: float
    started: float
    finished: float


class Journal:
    """The verbs the core uses. Writes may be buffered until :meth:`commit`."""

    def submitted(self, job: Job) -> None: ...

    def attempted(self, job: Job) -> None: ...

    def finished(self, job: Job) -> None: ...

    def forget(self, job: Job) -> None: ...

    def commit(self) -> None: ...

    def dirty(self) -> bool:
        """Whether commit() has anything to write."""
        return False

    def load(self) -> list[Stored]:
        return []

    def close(self) -> None: ...

    def describe(self) -> dict[str, Any]:
        return {"kind": "memory", "path": None}


class NullJournal(Journal):
    """Keeps nothing on disk: jobs live only in the broker's memory (``journal = ":memory:"``)."""


class SqliteJournal(Journal):
    def __init__(self, path: str | os.PathLike[str], sync: str = "normal") -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False,
                                      timeout=1.0)
            # One broker per journal: an exclusive lock makes a second broker fail at once.
            self.db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
            self.db.execute(_META)
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is not None and row[0] == "1":
                self._migrate_from_1()
            elif row is not None and row[0] != str(SCHEMA_VERSION):
                raise JournalError(f"journal {self.path} has schema {row[0]}, expected {SCHEMA_VERSION}")
            self.db.execute(_JOBS)
            if row is None:
                self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc):
                raise JournalError(
                    f"journal {self.path} is in use by another broker (one broker per journal)"
                ) from None
            raise JournalError(f"cannot open journal {self.path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"journal {self.path} is not a usable sqlite file: {exc}") from None
        self.sync = sync
        self._new: dict[str, Job] = {}
        self._changed: dict[str, Job] = {}
        self._gone: list[tuple[str]] = []
        self.batches = 0
        self.rows = 0

    # -- buffered verbs: O(1) each, they only note which jobs changed ----------------------
    # At commit each changed job is written once from its current state, so a job that
    # is submitted, dispatched and even finished within one loop turn costs one row.
    def submitted(self, job: Job) -> None:
        self._new[job.id] = job

    def attempted(self, job: Job) -> None:
        if job.id not in self._new:
            self._changed[job.id] = job

    def finished(self, job: Job) -> None:
        if job.id not in self._new:
            self._changed[job.id] = job

    def forget(self, job: Job) -> None:
        self._changed.pop(job.id, None)
        if self._new.pop(job.id, None) is None:
            self._gone.append((job.seq,))

    @staticmethod
    def _row(job: Job) -> tuple:
        return (
            job.state, job.attempt, pack_frames(job.result) if job.result is not None else None,
            job.reason, job.error, "\n".join(job.tried), job.started, job.finished,
        )

    def dirty(self) -> bool:
        return bool(self._new or self._changed or self._gone)

    def commit(self) -> None:
        if not self.dirty():
            return
        db = self.db
        db.execute("BEGIN")
        try:
            if self._new:
                db.executemany(
                    "INSERT OR REPLACE INTO jobs (seq, id, queue, timeout, tries, created, payload,"
                    " state, attempt, result, reason, error, tried, started, finished)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    [(j.seq, j.id, j.queue, j.timeout, j.tries, j.created,
                      None if j.payload is None else pack_frames(j.payload), *self._row(j))
                     for j in self._new.values()])
            if self._changed:
                db.executemany(
                    "UPDATE jobs SET state=?, attempt=?, result=?, reason=?, error=?, tried=?,"
                    " started=?, finished=?, payload=CASE WHEN ? THEN NULL ELSE payload END"
                    " WHERE seq=?",
                    [(*self._row(j), j.payload is None, j.seq) for j in self._changed.values()])
            if self._gone:
                db.executemany("DELETE FROM jobs WHERE seq=?", self._gone)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.batches += 1
        self.rows += len(self._new) + len(self._changed) + len(self._gone)
        self._new.clear()
        self._changed.clear()
        self._gone.clear()

    def load(self) -> list[Stored]:
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY seq").fetchall()
        return [
            Stored(r[1], r[0], r[2], r[3], r[4], r[5], r[6],
                   unpack_frames(r[7]) if r[7] is not None else None,
                   unpack_frames(r[8]) if r[8] is not None else None,
                   r[9], r[10], r[11].split("\n") if r[11] else [], r[12], r[13], r[14])
            for r in rows
        ]

    def _migrate_from_1(self) -> None:
        """Schema 1 keyed rows by job id; copy them into the seq-keyed table, in one go."""
        db = self.db
        db.execute("BEGIN")
        try:
            db.execute("ALTER TABLE jobs RENAME TO jobs_v1")
            db.execute(_JOBS)
            db.execute(f"INSERT INTO jobs ({_COLUMNS}) SELECT {_COLUMNS} FROM jobs_v1")
            db.execute("DROP TABLE jobs_v1")
            db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        try:
            self.commit()
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self.db.close()

    def describe(self) -> dict[str, Any]:
        return {"kind": "sqlite", "path": str(self.path), "sync": self.sync,
                "batches": self.batches, "rows": self.rows}


def open_journal(path: str, sync: str = "normal") -> Journal:
    """``":memory:"`` keeps jobs in memory only; anything else is a sqlite file path."""
    if path == MEMORY:
        return NullJournal()
    return SqliteJournal(os.path.expanduser(path), sync)
