"""The ``shell!`` runner: one command line run per job, without a shell.

A runner section such as::

    [runner:cnx_any_latex_pdf]
    runner = shell!/usr/local/bin/build-pdf --job %ID --out {outdir}/%ID.pdf %BODY
    timeout = 3600
    outdir = /srv/pdf
    kill_grace = 10

is split into arguments once, when the runner loads, the way a POSIX shell splits
words (:func:`shlex.split`). For each job the placeholders are then replaced *inside*
the already split arguments by plain string substitution, in a single pass, and the
argument list goes to :class:`subprocess.Popen` without a shell. A job id such as
``x; rm -rf ~ $(reboot)`` therefore arrives as one literal argument, and text put in by
a substitution is never scanned again.

Placeholders:

* ``%ID`` -- the job id (:attr:`rbit.message.Message.job_id`);
* ``%QUEUE`` -- the queue the job was consumed from;
* ``%BODY`` -- path of a private file (mode 0600, in a directory of the runner's own,
  mode 0700) holding the body, removed once the command and everything it started
  have ended;
* ``%ATTEMPT`` -- which try of the job this is, counting from 1;
* ``%%`` -- a literal ``%``;
* ``{key}`` -- the value of ``key`` in the runner's section. An unknown key is an error
  when the runner loads. ``${NAME}`` is left alone, since it is the syntax of a
  ``sh -c`` script.

Never put placeholders inside the script of a ``sh -c '...'`` argument: there the
substituted text *would* be read as shell syntax. A script reads the job from its
environment instead (``sh -c 'make -C /src JOB="$RBIT_JOB_ID"'``).

The command gets the body on stdin, runs in a process group (and session) of its own,
and finds in its environment everything the worker had when the runner was loaded
(the environment is copied once, so later changes to ``os.environ`` in the worker are
not seen) plus:

* ``RBIT_JOB_ID``, ``RBIT_QUEUE``, ``RBIT_BODY_FILE``, ``RBIT_ATTEMPT``;
* ``RBIT_STATUS_FD`` -- a file descriptor, open for writing, for progress reports.
  Each line written there, ``Status[ message]``, is passed on at once as
  ``set_status(Status, message)``; the status is one of PyBit's (``Waiting``,
  ``Blocked``, ``Building``, ``Done``, ``Failed``, ``Cancelled``, ``Uploaded``, any
  case). Lines naming another status are logged and ignored. From bash::

      echo "Building step 2" >&$RBIT_STATUS_FD

  The number is usually 3, but not always (with a working directory set, for one), and
  dash and other POSIX shells only accept single-digit descriptors in ``>&N``, so
  portable scripts write ``echo "Building step 2" >/dev/fd/$RBIT_STATUS_FD`` instead.

Apart from stdin, stdout, stderr and ``RBIT_STATUS_FD``, the command inherits no file
descriptor of the worker.

How the command ends decides the job's :class:`~rbit.outcome.Outcome`:

* exit status 0: done;
* exit status 75 (``EX_TEMPFAIL``): blocked, try later, with the tail of stderr;
* any other exit status: failed, ``exit status N: <tail of stderr>``;
* killed by a signal: failed, ``killed by signal SIGNAME``;
* the program cannot be started (missing, not executable): failed,
  ``cannot run <program>: <reason>``; the retry policy decides what happens next.

Only the last 4 KiB of stderr are kept. stdout goes to ``/dev/null``, except when the
module's logger is enabled for DEBUG: then its last 4 KiB are logged at DEBUG.

``timeout = SECONDS`` in the section bounds a run. On expiry the whole process group
gets SIGTERM; whatever is left of it ``kill_grace`` seconds later (default 5) gets
SIGKILL, and the job has failed with ``timed out after N s``. When the command exits
by itself, processes it left running in its group (background jobs, daemons it
started) are killed with SIGKILL, so that nothing outlives its job. A process that
moved to a session of its own escapes this, like any daemon would.

:meth:`ShellRunner.cancel` (the worker's answer to a second shutdown signal) stops the
process groups of all running jobs the same way; their runs end as blocked, so the jobs
are tried again later, and the runner starts no further commands.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import itertools
import logging
import math
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Callable, Protocol

from rbit.config import RunnerSettings
from rbit.errors import RunnerLoadError
from rbit.message import Message
from rbit.outcome import Outcome, Status

log = logging.getLogger(__name__)

EX_TEMPFAIL = 75
DEFAULT_KILL_GRACE = 5.0
TAIL_BYTES = 4096

_STATUS_LINE_MAX = 4096
_READ_SIZE = 65536
_DRAIN_TIMEOUT = 2.0  # how long pipes may stay open once the process group is gone
_REAP_TIMEOUT = 10.0  # how long a SIGKILLed command may take to be reaped
_GROUP_POLL = 0.05  # nothing signals the end of group members that are not our children

_PLACEHOLDER = re.compile(r"%%|%ID|%QUEUE|%BODY|%ATTEMPT|(?<!\$)\{([A-Za-z_][A-Za-z0-9_.-]*)\}")
_CANCELLED = "cancelled"
_TIMED_OUT = "timed out"

SetStatus = Callable[[str, str], None]


class _Slot(enum.Enum):
    """A placeholder filled per job."""

    ID = "%ID"
    QUEUE = "%QUEUE"
    BODY = "%BODY"
    ATTEMPT = "%ATTEMPT"


_Arg = tuple["str | _Slot", ...]


class ShellRunner:
    """Runs a ``shell!`` command template for each job (see the module docs).

    One instance serves every worker thread of its runner section; :meth:`run` may be
    called from several threads at once. Each call supervises its command from the
    calling thread; no thread is started per job.

    Args:
        runner: The runner section; ``runner.target`` is the command template.
        workdir: Working directory of the commands; ``None`` keeps the worker's.

    Raises:
        RunnerLoadError: The template is empty, has unbalanced quotes or names an
            unknown ``{setting}``, or ``kill_grace`` is not a number of seconds.
        OSError: The private directory for body files cannot be created.
    """

    def __init__(self, runner: RunnerSettings, *, workdir: str | None = None) -> None:
        self._template = _compile_template(runner.target, runner.settings, runner.queue)
        self._timeout = runner.timeout
        self._grace = _kill_grace(runner.settings, runner.queue)
        self._workdir = workdir
        # Copied and encoded once: doing it per job was a large share of a short job.
        self._env = dict(os.environb)
        self._bodies = _BodyFiles()
        self._stop = _StopSignal()
        self._devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        weakref.finalize(self, os.close, self._devnull)
        self._spawner = _Spawner.create() if workdir is None else None

    def run(self, message: Message, set_status: SetStatus) -> Outcome:
        """Runs the command for one job and waits for its end.

        Args:
            message: The job.
            set_status: Receives ``(status, message)`` for each line the command
                writes to ``RBIT_STATUS_FD``.

        Returns:
            How the try ended.
        """
        job_id = message.job_id
        if self._stop.is_set():
            return Outcome.blocked(self._stop.reason)
        try:
            body_path = self._bodies.write(message.body)
        except OSError as exc:
            log.error("job %s: cannot write the body file: %s", job_id, exc)
            return Outcome.failed(f"cannot write the body file: {exc}")
        try:
            return self._run_command(message, body_path, set_status)
        finally:
            self._bodies.remove(body_path, job_id)
            if self._stop.is_set():
                self._bodies.remove_dir()  # the last job out takes the directory along

    def cancel(self) -> None:
        """Stops the commands of all running jobs; starts no new ones.

        Returns at once and is safe to call from any thread. Each job's process group
        gets SIGTERM, then SIGKILL after the grace; the :meth:`run` calls return as
        soon as their groups are gone. The body file directory goes with the last job.
        """
        self._stop.set("cancelled: the worker is stopping", wake=True)
        self._bodies.remove_dir()

    def close(self, timeout: float | None = None) -> None:
        """Starts no new commands and removes the body file directory.

        Running commands are left alone; the directory goes when the last of them
        ends. Safe to call more than once.

        Args:
            timeout: Unused; accepted for the runners' common ``close(timeout)``.
        """
        self._stop.set("the runner is closed", wake=False)
        self._bodies.remove_dir()

    def _run_command(self, message: Message, body_path: str, set_status: SetStatus) -> Outcome:
        values = {
            _Slot.ID: message.job_id,
            _Slot.QUEUE: message.queue,
            _Slot.BODY: body_path,
            _Slot.ATTEMPT: str(message.attempt),
        }
        argv = [_render(arg, values) for arg in self._template]
        # stdout is only read at DEBUG: otherwise not worth a pipe and its reads.
        pipes = _Pipes(stdout=log.isEnabledFor(logging.DEBUG))
        try:
            proc = self._start(argv, values, body_path, pipes)
        except ValueError as exc:  # e.g. a NUL byte in the job id: the job itself is bad
            pipes.close_read_ends()
            log.error("job %s: cannot pass the job to %s: %s", message.job_id, argv[0], exc)
            return Outcome.rejected(f"cannot pass the job to {argv[0]}: {exc}")
        except OSError as exc:
            pipes.close_read_ends()
            log.error("job %s: cannot run %s: %s", message.job_id, argv[0], exc)
            return Outcome.failed(f"cannot run {argv[0]}: {exc}")
        finally:
            pipes.close_write_ends()  # the child holds its copies; EOF comes when it is gone
        log.debug("job %s: started %s (pid %d)", message.job_id, argv[0], proc.pid)
        return self._supervise(proc, pipes, message.job_id, set_status)

    def _start(
        self, argv: list[str], values: Mapping[_Slot, str], body_path: str, pipes: _Pipes
    ) -> _Child:
        stdin = os.open(body_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            stdout = self._devnull if pipes.stdout_w is None else pipes.stdout_w
            fds = (stdin, stdout, pipes.stderr_w, pipes.status_w)
            if self._spawner is not None and min(fds) > _SPAWN_STATUS_FD:
                env = _child_env(self._env, values, _SPAWN_STATUS_FD)
                child = self._spawner.start(argv, env, fds)
                if child is not None:
                    return child
                self._spawner = None
            # An argument list and no shell: job content cannot become shell syntax.
            return subprocess.Popen(  # noqa: S603
                argv,
                stdin=stdin,
                stdout=stdout,
                stderr=pipes.stderr_w,
                close_fds=True,
                pass_fds=(pipes.status_w,),
                start_new_session=True,  # own process group: timeouts reach grandchildren
                cwd=self._workdir,
                env=_child_env(self._env, values, pipes.status_w),
            )
        finally:
            os.close(stdin)

    def _supervise(
        self, proc: _Child, pipes: _Pipes, job_id: str, set_status: SetStatus
    ) -> Outcome:
        try:
            run = _Run(proc, pipes, self._stop.fd, job_id, set_status)
        except BaseException:
            pipes.close_read_ends()
            _signal_group(proc.pid, signal.SIGKILL, job_id)
            proc.wait()
            raise
        try:
            stopped = self._wait(run)
            run.drain()
        except BaseException:
            _signal_group(run.pgid, signal.SIGKILL, job_id)
            raise
        finally:
            run.close()
        if run.stdout.text():
            log.debug("job %s: stdout tail: %s", job_id, run.stdout.text())
        outcome = _outcome(proc.returncode, stopped, run.stderr.text(), self._timeout)
        log.debug("job %s: %s %s", job_id, outcome.kind.value, outcome.reason)
        return outcome

    def _wait(self, run: _Run) -> str | None:
        """Waits for the command's end; returns why rbit stopped it, if it did."""
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        run.wait_exit(deadline, until_stopped=True)
        if run.exited:
            _kill_leftovers(run.pgid, run.job_id)
            return None
        why = _CANCELLED if run.stopped else _TIMED_OUT
        log.warning("job %s: %s; terminating process group %d", run.job_id, why, run.pgid)
        self._terminate(run)
        return why

    def _terminate(self, run: _Run) -> None:
        _signal_group(run.pgid, signal.SIGTERM, run.job_id)
        deadline = time.monotonic() + self._grace
        run.wait_exit(deadline)
        # Members that catch SIGTERM may still be cleaning up after the leader is gone.
        if _wait_group_gone(run, deadline):
            return
        log.warning(
            "job %s: process group %d outlived SIGTERM; sending SIGKILL", run.job_id, run.pgid
        )
        _signal_group(run.pgid, signal.SIGKILL, run.job_id)
        run.wait_exit(time.monotonic() + _REAP_TIMEOUT)
        if not run.exited:
            log.error("job %s: process %d survived SIGKILL", run.job_id, run.pgid)


