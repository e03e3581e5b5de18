"""The state directory: job history and paused queues, kept across restarts.

One SQLite database, ``state.sqlite3`` in ``[rbit] state_dir`` (directory created 0700,
files 0600). It runs in WAL mode with ``synchronous=NORMAL``: a commit is atomic and
durable against a killed process (SIGKILL loses nothing that was committed, and never
leaves a torn write: SQLite's log makes each transaction all or nothing); only a power
loss may lose the last transactions, never corrupt the file. FULL would add an fsync
per commit for that case alone, which history does not need. Paused queues are
written with ``synchronous=FULL`` at once, since an operator relies on them.

Recording never blocks a job: the job's entry is appended to its queue's in-memory deque
(one atomic append, by the deque's own ``append``: :meth:`StateStore.keeper`), and a
writer thread turns the entries into rows (status names, durations, bounded messages,
usage as JSON), commits what has gathered every :data:`FLUSH_INTERVAL` seconds (one
INSERT statement for up to :data:`INSERT_ROWS` rows: SQLite's steps run without the GIL,
and one step per row would hand it to the job and I/O threads and back once per row),
then prunes each queue to its last ``history_depth`` outcomes. The writer wakes on its
timer only, never per job. Each deque holds at most ``history_depth`` entries (an older
one would be pruned at once): a busy worker's history costs a bounded number of rows and
objects per interval, however many jobs it runs. A worker killed before a flush loses at
most the outcomes of that last interval from its history (never a job: history is a
record, not the source of truth).
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: The writer's pause between two batches (seconds).
FLUSH_INTERVAL = 1.0
#: A history message keeps at most this many characters (the end of it).
MAX_MESSAGE = 500
DB_NAME = "state.sqlite3"
#: History rows per INSERT statement: 9 values each, within the 999 parameters the
#: oldest SQLite versions allow a statement.
INSERT_ROWS = 100

_INSERT = ("INSERT INTO history (job_id, queue, status, attempt, started, ended, duration, "
           "message, usage) VALUES ")
_ROW_VALUES = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL, queue TEXT NOT NULL, status TEXT NOT NULL,
    attempt INTEGER NOT NULL, started REAL NOT NULL, ended REAL NOT NULL,
    duration REAL NOT NULL, message TEXT NOT NULL, usage TEXT);
CREATE INDEX IF NOT EXISTS history_queue ON history (queue, id);
CREATE TABLE IF NOT EXISTS paused (queue TEXT PRIMARY KEY);
"""


@dataclass(frozen=True)
class JobRecord:
    """One job's outcome as kept in the history (times are Unix seconds)."""

    job_id: str
    queue: str
    status: str
    attempt: int
    started: float
    ended: float
    duration: float
    message: str
    #: What the job used (``wall_s``, ``cpu_s``, ``max_rss_kib``), None if not metered.
    usage: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: A history row before the writer bounds its message and writes its usage as JSON:
#: the fields of a :class:`JobRecord`, in order; the usage is a
#: :class:`rbit.usage.Usage` or None. A queue's keeper (:meth:`StateStore.keeper`)
#: takes one of these, or a job's entry (:class:`HistoryEntry`), which costs a job's
#: path nothing more.
RecordTuple = tuple[str, str, str, int, float, float, float, str, Any]


class HistoryEntry(Protocol):
    """A job's entry as the job pools keep it (:class:`rbit.dispatch.JobStatus`)."""

    queue: str

    def history_row(self) -> RecordTuple:
        """The entry's :data:`RecordTuple` (called on the writer thread)."""


