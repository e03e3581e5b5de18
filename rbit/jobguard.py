"""No job outlives its worker: a record of running jobs that the next start reads.

A job's processes run in a process group (and session) of their own, so that a
timeout or a cancel reaches all of them. The price is that nothing stops them when
the worker itself dies without a word (SIGKILL, the OOM killer, a power cut of the
container): they would go on running while RabbitMQ redelivers their job to the next
worker, and the job would run twice at once. ``PR_SET_PDEATHSIG`` cannot be set by a
``posix_spawn``-ed command, and a wrapper process per job would cost more than many
jobs.

So every worker process keeps a record, one file in a private per-user directory
(mode 0700, ``/dev/shm/rbit-UID`` -- or the temp directory when ``TMPDIR`` is set or
``/dev/shm`` is not writable), of:

* the process groups of its running jobs (``+ PGID STARTTIME`` when started,
  ``- PGID`` when gone), the leader's start time telling a group from a later one that
  reuses the number;
* the directories it made for body files.

It holds an exclusive ``flock`` on its file for as long as it lives; the kernel drops
the lock when the process dies, however it dies. :func:`reap_orphans`, called when a
worker starts and before it takes any job, takes every file whose lock it can get --
a dead worker's -- and stops the process groups still running there (SIGTERM, then
SIGKILL after the grace), removes the body file directories, and deletes the file.
The files of live workers, whatever their name or configuration, are left alone.

Writing the record costs one ``/proc/PID/stat`` read and two small appends per job.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable

log = logging.getLogger(__name__)

_SUFFIX = ".jobs"
_COMPACT_AT = 65536  # bytes of record after which an idle record is rewritten
_POLL = 0.05  # nothing signals the end of processes that are not our children
_KILL_WAIT = 5.0  # how long SIGKILLed groups may take to go
#: Seconds between SIGTERM and SIGKILL for a dead worker's jobs.
REAP_GRACE = 5.0


def record_dir() -> str:
    """The per-user directory of the records (not created here)."""
    root = "/dev/shm"  # noqa: S108 -- the parent of a private, checked directory
    if os.environ.get("TMPDIR") or not os.access(root, os.W_OK | os.X_OK):
        root = tempfile.gettempdir()
    return os.path.join(root, f"rbit-{os.getuid()}")


class _Record:
    """This process's record: running groups and body directories, in memory and file."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[int, int] = {}  # pgid -> leader's start time
        self._dirs: set[str] = set()
        self._fd = -1
        self._path = ""
        self._users = 0
        self._size = 0

    # -------------------------------------------------------------- the file

    def open(self, directory: str) -> None:
        with self._lock:
            self._users += 1
            if self._fd >= 0:
                return
            # Locked under a name no reaper looks at, then renamed: a starting worker
            # must never take a record for a dead worker's.
            fd, temp = tempfile.mkstemp(prefix=f"{os.getpid()}-", suffix=".new", dir=directory)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: never contended
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
                path = temp[: -len(".new")] + _SUFFIX
                os.rename(temp, path)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(temp)
                raise
            self._fd = fd
            self._path = path
            self._rewrite()

    def close(self) -> None:
        """The last user is done: the record goes, unless groups still run."""
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users or self._fd < 0 or self._groups:
                return
            self._drop()

    def at_exit(self) -> None:
        with self._lock:
            if self._fd >= 0 and not self._groups:
                self._drop()

    def _drop(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self._path)
        os.close(self._fd)
        self._fd = -1
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(self._path))  # fails while other workers have records

    def _rewrite(self) -> None:
        os.ftruncate(self._fd, 0)
        lines = [f"boot {_boot_id()}\n"] + [f"dir {path}\n" for path in sorted(self._dirs)]
        lines += [f"+ {pgid} {start}\n" for pgid, start in self._groups.items()]
        self._size = 0
        self._append("".join(lines))

    def _append(self, text: str) -> None:
        if self._fd >= 0:
            data = text.encode()
            os.write(self._fd, data)
            self._size += len(data)

    # ------------------------------------------------------------- the events

    def started(self, pid: int) -> None:
        start = _start_time(pid) or 0
        with self._lock:
            self._groups[pid] = start
            self._append(f"+ {pid} {start}\n")

    def ended(self, pid: int) -> None:
        with self._lock:
            if self._groups.pop(pid, None) is None:
                return
            if not self._groups and self._size > _COMPACT_AT and self._fd >= 0:
                self._rewrite()
            else:
                self._append(f"- {pid}\n")

    def dir_made(self, path: str) -> None:
        with self._lock:
            self._dirs.add(path)
            self._append(f"dir {path}\n")


_record = _Record()
weakref.finalize(_record, _record.at_exit)


