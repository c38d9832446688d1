"""Where the broker records jobs so that nothing it confirmed is lost.

The core calls its verbs per job (submitted, dispatched, attempted, finished,
forgotten); the journal buffers them and writes each batch in one transaction at
:meth:`commit`, which the core calls (group commit, commits.py: a turn after a quiet
spell, under load at most once per ``commit_interval``) *before* it confirms (ACCEPTED) the submissions of the
batch. So a confirmed job is on disk, and the journal costs one transaction per batch
rather than one per message.

The sqlite journal runs in WAL mode. ``sync = "normal"`` (the default) survives a
crash of the broker process (kill -9, OOM); ``"full"`` also survives a power cut or
kernel crash, at the price of an fsync per batch.

Besides jobs, the journal keeps which queues are paused (``rw pause``), one row each in
its ``meta`` table (key ``paused:<queue>``), written in the same transactions.

Disk faults do not stop the broker: a commit that fails raises
:class:`JournalWriteError` naming the file and the cause, keeps everything it could
not write buffered, and the next commit tries again. A journal file deleted under a
running broker is noticed at the next commit and written again, whole, at its path.

One broker per journal is enforced by an exclusive ``flock`` on the file, not by sqlite's
exclusive locking mode, so that other processes can read the journal while the broker
runs: an online backup (``sqlite3 journal.sqlite3 ".backup copy"``, Python's
``sqlite3.Connection.backup``) takes a consistent copy without stopping it.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from ..errors import RespWorkersError
from .checkpoint import FALLBACK_PAGES, Checkpointer
from .model import CHANGING, COLUMNS, Job, change_row, dispatch_row, from_row, full_row

log = logging.getLogger(__name__)

MEMORY = ":memory:"
SCHEMA_VERSION = 4

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
    finished REAL NOT NULL DEFAULT 0,
    tokens   TEXT NOT NULL DEFAULT ''
    {later}
);
"""
#: Columns added after schema 3, with their definitions (added in place by migration).
_ADDED_IN_4 = (
    ("priority", "INTEGER NOT NULL DEFAULT 5"),
    ("tenant", "TEXT NOT NULL DEFAULT ''"),
    ("not_before", "REAL NOT NULL DEFAULT 0"),
    ("expires_at", "REAL NOT NULL DEFAULT 0"),
    ("backoff", "REAL"),
    ("backoff_max", "REAL"),
    ("progress", "TEXT NOT NULL DEFAULT ''"),
    ("history", "TEXT NOT NULL DEFAULT ''"),
)
_JOBS_3 = _JOBS.format(later="")
_JOBS = _JOBS.format(later="".join(f",\n    {name} {kind}" for name, kind in _ADDED_IN_4))
_META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
#: A paused queue's row in ``meta`` is this prefix and its name (value "1"). ';' follows ':'.
PAUSED_KEY = "paused:"
_PAUSED_ROWS = "SELECT key FROM meta WHERE key >= 'paused:' AND key < 'paused;' ORDER BY key"
_ALL = ", ".join(COLUMNS)
_SCHEMA_2 = ("seq, id, queue, timeout, tries, attempt, state, payload, result, reason, error,"
             " tried, created, started, finished")
_INSERT = f"INSERT OR REPLACE INTO jobs ({_ALL}) VALUES ({', '.join('?' * len(COLUMNS))})"
_UPDATE = (f"UPDATE jobs SET {', '.join(f'{c}=?' for c in CHANGING)},"
           " payload=CASE WHEN ? THEN NULL ELSE payload END WHERE seq=?")
#: What a dispatch changes, and nothing more: the most frequent write, kept narrow.
_DISPATCHED = "UPDATE jobs SET state=?, attempt=?, tried=?, started=?, tokens=? WHERE seq=?"


#: ioctl that reads a file's attribute flags (chattr), and the flags that forbid writing.
_FS_IOC_GETFLAGS = 0x80086601
_FS_IMMUTABLE_FL = 0x10
_FS_APPEND_FL = 0x20


