"""Body files: where a job's body waits for its command, and what is made ahead."""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import shutil
import tempfile
import threading
import weakref
from typing import TYPE_CHECKING

from rbit import jobguard
from rbit.fdloop import FdLoop, Timer
from rbit.runners.shell.spawn import Pipes

if TYPE_CHECKING:
    from rbit.runners.shell.job import Job

log = logging.getLogger(__name__)

_TIDY_DELAY = 0.02  # how long an ended job keeps its fds when no other job starts


class BodyFiles:
    """Job bodies as files in a private directory (mode 0700) of one runner.

    The directory is in memory (under ``/dev/shm``) when that is writable and
    ``TMPDIR`` names no other place: a body file is written, read once or twice and
    removed within a job, and on a disk file system creating and removing it cost
    more than running a short command. A body that does not fit there (a container's
    small ``/dev/shm``) goes to a second private directory under the temp directory.
    """

    def __init__(self) -> None:
        self._names = itertools.count(1)  # next() is atomic under the GIL
        memory = _memory_dir()
        self._main = _BodyDir(memory or tempfile.gettempdir())
        self._main.make()  # now: a directory that cannot be made is a load error
        self._spill = _BodyDir(tempfile.gettempdir()) if memory else None

    def create(self) -> tuple[int, str]:
        """Creates an empty body file (mode 0600); returns an fd open on it and its path."""
        return self._main.create(str(next(self._names)))

    def write(self, body: bytes, made: tuple[int, str] | None = None) -> tuple[int, str]:
        """Writes ``body`` to a new file, or to ``made`` (from :meth:`create`).

        Returns an fd open on the file, positioned at its start, ready to be a
        command's stdin, and the file's path.
        """
        try:
            return self._fill(made or self.create(), body)
        except OSError as exc:
            if self._spill is None or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            return self._fill(self._spill.create(str(next(self._names))), body)

    def remove(self, path: str, job_id: str | None = None) -> None:
        """Removes a body file; one already gone is no error."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # the command may remove it itself
        except OSError as exc:
            job = f"job {job_id}: " if job_id else ""
            log.warning("%scannot remove the body file %s: %s", job, path, exc)

    def discard(self, made: tuple[int, str]) -> None:
        """Closes and removes a body file from :meth:`create` or :meth:`write`."""
        os.close(made[0])
        self.remove(made[1])

    def remove_dir(self) -> None:
        """Removes the directories if no body file is left in them."""
        for place in (self._main, self._spill):
            if place is not None:
                place.remove()

    def _fill(self, made: tuple[int, str], body: bytes) -> tuple[int, str]:
        try:
            write_all(made[0], body)
        except BaseException:
            self.discard(made)
            raise
        return made


class Spare:
    """A body file and pipes made ahead for the next job."""

    __slots__ = ("body", "pipes")

    def __init__(self, body: tuple[int, str], pipes: Pipes) -> None:
        self.body, self.pipes = body, pipes

    def discard(self, bodies: BodyFiles) -> None:
        bodies.discard(self.body)
        self.pipes.close()


class Spares:
    """Work kept out of the way of a short job, for the jobs of one event loop.

    Once a job's ack is sent, the broker needs the CPU to send the next job; once a
    command has been spawned, the worker only waits for it. So a job that ended
    keeps its fds and body file until the next command has started (or
    :data:`_TIDY_DELAY` has passed), and the body file and pipes of the next job are
    made then, before its delivery arrives. In the benchmark that took about 60 µs
    off each ``/bin/true`` job run one at a time.
    :meth:`close` may come from any thread.
    """

    def __init__(self, bodies: BodyFiles) -> None:
        self._bodies = bodies
        self._lock = threading.Lock()
        self._ended: list[Job] = []
        self._spare: Spare | None = None
        self._timer: Timer | None = None
        self._closed = False

    def take(self, stdout: bool) -> Spare | None:
        """The spare body file and pipes, if there are any (and made for ``stdout``)."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None and (spare.pipes.stdout_r is not None) != stdout:
            spare.discard(self._bodies)  # the log level changed meanwhile
            return None
        return spare

    def ended(self, job: Job, loop: FdLoop) -> None:
        """Takes a job that left ``loop``; it is released at the next quiet moment."""
        with self._lock:
            if not self._closed:
                self._ended.append(job)
                if self._timer is None:
                    self._timer = loop.call_later(_TIDY_DELAY, lambda: self._on_timer(loop))
                return
        job.release()

    def tidy(self, loop: FdLoop) -> None:
        """Releases the jobs that ended and makes a spare for the next (on ``loop``)."""
        with self._lock:
            ended, self._ended = self._ended, []
            make = self._spare is None and not self._closed
        for job in ended:
            job.release()
        if not make:
            return
        try:
            body = self._bodies.create()
        except OSError:
            return  # the next job makes its own, and reports what goes wrong
        try:
            spare = Spare(body, Pipes(stdout=log.isEnabledFor(logging.DEBUG)))
        except OSError:
            self._bodies.discard(body)
            return
        with self._lock:
            if self._spare is None and not self._closed:
                self._spare, spare = spare, None
        if spare is not None:  # closed meanwhile
            spare.discard(self._bodies)
            self._bodies.remove_dir()

    def close(self) -> None:
        """Releases what is kept; later jobs are released as soon as they end."""
        with self._lock:
            self._closed = True
            ended, self._ended = self._ended, []
            spare, self._spare = self._spare, None
        for job in ended:
            job.release()
        if spare is not None:
            spare.discard(self._bodies)

    def _on_timer(self, loop: FdLoop) -> None:
        with self._lock:
            self._timer = None
        self.tidy(loop)


class _BodyDir:
    """One private directory for body files, made under ``root`` when first needed."""

    def __init__(self, root: str) -> None:
        self._root = root
        self._lock = threading.Lock()
        self._made: list[str] = []
        self.path: str | None = None
        # At exit, whatever is left goes too, but never from a forked child.
        weakref.finalize(self, _remove_trees, self._made, os.getpid())

    def create(self, name: str) -> tuple[int, str]:
        directory = self.path or self._renew(None)
        try:
            return self._open(f"{directory}/{name}")
        except FileNotFoundError:  # removed behind our back, e.g. by a /tmp cleaner
            return self._open(f"{self._renew(directory)}/{name}")

    def make(self) -> None:
        self._renew(None)

    def remove(self) -> None:
        # Fails while running jobs still have files there: the last of them tries again.
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self.path)

    @staticmethod
    def _open(path: str) -> tuple[int, str]:
        flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC
        return os.open(path, flags, 0o600), path

    def _renew(self, lost: str | None) -> str:
        # Always a fresh random name: re-creating a lost one in a shared directory
        # could meet a directory or link someone else put there meanwhile.
        with self._lock:
            if self.path == lost:
                self.path = tempfile.mkdtemp(prefix="rbit-shell-", dir=self._root)
                self._made.append(self.path)
                jobguard.dir_made(self.path)  # removed by the next start if we die
            return self.path


def _memory_dir() -> str | None:
    """``/dev/shm`` if body files may go there (no ``TMPDIR`` says otherwise)."""
    if os.environ.get("TMPDIR"):
        return None
    shm = "/dev/shm"  # noqa: S108 -- only the parent of a mkdtemp directory
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return None


def write_all(fd: int, data: bytes) -> None:
    """Writes ``data`` at the start of ``fd`` without moving its offset."""
    done = os.pwrite(fd, data, 0)
    if done < len(data):
        view = memoryview(data)
        while done < len(data):
            done += os.pwrite(fd, view[done:], done)


def _remove_trees(paths: list[str], owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