def open_record() -> None:
    """Starts writing this process's record (a worker starts); see the module docs.

    A directory that is not private to this user (another owner, a symlink, a mode
    open to others) is not used: a warning says so and jobs are not recorded.
    """
    directory = record_dir()
    try:
        _private_dir(directory)
        _record.open(directory)
    except OSError as exc:
        log.warning("cannot keep a record of running jobs in %s (%s): a job of this worker "
                    "may outlive it if it is killed", directory, exc)


def close_record() -> None:
    """A worker stopped: the record goes once no worker of this process uses it."""
    _record.close()


def job_started(pid: int) -> None:
    """Records the process group of a job's process (its leader, ``pid``)."""
    _record.started(pid)


def job_ended(pid: int) -> None:
    """The job's process group is gone."""
    _record.ended(pid)


def dir_made(path: str) -> None:
    """Records a private directory to remove if this worker dies."""
    _record.dir_made(path)


# ---------------------------------------------------------------- the next start


def reap_orphans(grace: float = REAP_GRACE) -> int:
    """Stops what dead workers of this user left running; removes what they left.

    Args:
        grace: Seconds between SIGTERM and SIGKILL.

    Returns:
        How many process groups were stopped.
    """
    directory = record_dir()
    try:
        names = [name for name in os.listdir(directory) if name.endswith(_SUFFIX)]
    except OSError:
        return 0
    stopped = 0
    for name in names:
        stopped += _reap_file(os.path.join(directory, name), grace)
    return stopped


def _reap_file(path: str, grace: float) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return 0  # removed meanwhile by another starting worker
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # its worker lives
        if os.fstat(fd).st_uid != os.getuid():
            return 0
        with os.fdopen(os.dup(fd), "r", encoding="utf-8", errors="replace") as file:
            boot, dirs, groups = _parse(file.read())
        live = [pgid for pgid, start in groups.items() if boot == _boot_id() and
                _is_the_group(pgid, start)]
        if live:
            log.warning("a worker that died left %d job process group(s) running (%s); "
                        "stopping them before taking jobs", len(live),
                        ", ".join(map(str, live)))
        left = _stop_groups(live, grace)
        for directory in dirs:
            _remove_private_dir(directory)
        if left:
            log.error("process group(s) %s survived SIGKILL; trying again at the next start",
                      ", ".join(map(str, left)))
        else:
            with contextlib.suppress(FileNotFoundError):  # another start was quicker
                os.unlink(path)
        return len(live)
    finally:
        os.close(fd)


def _parse(text: str) -> tuple[str, list[str], dict[int, int]]:
    boot, dirs, groups = "", [], {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        try:
            if kind == "boot":
                boot = rest
            elif kind == "dir":
                dirs.append(rest)
            elif kind == "+":
                pgid, start = rest.split()
                groups[int(pgid)] = int(start)
            elif kind == "-":
                groups.pop(int(rest), None)
        except ValueError:
            continue  # a line cut short by the death of its writer
    return boot, dirs, groups


def _is_the_group(pgid: int, start: int) -> bool:
    """Whether ``pgid`` still names the recorded group, not a later one.

    While its leader lives, its start time tells. Once the leader is gone the number
    cannot be reused while any process is still in that group, so any member is ours.
    """
    if pgid <= 1 or not start:
        return False  # never a group rbit made, or no /proc to tell groups apart
    from rbit.supervisor import group_alive  # the supervisor imports this module

    now = _start_time(pgid)
    if now is not None:
        return now == start
    return group_alive(pgid)


def _stop_groups(groups: Iterable[int], grace: float) -> list[int]:
    """SIGTERM, SIGKILL after ``grace``; returns the groups still alive after both."""
    from rbit.supervisor import group_alive, signal_group

    left = list(groups)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, _KILL_WAIT)):
        for pgid in left:
            signal_group(pgid, sig, "orphaned job")
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            time.sleep(_POLL)  # the group members are not our children: nothing to wait on
            left = [pgid for pgid in left if group_alive(pgid)]
        if not left:
            break
    return left


def _remove_private_dir(path: str) -> None:
    try:
        info = os.lstat(path)
    except OSError:
        return
    if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
        shutil.rmtree(path, ignore_errors=True)


def _private_dir(path: str) -> None:
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(f"{path} is not a directory private to this user")


def _start_time(pid: int) -> int | None:
    """A process's start time (clock ticks since boot), or None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


_BOOT_ID: list[str] = []


def _boot_id() -> str:
    if not _BOOT_ID:
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as file:
                _BOOT_ID.append(file.read().strip())
        except OSError:
            _BOOT_ID.append("")
    return _BOOT_ID[0]
