"""A durable set of accepted credit event ids.

The credit runner records the ids of every batch the credit server accepted here
*before* it acks the events, so that an event RabbitMQ redelivers later (after a crash,
a lost connection, a stale delivery) is recognised and not counted twice.

The store is one SQLite file (standard library, one commit per batch, which SQLite makes
durable with fsync). Entries older than ``keep_days`` are pruned when the store opens:
RabbitMQ redelivers within minutes or hours, not weeks, so the file stays small.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable

from rbit.errors import RbitError

logger = logging.getLogger(__name__)

_SCHEMA = "CREATE TABLE IF NOT EXISTS accepted (id TEXT PRIMARY KEY, at REAL NOT NULL)"


class SeenStoreError(RbitError):
    """The seen-ids file could not be opened, read or written."""


def default_path() -> str:
    """``$XDG_STATE_HOME/rbit/credit-seen.sqlite3`` (``~/.local/state`` by default)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(state, "rbit", "credit-seen.sqlite3")


class SeenIds:
    """Event ids the credit server already accepted, kept in a SQLite file.

    Safe to use from several threads: one connection, guarded by a lock.

    Args:
        path: The SQLite file; it and its directory are created (mode 0600 / 0700).
        keep_days: Entries older than this are deleted when the store opens.
        clock: Wall-clock time source (seconds since the epoch), for tests.

    Raises:
        SeenStoreError: The file cannot be created or opened.
    """

    def __init__(
        self, path: str, *, keep_days: float = 30.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        try:
            _create_private(path)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            # FULL: a commit returns only once the ids are on disk; the ack follows it.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise SeenStoreError(f"cannot open seen-ids store {path}: {exc}") from exc
        self.prune(keep_days)

    def __contains__(self, event_id: object) -> bool:
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT 1 FROM accepted WHERE id = ?", (event_id,)
                ).fetchone()
            except sqlite3.Error as exc:
                raise SeenStoreError(f"cannot read seen-ids store {self.path}: {exc}") from exc
        return row is not None

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM accepted").fetchone()[0]

    def add_many(self, ids: Iterable[str]) -> None:
        """Record ``ids`` as accepted, durably (one transaction, committed on return).

        Raises:
            SeenStoreError: The write failed; nothing was recorded.
        """
        now = self._clock()
        rows = [(event_id, now) for event_id in ids]
        with self._lock:
            try:
                with _transaction(self._db):
                    self._db.executemany(
                        "INSERT OR IGNORE INTO accepted (id, at) VALUES (?, ?)", rows
                    )
            except sqlite3.Error as exc:
                raise SeenStoreError(f"cannot write seen-ids store {self.path}: {exc}") from exc

    def prune(self, keep_days: float) -> int:
        """Delete entries older than ``keep_days``; returns how many went."""
        cutoff = self._clock() - keep_days * 86400.0
        with self._lock:
            try:
                with _transaction(self._db):
                    gone = self._db.execute("DELETE FROM accepted WHERE at < ?", (cutoff,)).rowcount
            except sqlite3.Error as exc:
                raise SeenStoreError(f"cannot prune seen-ids store {self.path}: {exc}") from exc
        if gone:
            logger.info(
                "pruned %d accepted credit event ids older than %s days from %s",
                gone,
                keep_days,
                self.path,
            )
        return gone

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()


class _transaction:
    """BEGIN ... COMMIT (or ROLLBACK) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def _create_private(path: str) -> None:
    """Create ``path`` (and its directory) readable by the owner only, if missing."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    # SQLite gives its journal files the database file's mode, so 0600 here covers them.
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
