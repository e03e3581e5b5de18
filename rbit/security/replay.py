"""The replay window: which signed jobs a worker has already taken, across restarts.

A signed job is remembered by its key id and message id (a retry also by its try
number) until its signature would be refused as stale anyway (signing time +
``max_skew``; a retry's ``until``), so the window stays bounded by ``max_skew``. The
file is SQLite (WAL, ``synchronous=NORMAL``: a commit costs no fsync, and a power loss
forgets at most the last moments, which a replay within them could exploit), mode 0600.
"""

from __future__ import annotations

import os
import sqlite3
import threading

#: Expired entries are purged after this many inserts.
_PURGE_EVERY = 1000


class ReplayWindow:
    """Remembered (key, message) pairs; thread-safe.

    Args:
        path: The SQLite file (created 0600, its directory 0700, when missing).

    Raises:
        OSError, sqlite3.Error: The file cannot be created or opened.
    """

    def __init__(self, path: str) -> None:
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS seen (key TEXT PRIMARY KEY, "
                         "until REAL NOT NULL)")
        self._lock = threading.Lock()
        self._inserts = 0

    def first_time(self, key: str, until: float, now: float) -> bool:
        """Record ``key`` until ``until``; False if it was already recorded and live."""
        with self._lock:
            row = self._db.execute("SELECT until FROM seen WHERE key = ?", (key,)).fetchone()
            if row is not None and row[0] >= now:
                return False
            self._db.execute("INSERT OR REPLACE INTO seen VALUES (?, ?)", (key, until))
            self._inserts += 1
            if self._inserts % _PURGE_EVERY == 0:
                self._db.execute("DELETE FROM seen WHERE until < ?", (now,))
            return True

    def close(self) -> None:
        with self._lock:
            self._db.close()