def open_state_dir(path: str) -> str:
    """Create ``path`` (0700) if needed and return the database file's path."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    db = os.path.join(path, DB_NAME)
    if not os.path.exists(db):
        os.close(os.open(db, os.O_CREAT | os.O_WRONLY, 0o600))
    return db


class StateStore:
    """History and paused queues in SQLite, with a writer thread.

    Args:
        path: The state directory.
        history_depth: Outcomes kept per queue (0: record none).
    """

    def __init__(self, path: str, history_depth: int = 100) -> None:
        self.path = path
        self.depth = history_depth
        self._db_path = open_state_dir(path)
        # queue -> its outcomes not yet written, the last history_depth of them.
        self._pending: dict[str, collections.deque[RecordTuple | HistoryEntry]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one connection, shared by the writer and readers
        self._db = sqlite3.connect(self._db_path, check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        _add_usage_column(self._db)
        for suffix in ("-wal", "-shm"):  # SQLite creates them with the umask
            if os.path.exists(self._db_path + suffix):
                os.chmod(self._db_path + suffix, 0o600)
        self._thread = threading.Thread(target=self._run, name="rbit-state", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Write what is pending and close the database."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(10.0)
        self._flush()
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ history

    def keeper(self, queue: str) -> Callable[[RecordTuple | HistoryEntry], None]:
        """What queues ``queue``'s outcomes for the writer (any thread; never blocks).

        It takes a row, or a job's entry whose row the writer thread builds. It is the
        ``append`` of the queue's deque itself: a C call, with no Python frame, on
        every job's path (:class:`rbit.control.observer.JobObserver` asks for it once
        per queue).
        """
        pending = self._pending.get(queue)
        if pending is None:  # setdefault: atomic, should two threads race here
            pending = self._pending.setdefault(queue, collections.deque(maxlen=self.depth))
        return pending.append

    def history(self, queue: str, depth: int) -> list[dict[str, Any]]:
        """The last ``depth`` outcomes of ``queue``, newest first (pending ones too)."""
        self._flush()
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, queue, status, attempt, started, ended, duration, message, "
                "usage FROM history WHERE queue = ? ORDER BY id DESC LIMIT ?",
                (queue, max(0, depth))).fetchall()
        return [JobRecord(*row[:8], _usage_from_json(row[8])).to_dict() for row in rows]

    def flush(self) -> None:
        """Commit what is pending now (the writer does it on its own)."""
        self._flush()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(FLUSH_INTERVAL)
            self._wake.clear()
            try:
                self._flush()
            except sqlite3.Error:
                log.exception("cannot write the job history to %s", self._db_path)
                time.sleep(1.0)  # a full disk: do not spin

    def _flush(self) -> None:
        # Under the lock: a reader's flush and the writer's take and write in turn, so
        # that rows are written in the order their jobs ended.
        with self._lock:
            rows = [_row(item) for pending in list(self._pending.values())
                    for item in _take(pending)]
            if not rows or not self.depth:
                return
            with self._db:
                self._db.execute("BEGIN")
                _insert(self._db, rows)
                for queue in {row[1] for row in rows}:
                    self._db.execute(
                        "DELETE FROM history WHERE queue = ? AND id <= (SELECT id FROM "
                        "history WHERE queue = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                        (queue, queue, self.depth))

    # ------------------------------------------------------------------- paused

    def paused(self) -> set[str]:
        """The queues paused, as last saved."""
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT queue FROM paused")}

    def set_paused(self, queues: set[str]) -> None:
        """Save the paused queues now (durably: an operator relies on it)."""
        with self._lock, self._db:
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM paused")
            self._db.executemany("INSERT INTO paused (queue) VALUES (?)",
                                 [(q,) for q in sorted(queues)])
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")


def _insert(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Insert ``rows`` in order, :data:`INSERT_ROWS` to a statement.

    ``executemany`` would step SQLite once per row, and the sqlite3 module lets go of
    the GIL around each step: a hand-over to the job and I/O threads and back, per
    row. One statement per batch takes it once.
    """
    for start in range(0, len(rows), INSERT_ROWS):
        chunk = rows[start:start + INSERT_ROWS]
        db.execute(_INSERT + ", ".join([_ROW_VALUES] * len(chunk)),
                   list(itertools.chain.from_iterable(chunk)))


def _take(pending: collections.deque) -> list[Any]:
    """What ``pending`` holds now; job threads may append meanwhile."""
    return [pending.popleft() for _ in range(len(pending))]


def _row(item: RecordTuple | HistoryEntry) -> tuple[Any, ...]:
    """The database row of an outcome: its message bounded, its usage as JSON."""
    row = item if item.__class__ is tuple else item.history_row()  # type: ignore[union-attr]
    usage = row[8] if len(row) > 8 else None
    return (*row[:7], row[7][-MAX_MESSAGE:], None if usage is None else _usage_json(usage))


_USAGE_JSON = '{"wall_s": %r, "cpu_s": %r, "max_rss_kib": %s}'
_isfinite = math.isfinite


def _usage_json(usage: Any) -> str:
    """``json.dumps(usage.to_dict())``, in a quarter of its time.

    Every written row has one: at a few hundred jobs a second, every job's. A finite
    float's ``repr`` is what json writes for it; the rest goes through json.
    """
    wall, cpu, rss = round(usage.wall_s, 6), round(usage.cpu_s, 6), usage.max_rss_kib
    if (rss is not None and rss.__class__ is not int) or not (_isfinite(wall) and _isfinite(cpu)):
        return json.dumps(usage.to_dict())
    return _USAGE_JSON % (wall, cpu, "null" if rss is None else rss)


def _add_usage_column(db: sqlite3.Connection) -> None:
    """A history written before jobs were metered gets its ``usage`` column."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(history)")}
    if "usage" not in columns:
        db.execute("ALTER TABLE history ADD COLUMN usage TEXT")


def _usage_from_json(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        usage = json.loads(text)
    except ValueError:
        return None
    return usage if isinstance(usage, dict) else None