class JournalError(RespWorkersError):
    """The journal cannot be opened (in use, unreadable, wrong version, no room)."""


class JournalWriteError(JournalError):
    """A commit failed; what it held is still buffered and the next commit retries it."""


def why_not_writable(path: Path, exc: BaseException | None = None) -> str:
    """Name the file and the likeliest reason it cannot be written (sqlite only says
    "disk I/O error" or "attempt to write a readonly database")."""
    folder = path.parent
    text = str(exc) if exc is not None else ""
    try:
        vfs = os.statvfs(folder)
    except OSError as err:
        return f"{path}: its folder is not usable ({err.strerror})"
    if vfs.f_flag & os.ST_RDONLY:
        return f"{path}: the file system is mounted read-only"
    for candidate in (path, Path(f"{path}-wal")):
        flags = _file_flags(candidate)
        if flags & _FS_IMMUTABLE_FL:
            return f"{candidate}: the file is immutable (chattr +i); remove the flag with chattr -i"
        if flags & _FS_APPEND_FL:
            return f"{candidate}: the file is append-only (chattr +a)"
    if "full" in text or isinstance(exc, OSError) and exc.errno == errno.ENOSPC or (
            vfs.f_bavail * vfs.f_frsize < 64 * 1024):
        free = vfs.f_bavail * vfs.f_frsize
        return f"{path}: disk full ({free} bytes free in {folder})"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{path}: no permission to write in the folder {folder}"
    for candidate in (path, Path(f"{path}-wal")):
        if candidate.exists() and not os.access(candidate, os.W_OK):
            return f"{candidate}: no permission to write the file (mode {candidate.stat().st_mode & 0o777:o})"
    return f"{path}: {text or 'cannot be written'}"


def _file_flags(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return 0
    try:
        buf = array.array("i", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, buf, True)
        return buf[0]
    except OSError:  # a file system without attribute flags (tmpfs on older kernels)
        return 0
    finally:
        os.close(fd)


class Journal(Protocol):
    """What the core asks of a journal. Writes may be buffered until :meth:`commit`."""

    def bind(self, jobs: Mapping[str, Job]) -> None:
        """Every job the broker holds, should the journal have to be written again whole."""

    def submitted(self, job: Job) -> None: ...

    def attempted(self, job: Job) -> None: ...

    def dispatched(self, job: Job) -> None:
        """A new attempt was sent: only its state, attempt, tried, started and tokens changed."""

    def finished(self, job: Job) -> None: ...

    def forget(self, job: Job) -> None: ...

    def queue_paused(self, queue: str, paused: bool) -> None:
        """A queue was paused or resumed (``rw pause``/``rw resume``): kept across restarts."""

    def paused_queues(self) -> list[str]:
        """The queues stored as paused."""

    def commit(self) -> None:
        """Write what changed; raise JournalWriteError (keeping it buffered) if that fails."""

    def dirty(self) -> bool:
        """Whether commit() has anything to write."""

    def check(self) -> None:
        """Once a heartbeat: notice trouble that no write would reveal yet."""

    def load(self) -> Iterator[Job]:
        """Every stored job, in submission order."""

    def close(self) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class NullJournal:
    """Keeps nothing on disk: jobs live only in the broker's memory (``journal = ":memory:"``)."""

    def bind(self, jobs: Mapping[str, Job]) -> None:
        pass

    def submitted(self, job: Job) -> None:
        pass

    def attempted(self, job: Job) -> None:
        pass

    def dispatched(self, job: Job) -> None:
        pass

    def finished(self, job: Job) -> None:
        pass

    def forget(self, job: Job) -> None:
        pass

    def queue_paused(self, queue: str, paused: bool) -> None:
        pass

    def paused_queues(self) -> list[str]:
        return []

    def commit(self) -> None:
        pass

    def dirty(self) -> bool:
        return False

    def check(self) -> None:
        pass

    def load(self) -> Iterator[Job]:
        return iter(())

    def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"kind": "memory", "path": None}