def _wait_group_gone(run: _Run, deadline: float) -> bool:
    """Keeps reading the output until the group is gone or ``deadline``; True if gone."""
    while _group_alive(run.pgid):
        now = time.monotonic()
        if now >= deadline:
            return False
        run.pump(min(deadline, now + _GROUP_POLL))
    return True


class _StopSignal:
    """A runner's "no more commands" flag, with a pipe that wakes every running job.

    The pipe is written once and never read, so it stays readable: each job's loop
    sees it however late it starts watching, and no list of running jobs is needed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reason = ""
        self._woken = False
        self._read, self._write = os.pipe()
        self.fd = self._read
        weakref.finalize(self, _close_fds, self._read, self._write)

    def is_set(self) -> bool:
        return bool(self.reason)

    def set(self, reason: str, *, wake: bool) -> None:
        with self._lock:
            if wake or not self.reason:  # a cancel after close() still stops the jobs
                self.reason = reason
            if wake and not self._woken:
                os.write(self._write, b"x")
                self._woken = True


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


class _Child(Protocol):
    """A started command: :class:`subprocess.Popen` or :class:`_Spawned`."""

    pid: int
    returncode: int | None

    def wait(self) -> int: ...


# Where the status pipe lands in commands started by _Spawner: after stdin/out/err.
_SPAWN_STATUS_FD = 3
# What subprocess resets too (restore_signals): Python ignores SIGPIPE and SIGXFSZ.
_DEFAULT_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ") if hasattr(signal, name)
)


class _Spawner:
    """Starts commands with :func:`os.posix_spawnp`, at about half the CPU of Popen.

    Popen re-encodes the whole environment in Python and sets up its fork machinery
    for every command, which costs as much as the rest of a short job. posix_spawn
    does neither, but it has no ``close_fds``: the commands would inherit every
    inheritable descriptor of the worker. Python creates none (PEP 446); those the
    worker inherited from whoever started it are listed once, here, and closed in
    each command. Descriptors made inheritable later in the worker's life (by a C
    extension, say) are not seen. Without posix_spawn, ``/proc/self/fd`` or a
    ``setsid`` spawn attribute, the runner uses Popen.
    """

    def __init__(self, inherited: list[int]) -> None:
        self._closes = [(os.POSIX_SPAWN_CLOSE, fd) for fd in inherited]

    @classmethod
    def create(cls) -> _Spawner | None:
        if not hasattr(os, "posix_spawnp"):
            return None
        try:
            names = os.listdir("/proc/self/fd")
        except OSError:
            return None
        return cls([fd for fd in map(int, names) if fd > 2 and _inheritable(fd)])

    def start(
        self, argv: list[str], env: dict[bytes, bytes], fds: tuple[int, ...]
    ) -> _Spawned | None:
        """Starts ``argv`` with ``fds`` as its descriptors 0, 1, 2, 3...; None if unsupported.

        The descriptors must all be above those numbers, so no copy overwrites a
        source still to be copied.
        """
        dups = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)]
        try:
            pid = os.posix_spawnp(
                argv[0],
                argv,
                env,
                file_actions=dups + self._closes,
                setsid=True,  # own process group: timeouts reach grandchildren
                setsigdef=_DEFAULT_SIGNALS,
            )
        except NotImplementedError:  # no POSIX_SPAWN_SETSID in this libc
            return None
        return _Spawned(pid)


def _inheritable(fd: int) -> bool:
    try:
        return os.get_inheritable(fd)
    except OSError:  # the listing's own descriptor, closed by now
        return False


class _Spawned:
    """A command started by :class:`_Spawner`, with Popen's ``wait``/``returncode``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def wait(self) -> int:
        if self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
            except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored): as Popen does
                self.returncode = 0
            else:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


