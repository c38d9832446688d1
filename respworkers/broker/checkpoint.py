"""Copying the journal's write-ahead log into its file, off the broker's loop.

In WAL mode every commit appends to ``<journal>-wal``; a *checkpoint* copies those pages
into the journal file (and syncs it), after which the log starts over. sqlite does it
inside a commit once the log reaches ``wal_autocheckpoint`` pages, which puts a copy and
an fsync, milliseconds on a real disk, into the broker's loop at random: the tail of the
latency of jobs that arrive meanwhile. Here a thread with its own connection checkpoints
every :data:`INTERVAL` seconds instead (the sqlite module releases the GIL while sqlite
works), so the loop only appends. A checkpoint never waits for the loop (``PASSIVE``) and
never weakens durability: a committed change is in the log, synced as ``journal_sync``
says, before it is confirmed, whoever copies it later.

Should the thread fall behind or fail (a full disk), the loop's own connection still
checkpoints at :data:`FALLBACK_PAGES`, so the log cannot grow without bound.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import urllib.parse
from pathlib import Path

log = logging.getLogger(__name__)

#: Seconds between checkpoints (a checkpoint of an empty log costs microseconds).
INTERVAL = 0.05
#: Log pages at which the loop's connection checkpoints by itself (about 40 MB).
FALLBACK_PAGES = 10_000
#: Seconds between two log lines about failing checkpoints.
REPORT_EVERY = 60.0


class Checkpointer:
    """A daemon thread that checkpoints one journal file until :meth:`stop`."""

    def __init__(self, path: Path, sync: str) -> None:
        self.path = path
        self.sync = sync
        self.checkpoints = 0  #: checkpoints that copied pages
        self.pages = 0  #: pages copied
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rw-checkpoint", daemon=True)
        self._reported = -REPORT_EVERY

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10.0)

    def _connect(self) -> sqlite3.Connection:
        # mode=rw: never create a file at the path (the journal may have been deleted; the
        # loop writes it again whole and starts a new checkpointer on the new file).
        uri = f"file:{urllib.parse.quote(os.path.abspath(self.path))}?mode=rw"  # any ?, # or %
        db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=0.0,
                             check_same_thread=True)
        db.execute(f"PRAGMA synchronous={'FULL' if self.sync == 'full' else 'NORMAL'}")
        return db

    def _run(self) -> None:
        db: sqlite3.Connection | None = None
        try:
            while not self._stop.wait(INTERVAL):
                try:
                    if db is None:
                        db = self._connect()
                    row = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:
                    self.failures += 1
                    if db is not None:
                        db.close()
                        db = None
                    now = time.monotonic()
                    if now - self._reported >= REPORT_EVERY:
                        self._reported = now
                        log.warning("journal %s: background checkpoint failed (%s); the broker's "
                                    "own commits checkpoint meanwhile", self.path, exc)
                    continue
                if row is not None and row[2] > 0:
                    self.checkpoints += 1
                    self.pages += row[2]
        finally:
            if db is not None:
                db.close()