class SqliteJournal:
    def __init__(self, path: str | os.PathLike[str], sync: str = "normal") -> None:
        self.path = Path(path)
        self.sync = sync
        self.created = not self.path.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(f"cannot create the journal's folder: {why_not_writable(self.path, exc)}"
                               ) from None
        self._lock_fd: int | None = None
        self.db = self._open()
        self._identity = self._file_identity()
        self._checkpointer = self._start_checkpointer()
        self._moved = False  # check() saw the file deleted or replaced
        self._jobs: Mapping[str, Job] = {}
        self._new: dict[str, Job] = {}
        self._changed: dict[str, Job] = {}
        self._dispatched: dict[str, Job] = {}  # changed by dispatches only (a narrow update)
        self._gone: list[tuple[int]] = []
        self._paused: set[str] = set()  # every paused queue (a rewrite writes them all)
        self._pausing: dict[str, bool] = {}  # queue -> paused, changed since the last commit
        self.batches = 0
        self.rows = 0
        self.failures = 0
        self.rewrites = 0

    def _lock(self) -> None:
        """One broker per journal: an exclusive flock on the file makes a second broker fail
        at once. (sqlite's exclusive locking mode would also lock out readers, such as an
        online backup.) flock and sqlite's own POSIX locks do not interact on local file
        systems; the descriptor stays open as long as the journal is."""
        self._unlock()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise JournalError(f"cannot open the journal: {why_not_writable(self.path, exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise JournalError(
                    f"journal {self.path} is in use by another broker (one broker per journal)"
                ) from None
            raise JournalError(f"cannot lock the journal: {exc}") from None
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _open(self) -> sqlite3.Connection:
        self._lock()
        db = None
        try:
            db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False,
                                 timeout=1.0)
            db.execute("PRAGMA journal_mode=WAL")
            # A thread copies the WAL into the file (checkpoint.py); commits do it only if
            # that thread falls far behind.
            db.execute(f"PRAGMA wal_autocheckpoint={FALLBACK_PAGES}")
            db.execute(f"PRAGMA synchronous={'FULL' if self.sync == 'full' else 'NORMAL'}")
            db.execute(_META)
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is not None and row[0] in ("1", "2", "3"):
                self._migrate(db, int(row[0]))
            elif row is not None and row[0] != str(SCHEMA_VERSION):
                raise JournalError(f"journal {self.path} has schema {row[0]}, expected {SCHEMA_VERSION}")
            db.execute(_JOBS)
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            return db
        except sqlite3.OperationalError as exc:
            if db is not None:
                db.close()
            self._unlock()
            if "locked" in str(exc):
                raise JournalError(
                    f"journal {self.path} is in use by another broker (one broker per journal)"
                ) from None
            raise JournalError(f"cannot open the journal: {why_not_writable(self.path, exc)}") from None
        except sqlite3.DatabaseError as exc:
            if db is not None:
                db.close()
            self._unlock()
            raise JournalError(f"journal {self.path} is not a usable sqlite file: {exc}") from None

    def _start_checkpointer(self) -> Checkpointer:
        checkpointer = Checkpointer(self.path, self.sync)
        checkpointer.start()
        return checkpointer

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def bind(self, jobs: Mapping[str, Job]) -> None:
        self._jobs = jobs

    # -- buffered verbs: O(1) each, they only note which jobs changed ----------------------
    # At commit each changed job is written once from its current state, so a job that
    # is submitted, dispatched and even finished within one loop turn costs one row.
    def submitted(self, job: Job) -> None:
        self._new[job.id] = job

    def attempted(self, job: Job) -> None:
        if job.id not in self._new:
            self._changed[job.id] = job

    def dispatched(self, job: Job) -> None:
        if job.id not in self._new and job.id not in self._changed:
            self._dispatched[job.id] = job

    def finished(self, job: Job) -> None:
        if job.id not in self._new:
            self._changed[job.id] = job

    def forget(self, job: Job) -> None:
        self._changed.pop(job.id, None)
        self._dispatched.pop(job.id, None)
        if self._new.pop(job.id, None) is None:
            self._gone.append((job.seq,))

    def queue_paused(self, queue: str, paused: bool) -> None:
        if paused:
            self._paused.add(queue)
        else:
            self._paused.discard(queue)
        self._pausing[queue] = paused

    def paused_queues(self) -> list[str]:
        self._paused = {key[len(PAUSED_KEY):] for key, in self.db.execute(_PAUSED_ROWS)}
        return sorted(self._paused)

    def dirty(self) -> bool:
        return bool(self._new or self._changed or self._dispatched or self._gone or self._pausing
                    or self._moved)

    def check(self) -> None:
        """Once a heartbeat: a journal file deleted or replaced under the broker is written
        again at the next commit even when nothing else changes, so an idle broker does not
        sit on confirmed jobs that exist nowhere on disk."""
        if self._file_identity() != self._identity:
            self._moved = True

    def commit(self) -> None:
        if not self.dirty():
            return
        if self._moved or self._file_identity() != self._identity:
            self._moved = False
            self._rewrite()
            return
        try:
            self._write()
        except sqlite3.Error as exc:
            self._rollback()
            self.failures += 1
            raise JournalWriteError(why_not_writable(self.path, exc)) from None
        self._written()

    def _write(self) -> None:
        db = self.db
        db.execute("BEGIN")
        if self._new:
            db.executemany(_INSERT, [full_row(j) for j in self._new.values()])
        if self._changed:
            db.executemany(
                _UPDATE, [(*change_row(j), j.payload is None, j.seq) for j in self._changed.values()])
        if self._dispatched:
            changed = self._changed  # a full update of the same job covers its dispatch
            db.executemany(_DISPATCHED, [dispatch_row(j) for i, j in self._dispatched.items()
                                         if i not in changed])
        if self._gone:
            db.executemany("DELETE FROM jobs WHERE seq=?", self._gone)
        if self._pausing:
            self._write_paused(db, self._pausing.items())
        db.execute("COMMIT")

    @staticmethod
    def _write_paused(db: sqlite3.Connection, changes: Iterable[tuple[str, bool]]) -> None:
        for queue, paused in changes:
            if paused:
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, '1')", (PAUSED_KEY + queue,))
            else:
                db.execute("DELETE FROM meta WHERE key=?", (PAUSED_KEY + queue,))

    def _rollback(self) -> None:
        # After some errors sqlite has already rolled back ("cannot rollback - no
        # transaction is active" would otherwise hide the first error).
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass

    def _buffered(self) -> int:
        """Changes waiting for the next commit (rows to write)."""
        return (len(self._new) + len(self._changed) + len(self._dispatched) + len(self._gone)
                + len(self._pausing))

    def _clear(self) -> None:
        """The buffered changes are on disk."""
        self._new.clear()
        self._changed.clear()
        self._dispatched.clear()
        self._gone.clear()
        self._pausing.clear()

    def _written(self) -> None:
        self.batches += 1
        self.rows += self._buffered()
        self._clear()

    def _rewrite(self) -> None:
        """The file at our path is gone or is another file (deleted, moved, replaced): what
        we commit would reach nobody. Write everything the broker holds to a new file there."""
        log.error("journal %s was deleted or replaced under the running broker: writing all "
                  "%d jobs it holds to a new file at that path", self.path, len(self._jobs))
        self._checkpointer.stop()  # it holds the old file open
        try:
            self.db.close()
        except sqlite3.Error:
            pass
        for suffix in ("-wal", "-shm"):  # leftovers of the old file must not be taken as ours
            try:
                os.unlink(f"{self.path}{suffix}")
            except OSError:
                pass
        try:
            self.db = self._open()
            db = self.db
            db.execute("BEGIN")
            db.execute("DELETE FROM jobs")
            db.execute("DELETE FROM meta WHERE key >= 'paused:' AND key < 'paused;'")
            db.executemany(_INSERT, [full_row(j) for j in self._jobs.values()])
            self._write_paused(db, ((queue, True) for queue in self._paused))
            db.execute("COMMIT")
        except (sqlite3.Error, JournalError) as exc:
            if isinstance(exc, sqlite3.Error):
                self._rollback()
            self.failures += 1
            self._identity = (-1, -1)  # not done: try the whole rewrite again next commit
            why = exc if isinstance(exc, JournalError) else why_not_writable(self.path, exc)
            raise JournalWriteError(f"rewriting the deleted journal failed: {why}") from None
        self._identity = self._file_identity()
        self._checkpointer = self._start_checkpointer()
        self.rewrites += 1
        self.rows += len(self._jobs)
        self.batches += 1
        self._clear()
        log.warning("journal %s written again: %d jobs", self.path, len(self._jobs))

    def load(self) -> Iterator[Job]:
        """Every stored job in submission order, streamed (a large journal is not read at once)."""
        cursor = self.db.execute(f"SELECT {_ALL} FROM jobs ORDER BY seq")
        shared: dict[Any, Any] = {}  # equal values of different rows: one object
        while True:
            rows = cursor.fetchmany(10_000)
            if not rows:
                return
            for row in rows:
                yield from_row(row, shared)

    def _migrate(self, db: sqlite3.Connection, version: int) -> None:
        """Bring an older journal up to date, in one transaction: schema 1 keyed rows by job
        id and schema 2 had no attempt tokens (rows are copied into a new table); schema 3
        lacked the columns of priorities, tenants, schedules, retry policy, progress and
        history (added in place, with their defaults)."""
        db.execute("BEGIN")
        try:
            if version < 3:
                db.execute("ALTER TABLE jobs RENAME TO jobs_old")
                db.execute(_JOBS_3)
                db.execute(f"INSERT INTO jobs ({_SCHEMA_2}) SELECT {_SCHEMA_2} FROM jobs_old")
                db.execute("DROP TABLE jobs_old")
            for name, kind in _ADDED_IN_4:
                db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
            db.execute("UPDATE meta SET value=? WHERE key='schema'", (str(SCHEMA_VERSION),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        log.info("journal %s: migrated from schema %d to %d", self.path, version, SCHEMA_VERSION)

    def close(self) -> None:
        self._checkpointer.stop()
        try:
            self.commit()
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except (sqlite3.Error, JournalError) as exc:
            log.error("closing the journal: %s; %d job changes were not written", exc,
                      self._buffered())
        finally:
            self._checkpointer.stop()  # the commit may have written a deleted file again
            self.db.close()
            self._unlock()

    def remove_if_created(self) -> None:
        """Undo opening a journal that did not exist (the broker could not start after all);
        one that existed is closed and kept."""
        if not self.created:
            self.close()
            return
        self._checkpointer.stop()
        try:
            self.db.close()
        except sqlite3.Error:
            pass
        self._unlock()
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(f"{self.path}{suffix}")
            except OSError:
                pass

    def describe(self) -> dict[str, Any]:
        return {"kind": "sqlite", "path": str(self.path), "sync": self.sync,
                "batches": self.batches, "rows": self.rows, "failures": self.failures,
                "rewrites": self.rewrites, "checkpoints": self._checkpointer.checkpoints,
                "checkpoint_failures": self._checkpointer.failures}


def open_journal(path: str, sync: str = "normal") -> Journal:
    """``":memory:"`` keeps jobs in memory only; anything else is a sqlite file path."""
    if path == MEMORY:
        return NullJournal()
    return SqliteJournal(os.path.expanduser(path), sync)