class _Pipes:
    """A command's stderr and status pipes, and its stdout pipe when that is read."""

    def __init__(self, *, stdout: bool) -> None:
        self._fds: list[int] = []
        try:
            self.status_r, self.status_w = self._pipe()
            self.stderr_r, self.stderr_w = self._pipe()
            self.stdout_r, self.stdout_w = self._pipe() if stdout else (None, None)
        except BaseException:
            _close_fds(*self._fds)
            raise

    def close_write_ends(self) -> None:
        _close_fds(*(fd for fd in (self.status_w, self.stderr_w, self.stdout_w) if fd is not None))

    def close_read_ends(self) -> None:
        _close_fds(*(fd for fd in (self.status_r, self.stderr_r, self.stdout_r) if fd is not None))

    def _pipe(self) -> tuple[int, int]:
        read_fd, write_fd = os.pipe()
        self._fds += (read_fd, write_fd)
        return read_fd, write_fd


_EXIT = object()  # handler of the fd that tells the command has exited
_STOP = object()  # handler of the runner's stop pipe


class _Run:
    """One running command, supervised from the calling thread.

    A single ``poll`` watches the command's stderr (and stdout at DEBUG), its status
    pipe, an fd that becomes readable when it exits, and the runner's stop pipe; its
    timeouts are the job's own deadlines.
    """

    def __init__(
        self,
        proc: _Child,
        pipes: _Pipes,
        stop_fd: int,
        job_id: str,
        set_status: SetStatus,
    ) -> None:
        self.proc = proc
        self.pgid = proc.pid  # start_new_session makes the child its group's leader
        self.job_id = job_id
        self.stdout = _Tail()
        self.stderr = _Tail()
        self.exited = False
        self.stopped = False
        self._pipes = pipes
        # select.poll, not a selectors object: a few fds for a few milliseconds, where
        # epoll's extra fd and the selectors bookkeeping would cost more than they save.
        self._poll = select.poll()
        self._handlers: dict[int, object] = {}
        self._streams = 0
        self._exit_fd = _exit_fd(proc)
        self._watch(self._exit_fd, _EXIT)
        self._watch(stop_fd, _STOP)
        self._watch(pipes.stderr_r, self.stderr.feed)
        self._watch(pipes.status_r, _StatusReader(job_id, set_status).feed)
        if pipes.stdout_r is not None:
            self._watch(pipes.stdout_r, self.stdout.feed)

    def wait_exit(self, deadline: float | None, *, until_stopped: bool = False) -> None:
        """Reads output until the command exits (or is stopped) or ``deadline``."""
        while not self.exited and not (until_stopped and self.stopped):
            if deadline is not None and time.monotonic() >= deadline:
                return
            self.pump(deadline)

    def drain(self) -> None:
        """Reads the output to its end, unless something outside keeps it open."""
        deadline = time.monotonic() + _DRAIN_TIMEOUT
        while self._streams:
            if time.monotonic() >= deadline:
                log.warning(
                    "job %s: output still open after the command ended; no longer reading it",
                    self.job_id,
                )
                return
            self.pump(deadline)

    def pump(self, deadline: float | None) -> None:
        """Waits once for events, until ``deadline`` at the latest, and handles them."""
        timeout = None
        if deadline is not None:
            timeout = max(0, math.ceil((deadline - time.monotonic()) * 1000))
        for fd, _ in self._poll.poll(timeout):
            handler = self._handlers[fd]
            if handler is _EXIT:
                self._unwatch(fd)
                self.proc.wait()  # already over: this only collects the status
                self.exited = True
            elif handler is _STOP:
                self._unwatch(fd)  # it stays readable: watch it once
                self.stopped = True
            else:
                self._read(fd, handler)

    def close(self) -> None:
        os.close(self._exit_fd)
        self._pipes.close_read_ends()

    def _watch(self, fd: int, handler: object) -> None:
        self._poll.register(fd, select.POLLIN)
        self._handlers[fd] = handler
        if callable(handler):
            self._streams += 1

    def _unwatch(self, fd: int) -> None:
        self._poll.unregister(fd)
        del self._handlers[fd]

    def _read(self, fd: int, feed: Callable[[bytes], None]) -> None:
        chunk = os.read(fd, _READ_SIZE)
        feed(chunk)
        if not chunk:  # also after POLLHUP: every writer is gone
            self._unwatch(fd)
            self._streams -= 1


