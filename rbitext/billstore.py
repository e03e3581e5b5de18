"""What group billing must not forget: last billed readings, group totals, the outbox.

One SQLite file (created 0600 in a 0700 directory, ``synchronous=FULL``: a commit
returns once it is on disk). Three tables:

* ``readings`` -- the last billed reading of each (group, metric): the baseline the
  next increase is billed from, and its time;
* ``groups`` -- per group, the credits billed so far (for the grant warnings), the
  fraction of a credit carried to the next credit events, and how many grant warning
  levels were already reported;
* ``outbox`` -- messages decided but not yet confirmed by RabbitMQ (bills, credit
  events, grant warnings).

A bill is decided in one transaction that moves the baseline, updates the group's
totals *and* writes the bill's messages to the outbox (a transactional outbox). The
messages are published afterwards, with their derived ids, and deleted once the
broker confirmed them. A process killed at any point therefore either decided nothing
(the reading is billed again, the same way) or left its messages in the outbox, which
the next start publishes again, under the same ids.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from rbit.errors import RbitError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    grp TEXT NOT NULL, metric TEXT NOT NULL, value TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (grp, metric));
CREATE TABLE IF NOT EXISTS groups (
    grp TEXT PRIMARY KEY, billed TEXT NOT NULL, carry TEXT NOT NULL, levels INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, message_id TEXT NOT NULL,
    exchange TEXT NOT NULL, routing_key TEXT NOT NULL, body BLOB NOT NULL);
"""


class BillStoreError(RbitError):
    """The billing state file could not be opened, read or written."""


@dataclass(frozen=True)
class Reading:
    """The last billed reading of one (group, metric)."""

    value: Decimal
    time: float


@dataclass(frozen=True)
class GroupTotals:
    """What a group was billed so far (see the module docstring)."""

    billed: Decimal = Decimal(0)
    carry: Decimal = Decimal(0)
    levels: int = 0


@dataclass(frozen=True)
class OutboxItem:
    """A message decided but not yet confirmed.

    Attributes:
        kind: ``bill``, ``credit`` (a credit event) or ``warning`` (a grant warning:
            ``body`` is its text; it is reported, not published).
        message_id: The AMQP ``message_id`` (derived: the same on every try).
        exchange: Where it goes ...
        routing_key: ... and with which key.
        body: The message body.
        seq: Its place in the outbox (0 until stored).
    """

    kind: str
    message_id: str
    exchange: str
    routing_key: str
    body: bytes
    seq: int = 0


class BillStore:
    """The billing state in a SQLite file; safe to share between threads.

    Args:
        path: The file; it and its directory are created if missing.

    Raises:
        BillStoreError: The file cannot be created or opened.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            _create_private(path)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise BillStoreError(f"cannot open billing state {path}: {exc}") from exc

    def reading(self, group: str, metric: str) -> Reading | None:
        """The last billed reading of ``(group, metric)``, if any."""
        row = self._one("SELECT value, at FROM readings WHERE grp = ? AND metric = ?",
                        (group, metric))
        return None if row is None else Reading(Decimal(row[0]), row[1])

    def totals(self, group: str) -> GroupTotals:
        """The group's totals (zeros for a group never billed)."""
        row = self._one("SELECT billed, carry, levels FROM groups WHERE grp = ?", (group,))
        return GroupTotals() if row is None else GroupTotals(Decimal(row[0]), Decimal(row[1]),
                                                             row[2])

    def save(self, group: str, metric: str, reading: Reading,
             totals: GroupTotals | None = None, outbox: Sequence[OutboxItem] = ()) -> None:
        """Record a reading, and the group's new totals and messages, in one transaction.

        Raises:
            BillStoreError: The write failed; nothing was recorded.
        """
        def write(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO readings (grp, metric, value, at) "
                       "VALUES (?, ?, ?, ?)", (group, metric, str(reading.value), reading.time))
            if totals is not None:
                db.execute("INSERT OR REPLACE INTO groups (grp, billed, carry, levels) "
                           "VALUES (?, ?, ?, ?)",
                           (group, str(totals.billed), str(totals.carry), totals.levels))
            db.executemany(
                "INSERT INTO outbox (kind, message_id, exchange, routing_key, body) "
                "VALUES (?, ?, ?, ?, ?)",
                [(i.kind, i.message_id, i.exchange, i.routing_key, i.body) for i in outbox])

        self._write(write)

    def outbox(self) -> list[OutboxItem]:
        """The messages not yet confirmed, oldest first."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT kind, message_id, exchange, routing_key, body, seq FROM outbox "
                    "ORDER BY seq").fetchall()
            except sqlite3.Error as exc:
                raise BillStoreError(f"cannot read billing state {self.path}: {exc}") from exc
        return [OutboxItem(k, m, e, r, bytes(b), s) for k, m, e, r, b, s in rows]

    def sent(self, seqs: Iterable[int]) -> None:
        """Forget outbox messages the broker confirmed."""
        rows = [(seq,) for seq in seqs]
        self._write(lambda db: db.executemany("DELETE FROM outbox WHERE seq = ?", rows))

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()

    def _one(self, sql: str, args: tuple) -> tuple | None:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchone()
            except sqlite3.Error as exc:
                raise BillStoreError(f"cannot read billing state {self.path}: {exc}") from exc

    def _write(self, write) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    write(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise BillStoreError(f"cannot write billing state {self.path}: {exc}") from exc


def _create_private(path: str) -> None:
    """Create ``path`` (and its directory) readable by the owner only, if missing."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    # SQLite gives its journal files the database file's mode, so 0600 covers them.
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
