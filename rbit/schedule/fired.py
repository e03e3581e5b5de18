"""The files a ``watch`` schedule has fired, kept across restarts.

One SQLite database, ``watched.sqlite3`` in ``[rbit] state_dir`` (directory 0700), a
row per fired file: the schedule, the file's key (see :func:`rbit.schedule.watch.file_key`:
path, inode, modification time and size), its path and when it was fired. A row is
written only once the broker confirmed the file's job, so a crash in between fires the
file again at the next start, with the same job id. Rows of files that are gone are
dropped at each start (a file that comes back is a new file: another inode or time).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable

DB_NAME = "watched.sqlite3"


class FiredFiles:
    """The fired files of one schedule.

    Args:
        state_dir: ``[rbit] state_dir`` (created 0700 when missing).
        schedule: The schedule's name.

    Raises:
        OSError, sqlite3.Error: The database cannot be created or opened.
    """

    def __init__(self, state_dir: str, schedule: str) -> None:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self._schedule = schedule
        self._db = sqlite3.connect(os.path.join(state_dir, DB_NAME), timeout=30.0,
                                   isolation_level=None)
        self._db.execute("CREATE TABLE IF NOT EXISTS fired (schedule TEXT NOT NULL, "
                         "key TEXT NOT NULL, path TEXT NOT NULL, at REAL NOT NULL, "
                         "PRIMARY KEY (schedule, key))")

    def seen(self, key: str) -> bool:
        """Whether the file of ``key`` was fired."""
        row = self._db.execute("SELECT 1 FROM fired WHERE schedule = ? AND key = ?",
                               (self._schedule, key)).fetchone()
        return row is not None

    def add(self, key: str, path: str) -> None:
        """Record the file of ``key`` as fired (after its publish was confirmed)."""
        self._db.execute("INSERT OR IGNORE INTO fired VALUES (?, ?, ?, ?)",
                         (self._schedule, key, path, time.time()))

    def keep_only(self, keys: Iterable[str]) -> None:
        """Forget the fired files whose key is not in ``keys`` (those files are gone)."""
        present = set(keys)
        rows = self._db.execute("SELECT key FROM fired WHERE schedule = ?", (self._schedule,))
        gone = [(self._schedule, key) for (key,) in rows if key not in present]
        if gone:
            self._db.executemany("DELETE FROM fired WHERE schedule = ? AND key = ?", gone)

    def close(self) -> None:
        self._db.close()