_pidfd_supported = hasattr(os, "pidfd_open")


def _exit_fd(proc: _Child) -> int:
    """An fd that becomes readable when ``proc`` exits (it is not reaped yet)."""
    global _pidfd_supported
    if _pidfd_supported:
        try:
            return os.pidfd_open(proc.pid)  # Linux >= 5.3
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            _pidfd_supported = False
    # Elsewhere a thread blocks in waitpid and closes a pipe, which reads as EOF.
    read_fd, write_fd = os.pipe()

    def reap() -> None:
        proc.wait()
        os.close(write_fd)

    threading.Thread(target=reap, name=f"rbit-shell-wait-{proc.pid}", daemon=True).start()
    return read_fd


class _BodyFiles:
    """Job bodies as files in a private directory (mode 0700) of one runner."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names = itertools.count(1)  # next() is atomic under the GIL
        self._dirs = [tempfile.mkdtemp(prefix="rbit-shell-")]
        # At exit, whatever is left goes too, but never from a forked child.
        weakref.finalize(self, _remove_trees, self._dirs, os.getpid())

    def write(self, body: bytes) -> str:
        """Writes ``body`` to a new file (mode 0600); returns its path."""
        directory = self._dirs[-1]
        try:
            fd, path = self._create(directory)
        except FileNotFoundError:  # removed behind our back, e.g. by a /tmp cleaner
            fd, path = self._create(self._renew(directory))
        try:
            _write_all(fd, body)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return path

    def remove(self, path: str, job_id: str) -> None:
        """Removes a body file; one already gone is no error."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # the command may remove it itself
        except OSError as exc:
            log.warning("job %s: cannot remove the body file %s: %s", job_id, path, exc)

    def remove_dir(self) -> None:
        """Removes the directory if no body file is left in it."""
        # Fails while running jobs still have files there: the last of them tries again.
        with contextlib.suppress(OSError):
            os.rmdir(self._dirs[-1])

    def _create(self, directory: str) -> tuple[int, str]:
        path = f"{directory}/{next(self._names)}"
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
        return os.open(path, flags, 0o600), path

    def _renew(self, lost: str) -> str:
        # A fresh random name: re-creating the lost one in /tmp could meet a
        # directory or link someone else put there meanwhile.
        with self._lock:
            if self._dirs[-1] == lost:
                self._dirs.append(tempfile.mkdtemp(prefix="rbit-shell-"))
            return self._dirs[-1]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _remove_trees(paths: list[str], owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)


