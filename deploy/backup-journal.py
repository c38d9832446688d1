#!/usr/bin/env python3
"""Copy a respworkers journal while its broker runs: sqlite's online backup API.

    python3 deploy/backup-journal.py /var/lib/respworkers/journal.sqlite3 /backup/journal.sqlite3

The copy is one consistent snapshot (one read transaction of the WAL journal: the broker
goes on writing meanwhile), checked with PRAGMA integrity_check, written beside the target
and renamed over it, so a target file is always a whole copy. Run it as the broker's user
(a reader of a WAL database needs write access to its -shm file). Standard library only.
A broker started on the copy (rw broker --journal COPY) has the jobs of that moment.
"""

from __future__ import annotations

import os
import sqlite3
import sys


def backup(source: str, target: str) -> int:
    """Copy ``source`` to ``target``; returns the number of jobs in the copy."""
    tmp = f"{target}.part"
    if os.path.exists(tmp):
        os.unlink(tmp)
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=10.0)
    try:
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)  # pages=-1: the whole file in one step, one snapshot
            check = dst.execute("PRAGMA integrity_check").fetchone()[0]
            if check != "ok":
                raise SystemExit(f"backup-journal: the copy fails integrity_check: {check}")
            jobs = dst.execute("SELECT count(*) FROM jobs").fetchone()[0]
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            dst.close()
    finally:
        src.close()
    os.replace(tmp, target)
    return int(jobs)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    jobs = backup(argv[1], argv[2])
    print(f"{argv[1]} -> {argv[2]}: {jobs} jobs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
