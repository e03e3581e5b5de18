"""``watch = DIR``: one job per file that arrives complete in a directory, once.

A file is complete when it was written and closed (inotify ``IN_CLOSE_WRITE``) or moved
into DIR (``IN_MOVED_TO``; writing elsewhere and moving in is atomic, and the way to
go for writers that close a file before it is whole). Only names matching ``pattern``
(a glob, default ``*``) count; names starting with a dot only when the pattern does,
as in a shell, so a writer's hidden temporary file is not taken. Regular files only.

Files that arrived while no worker was watching are found at start: the watch is set
first, then DIR is listed, so no file falls in between. A file found at start is taken
as complete (a writer still busy at that moment should write elsewhere and move in).

Once: each fired file is recorded (:mod:`rbit.schedule.fired`) under its key, a hash of
path, inode, modification time and size, only after the broker confirmed its job. The
job id is ``NAME@<the key's first 16 hex digits>``, so a file fired again after a crash
between the confirm and the record carries the same id. A changed file (rewritten in
place) has a new key, and is a new file.

The job: the body is the file's path (UTF-8) unless the section gives ``body =`` /
``body_file =``; the ``x-schedule-file`` header always carries the path. A watch is
local: every worker carrying the section watches its own DIR.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import select
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from rbit.errors import BrokerError, Unroutable
from rbit.schedule import inotify
from rbit.schedule.fire import SCHEDULE_HEADER, iso_utc
from rbit.schedule.fired import FiredFiles

if TYPE_CHECKING:
    from rbit.config import Settings
    from rbit.schedule.settings import ScheduleSettings

log = logging.getLogger(__name__)

FILE_HEADER = "x-schedule-file"
_EVENTS = inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_TO | inotify.IN_ONLYDIR
_GONE = inotify.IN_DELETE_SELF | inotify.IN_MOVE_SELF | inotify.IN_IGNORED
#: How long one wait for inotify events lasts (how soon a stop is noticed).
WAIT_SECONDS = 0.5
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class WatchFiles:
    """The ``watch`` trigger: ``directory`` and the file name ``pattern``."""

    directory: str
    pattern: str = "*"

    def matches(self, name: str) -> bool:
        """Whether a file called ``name`` is one to fire."""
        if name.startswith(".") and not self.pattern.startswith("."):
            return False
        return fnmatch.fnmatchcase(name, self.pattern)

    def describe(self) -> str:
        return f"watch {self.directory} ({self.pattern})"


def parse_watch(section: Any, value: str) -> WatchFiles:
    """``watch = DIR`` (an absolute path to an existing directory) with ``pattern =``."""
    directory = value.strip()
    if not os.path.isabs(directory):
        raise section.error("watch", f"expected an absolute path, got {directory[:200]!r}")
    if not os.path.isdir(directory):
        raise section.error("watch", f"directory {directory[:200]!r} does not exist")
    if not os.access(directory, os.R_OK | os.X_OK):
        raise section.error("watch", f"directory {directory[:200]!r} cannot be read")
    pattern = section.text("pattern", "*")
    if not pattern or "/" in pattern:
        raise section.error("pattern", f"expected a file name pattern such as *.pdf, "
                                       f"got {pattern[:80]!r}")
    return WatchFiles(os.path.normpath(directory), pattern)


def file_key(path: str, info: os.stat_result) -> str:
    """The hex key a file is recorded under: path, inode, mtime (ns) and size."""
    text = f"{path}\0{info.st_ino}\0{info.st_mtime_ns}\0{info.st_size}"
    return hashlib.sha256(os.fsencode(text)).hexdigest()


def job_id(schedule: str, key: str) -> str:
    """The job id of the file of ``key``: ``NAME@<16 hex digits>``."""
    return f"{schedule}@{key[:16]}"


class WatchSource:
    """Watches one schedule's directory in a thread and fires its files.

    Jobs are published through a :class:`rbit.client.Client` of its own (confirmed,
    mandatory, signed when a key is set), opened while there are files to fire.

    Args:
        schedule: The ``[schedule:NAME]`` section, with a :class:`WatchFiles` trigger.
        settings: The worker's settings (``[amqp]``, ``[rbit] state_dir``, signing).
        client_factory: Opens a publishing client (tests inject their own).
    """

    def __init__(self, schedule: ScheduleSettings, settings: Settings,
                 client_factory: Any = None) -> None:
        self.schedule = schedule
        self.trigger: WatchFiles = schedule.trigger
        self.settings = settings
        self._client_factory = client_factory or self._open_client
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: dict[str, None] = {}  # paths to fire, in arrival order
        self.last_fire: float | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"rbit-watch-{self.schedule.name}")
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def describe(self) -> dict[str, Any]:
        """The schedule as ``rbit ctl status`` shows it."""
        last = self.last_fire
        return {"name": self.schedule.name, "trigger": self.trigger.describe(),
                "role": "local", "next_fire": None,
                "last_fire": iso_utc(datetime.fromtimestamp(last, UTC)) if last else None}

    # -- the thread ---------------------------------------------------------------

    def _open_client(self) -> Any:
        from rbit.client import Client
        return Client(self.settings, f"rbit watch {self.schedule.name}")

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._watch()
                return
            except (BrokerError, OSError) as exc:
                delay = RETRY_DELAYS[min(failures, len(RETRY_DELAYS) - 1)]
                log.warning("schedule %s: %s; watching again in %.0f s",
                            self.schedule.name, exc, delay)
            except Exception:  # the thread must outlive any bug in one pass
                delay = RETRY_DELAYS[-1]
                log.exception("schedule %s: unexpected error; watching again in %.0f s",
                              self.schedule.name, delay)
            # A watch that ran a while before failing starts its backoff afresh.
            failures = 1 if time.monotonic() - started > RETRY_DELAYS[-1] else failures + 1
            self._stop.wait(delay)

    def _watch(self) -> None:
        notify = inotify.Inotify()
        record = FiredFiles(self.settings.state.state_dir, self.schedule.name)
        try:
            notify.add_watch(self.trigger.directory, _EVENTS)
            self._scan(record)
            log.info("schedule %s: watching %s for %s", self.schedule.name,
                     self.trigger.directory, self.trigger.pattern)
            while not self._stop.is_set():
                self._fire_pending(record)
                self._wait(notify)
        finally:
            notify.close()
            record.close()

    def _scan(self, record: FiredFiles) -> None:
        """Queue the files already in DIR that were not fired; forget those gone."""
        found = sorted(self._files(), key=lambda item: item[1].st_mtime_ns)
        record.keep_only(file_key(path, info) for path, info in found)
        for path, _info in found:
            self._pending[path] = None
        if found:
            log.info("schedule %s: %d file(s) in %s at start", self.schedule.name,
                     len(found), self.trigger.directory)

    def _files(self) -> Iterator[tuple[str, os.stat_result]]:
        with os.scandir(self.trigger.directory) as entries:
            for entry in entries:
                if not self.trigger.matches(entry.name):
                    continue
                try:
                    info = entry.stat()
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(info.st_mode):
                    yield entry.path, info

    def _wait(self, notify: inotify.Inotify) -> None:
        ready, _, _ = select.select([notify.fd], [], [], WAIT_SECONDS)
        if not ready:
            return
        for event in notify.read():
            if event.mask & inotify.IN_Q_OVERFLOW:
                log.warning("schedule %s: too many events at once; listing %s again",
                            self.schedule.name, self.trigger.directory)
                for path, _info in self._files():
                    self._pending[path] = None
            elif event.mask & _GONE:
                raise OSError(f"watched directory {self.trigger.directory} went away")
            elif self.trigger.matches(os.fsdecode(event.name)):
                self._pending[os.path.join(self.trigger.directory,
                                           os.fsdecode(event.name))] = None

    def _fire_pending(self, record: FiredFiles) -> None:
        if not self._pending:
            return
        client = self._client_factory()
        try:
            while self._pending and not self._stop.is_set():
                path = next(iter(self._pending))
                self._fire(client, record, path)
                del self._pending[path]
        finally:
            client.close()

    def _fire(self, client: Any, record: FiredFiles, path: str) -> None:
        try:
            info = os.stat(path)
        except FileNotFoundError:
            return  # gone before it could be fired
        if not stat.S_ISREG(info.st_mode):
            return
        key = file_key(path, info)
        if record.seen(key):
            return
        name = self.schedule.name
        try:
            publish_file(client, self.schedule, path, job_id(name, key))
        except Unroutable as exc:
            # Not recorded: fired again at the next start, once a queue takes it.
            log.error("schedule %s: file %s was not delivered: %s", name, path, exc)
            return
        except UnicodeEncodeError:
            log.error("schedule %s: skipping %r: its name is not UTF-8", name, path)
            record.add(key, path)
            return
        record.add(key, path)
        self.last_fire = time.time()
        log.info("schedule %s: fired job %s for %s", name, job_id(name, key), path)


def publish_file(client: Any, schedule: ScheduleSettings, path: str, fire_id: str) -> None:
    """Publish the job of the file at ``path`` and wait for the confirm.

    Raises:
        UnicodeEncodeError: The path is not valid UTF-8.
        Unroutable: No queue would receive it.
        BrokerError: The broker refused it or the connection failed.
    """
    path.encode("utf-8")  # a header must be text: an undecodable name cannot be sent
    headers = dict(schedule.headers)
    headers[SCHEDULE_HEADER] = schedule.name
    headers[FILE_HEADER] = path
    body = schedule.body or path.encode("utf-8")
    client.publish(schedule.exchange, schedule.routing_key, body, job_id=fire_id,
                   headers=headers, content_type=schedule.content_type)