def _child_env(
    base: Mapping[bytes, bytes], values: Mapping[_Slot, str], status_fd: int
) -> dict[bytes, bytes]:
    """The worker's environment and the job's RBIT_* variables, ready for exec."""
    env = dict(base)
    env[b"RBIT_JOB_ID"] = os.fsencode(values[_Slot.ID])
    env[b"RBIT_QUEUE"] = os.fsencode(values[_Slot.QUEUE])
    env[b"RBIT_BODY_FILE"] = os.fsencode(values[_Slot.BODY])
    env[b"RBIT_ATTEMPT"] = os.fsencode(values[_Slot.ATTEMPT])
    env[b"RBIT_STATUS_FD"] = b"%d" % status_fd
    return env


class _Tail:
    """The last ``limit`` bytes of a stream."""

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self._data = bytearray()
        self._limit = limit
        self._truncated = False

    def feed(self, chunk: bytes) -> None:
        self._data += chunk
        if len(self._data) > self._limit:
            del self._data[: -self._limit]
            self._truncated = True

    def text(self) -> str:
        text = self._data.decode("utf-8", "replace").strip()
        return "..." + text if self._truncated and text else text


class _StatusReader:
    """Turns lines from ``RBIT_STATUS_FD`` into ``set_status`` calls."""

    def __init__(self, job_id: str, set_status: SetStatus) -> None:
        self._job_id = job_id
        self._set_status = set_status
        self._buf = bytearray()
        self._skipping = False  # inside an overlong line, already reported

    def feed(self, chunk: bytes) -> None:
        if not chunk:  # end of stream: a last line without newline still counts
            self._line(bytes(self._buf))
            self._buf.clear()
            return
        self._buf += chunk
        while (end := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            self._line(line)
            self._skipping = False
        if len(self._buf) > _STATUS_LINE_MAX:
            self._line(bytes(self._buf[:_STATUS_LINE_MAX]))
            self._buf.clear()
            self._skipping = True

    def _line(self, line: bytes) -> None:
        words = line.decode("utf-8", "replace").split(None, 1)
        if self._skipping or not words:
            return
        try:
            status = Status.parse(words[0])
        except ValueError:
            log.warning(
                "job %s: ignoring status line with unknown status %r", self._job_id, words[0]
            )
            return
        try:
            self._set_status(status.value, words[1].strip() if len(words) > 1 else "")
        except Exception:  # the pipe must keep being read, or the command would block
            log.exception("job %s: set_status(%s) failed", self._job_id, status.value)


def _compile_template(template: str, settings: Mapping[str, str], queue: str) -> tuple[_Arg, ...]:
    where = f"runner:{queue}"  # not the template itself: it may carry a secret
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise RunnerLoadError(f"{where}: cannot split the command: {exc}") from exc
    if not words:
        raise RunnerLoadError(f"{where}: the command is empty")
    return tuple(_compile_word(word, settings, where) for word in words)


def _compile_word(word: str, settings: Mapping[str, str], where: str) -> _Arg:
    """Splits a word into literal text and job slots; settings become literal text."""
    parts: list[str | _Slot] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(word):
        parts.append(word[pos : match.start()])
        parts.append(_resolve(match, settings, where))
        pos = match.end()
    parts.append(word[pos:])
    return tuple(part for part in parts if part != "")


def _resolve(match: re.Match[str], settings: Mapping[str, str], where: str) -> str | _Slot:
    key = match.group(1)
    if key is not None:
        if key not in settings:
            known = ", ".join(sorted(settings)) or "none"
            raise RunnerLoadError(f"{where}: unknown setting {{{key}}} (settings: {known})")
        return str(settings[key])
    if match.group(0) == "%%":
        return "%"
    return _Slot(match.group(0))


def _render(arg: _Arg, values: Mapping[_Slot, str]) -> str:
    return "".join(values[part] if isinstance(part, _Slot) else part for part in arg)


def _kill_grace(settings: Mapping[str, str], queue: str) -> float:
    raw = settings.get("kill_grace")
    if raw is None:
        return DEFAULT_KILL_GRACE
    try:
        grace = float(raw)
    except ValueError:
        grace = -1.0
    if not grace >= 0:  # also rejects NaN
        raise RunnerLoadError(
            f"runner:{queue}: kill_grace must be a number of seconds >= 0, not {raw!r}"
        )
    return grace


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _live_member_in_proc(pgid)


def _live_member_in_proc(pgid: int) -> bool:
    """Whether a member of the group is more than a zombie (True without ``/proc``).

    Orphans are reaped by init, or by nobody when the worker itself runs as PID 1 in a
    container; their zombies still count for ``killpg(pgid, 0)`` but need no killing.
    """
    try:
        names = os.listdir("/proc")
    except OSError:
        return True
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as file:
                fields = file.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        # After the command name: state, ppid, pgrp (proc(5)).
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def _signal_group(pgid: int, sig: signal.Signals, job_id: str) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except OSError as exc:
        log.warning("job %s: cannot send %s to process group %d: %s", job_id, sig.name, pgid, exc)


def _kill_leftovers(pgid: int, job_id: str) -> None:
    # Once the leader is gone nobody waits for what it left behind; a clean command
    # leaves nothing, so the rest is killed outright.
    if _group_alive(pgid):
        log.warning("job %s: killing processes the command left running (group %d)", job_id, pgid)
        _signal_group(pgid, signal.SIGKILL, job_id)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _with_tail(reason: str, tail: str) -> str:
    return f"{reason}: {tail}" if tail else reason


def _outcome(code: int | None, stopped: str | None, tail: str, timeout: float | None) -> Outcome:
    if stopped == _CANCELLED:
        return Outcome.blocked(_with_tail("cancelled: the worker is stopping", tail))
    if stopped == _TIMED_OUT:
        return Outcome.failed(_with_tail(f"timed out after {timeout:g} s", tail))
    if code is None:
        return Outcome.failed(_with_tail("the command could not be stopped", tail))
    if code == 0:
        return Outcome.done()
    if code == EX_TEMPFAIL:
        return Outcome.blocked(tail or f"exit status {EX_TEMPFAIL} (try later)")
    if code < 0:
        return Outcome.failed(_with_tail(f"killed by signal {_signal_name(-code)}", tail))
    return Outcome.failed(_with_tail(f"exit status {code}", tail))
