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
  mode 0700, under ``/dev/shm`` unless ``TMPDIR`` is set) holding the body, removed
  once the command and everything it started have ended;
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

No thread waits for a command: each job is a small state machine (:class:`_Job`)
moved along by an event loop that watches the command's exit (a pidfd), its pipes and
its deadlines. In the worker that loop is the AMQP connection's own
(:meth:`ShellRunner.start_job`), so a job is started, watched and acked on one thread;
:meth:`ShellRunner.run` runs one job with a private ``poll`` loop. In the worker a job
is acked first and tidied up after: its fds are closed and its body file removed
while the next command starts up, or 20 ms after it ended when no other job starts.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import itertools
import logging
import os
import re
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
from rbit.fdloop import FdLoop, PollLoop, Timer
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
_TIDY_DELAY = 0.02  # how long an ended job keeps its fds when no other job starts

_PLACEHOLDER = re.compile(r"%%|%ID|%QUEUE|%BODY|%ATTEMPT|(?<!\$)\{([A-Za-z_][A-Za-z0-9_.-]*)\}")
_CANCELLED = "cancelled"
_TIMED_OUT = "timed out"

SetStatus = Callable[[str, str], None]


class _Slot(enum.IntEnum):
    """A placeholder filled per job: its index in the job's values."""

    ID = 0
    QUEUE = 1
    BODY = 2
    ATTEMPT = 3


_SLOTS = {"%ID": _Slot.ID, "%QUEUE": _Slot.QUEUE, "%BODY": _Slot.BODY, "%ATTEMPT": _Slot.ATTEMPT}

# A compiled argument: its literal text, or its parts (literal text and slots).
_Arg = str | tuple[str | _Slot, ...]
_Values = tuple[str, str, str, str]  # indexed by _Slot


class ShellRunner:
    """Runs a ``shell!`` command template for each job (see the module docs).

    A job is a child process and a few pipes, supervised by callbacks from an event
    loop (:class:`rbit.fdloop.FdLoop`): the worker starts jobs with :meth:`start_job` on the
    AMQP connection's loop, so no thread is used per job or per worker slot;
    :meth:`run` runs one job to its end from the calling thread, and may be called
    from several threads at once.

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
        self.timeout = runner.timeout
        self.grace = _kill_grace(runner.settings, runner.queue)
        self._workdir = workdir
        # Copied and encoded once: doing it per job was a large share of a short job.
        self._env = dict(os.environb)
        self._bodies = _BodyFiles()
        self._spares = _Spares(self._bodies)
        self.stop = _StopSignal()
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
        ended: list[Outcome] = []
        loop = PollLoop()
        job = self._launch(message, set_status, ended.append, loop, None)
        try:
            loop.run_until(lambda: bool(ended))
        except BaseException:  # e.g. KeyboardInterrupt: the command must not outlive us
            if job is not None:
                job.abort()
            raise
        return ended[0]

    def start_job(
        self, message: Message, set_status: SetStatus, done: Callable[[Outcome], None], loop: FdLoop
    ) -> _Job | None:
        """Starts the command for one job; ``done(outcome)`` follows on ``loop``.

        When the command cannot be started, ``done`` is called before this returns
        and the result is None.

        Args:
            message: The job.
            set_status: Receives ``(status, message)`` for each line the command
                writes to ``RBIT_STATUS_FD``; called on the loop's thread.
            done: Receives how the try ended, once, on the loop's thread.
            loop: Where the job's fds and deadlines are watched. All jobs of a runner
                are started from the same loop: between two of them, on its thread,
                the runner tidies up after the last and prepares the next
                (:class:`_Spares`).
        """
        return self._launch(message, set_status, done, loop, self._spares)

    def _launch(
        self,
        message: Message,
        set_status: SetStatus,
        done: Callable[[Outcome], None],
        loop: FdLoop,
        spares: _Spares | None,
    ) -> _Job | None:
        job_id = message.job_id
        if self.stop.is_set():
            done(Outcome.blocked(self.stop.reason))
            return None
        # stdout is only read at DEBUG: otherwise not worth a pipe and its reads.
        stdout = log.isEnabledFor(logging.DEBUG)
        spare = spares.take(stdout) if spares is not None else None
        try:
            made = spare.body if spare is not None else None
            body_fd, body_path = self._bodies.write(message.body, made)
        except OSError as exc:
            if spare is not None:
                spare.pipes.close()
            log.error("job %s: cannot write the body file: %s", job_id, exc)
            done(Outcome.failed(f"cannot write the body file: {exc}"))
            return None
        values = (job_id, message.queue, body_path, str(message.attempt))
        argv = [_render(arg, values) for arg in self._template]
        try:
            pipes = spare.pipes if spare is not None else _Pipes(stdout=stdout)
        except BaseException:
            os.close(body_fd)
            self.job_ended(body_path, job_id)
            raise
        try:
            proc = self._start(argv, values, body_fd, pipes)
        except (ValueError, OSError) as exc:
            pipes.close_read_ends()
            self.job_ended(body_path, job_id)
            if isinstance(exc, ValueError):  # e.g. a NUL byte in the job id: a bad job
                log.error("job %s: cannot pass the job to %s: %s", job_id, argv[0], exc)
                done(Outcome.rejected(f"cannot pass the job to {argv[0]}: {exc}"))
            else:
                log.error("job %s: cannot run %s: %s", job_id, argv[0], exc)
                done(Outcome.failed(f"cannot run {argv[0]}: {exc}"))
            return None
        finally:
            pipes.close_write_ends()  # the child holds its copies; EOF comes when it is gone
        log.debug("job %s: started %s (pid %d)", job_id, argv[0], proc.pid)
        try:
            job = _Job(self, proc, pipes, body_path, job_id, set_status, loop, done, spares)
        except BaseException:
            pipes.close_read_ends()
            _signal_group(proc.pid, signal.SIGKILL, job_id)
            proc.wait()
            self.job_ended(body_path, job_id)
            raise
        if spares is not None:
            spares.tidy(loop)  # the command is starting up: the worker only waits
        return job

    def cancel(self) -> None:
        """Stops the commands of all running jobs; starts no new ones.

        Returns at once and is safe to call from any thread. Each job's process group
        gets SIGTERM, then SIGKILL after the grace; the jobs end (blocked) as soon as
        their groups are gone. The body file directory goes with the last job.
        """
        self.stop.set("cancelled: the worker is stopping", wake=True)
        self._spares.close()
        self._bodies.remove_dir()

    def close(self, timeout: float | None = None) -> None:
        """Starts no new commands and removes the body file directory.

        Running commands are left alone; the directory goes when the last of them
        ends. Safe to call more than once.

        Args:
            timeout: Unused; accepted for the runners' common ``close(timeout)``.
        """
        self.stop.set("the runner is closed", wake=False)
        self._spares.close()
        self._bodies.remove_dir()

    def job_ended(self, body_path: str, job_id: str) -> None:
        """Removes a job's body file (and the directory, after the last job)."""
        self._bodies.remove(body_path, job_id)
        if self.stop.is_set():
            self._bodies.remove_dir()  # the last job out takes the directory along

    def _start(self, argv: list[str], values: _Values, stdin: int, pipes: _Pipes) -> _Child:
        """Starts the command with the body file ``stdin`` (closed here) as its stdin."""
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


class _Job:
    """One running command, moved along by callbacks from its loop.

    The loop watches the command's stderr (and stdout at DEBUG), its status pipe, an
    fd that becomes readable when it exits, and the runner's stop pipe; timers stand
    for the job's deadlines. The normal course is: exit, leftovers killed, output read
    to its end, done. A timeout or a cancel sends SIGTERM to the process group, waits
    for it to be gone until the grace runs out, then sends SIGKILL.
    """

    def __init__(
        self,
        runner: ShellRunner,
        proc: _Child,
        pipes: _Pipes,
        body_path: str,
        job_id: str,
        set_status: SetStatus,
        loop: FdLoop,
        done: Callable[[Outcome], None],
        spares: _Spares | None,
    ) -> None:
        self._runner = runner
        self._spares = spares
        self._proc = proc
        self._pgid = proc.pid  # start_new_session makes the child its group's leader
        self._pipes = pipes
        self._body_path = body_path
        self._job_id = job_id
        self._loop = loop
        self._done = done
        self._stdout = _Tail()
        self._stderr = _Tail()
        self._watched: list[int] = []
        self._streams = 0
        self._exited = False
        self._draining = False
        self._killed = False
        self._finished = False
        self._why: str | None = None  # _CANCELLED or _TIMED_OUT once rbit stops it
        self._grace_end = 0.0
        self._timer: Timer | None = None
        self._exit_fd = _exit_fd(proc)
        try:
            # A copy of the stop pipe per job: one loop may watch an fd only once.
            self._stop_fd = os.dup(runner.stop.fd)
        except BaseException:
            os.close(self._exit_fd)
            raise
        try:
            self._watch(self._exit_fd, self._on_exit)
            self._watch(self._stop_fd, self._on_stop)
            self._watch_stream(pipes.stderr_r, self._stderr.feed)
            self._watch_stream(pipes.status_r, _StatusReader(job_id, set_status).feed)
            if pipes.stdout_r is not None:
                self._watch_stream(pipes.stdout_r, self._stdout.feed)
            if runner.timeout is not None:
                self._set_timer(runner.timeout, self._on_timeout)
        except BaseException:
            self._leave_loop()  # the caller takes care of the pipes and the command
            _close_fds(self._exit_fd, self._stop_fd)
            raise

    def abort(self) -> None:
        """Kills the process group and lets go of everything, without an outcome."""
        if self._finished:
            return
        self._finished = True
        _signal_group(self._pgid, signal.SIGKILL, self._job_id)
        if not self._exited:
            self._proc.wait()
        self._release()

    # ------------------------------------------------------------------ events

    def _on_exit(self) -> None:
        self._unwatch(self._exit_fd)
        self._proc.wait()  # already over: this only collects the status
        self._exited = True
        if self._why is not None:
            self._check_group()
            return
        self._cancel_timer()
        self._unwatch(self._stop_fd)
        _kill_leftovers(self._pgid, self._job_id)
        self._drain()

    def _on_stop(self) -> None:
        self._unwatch(self._stop_fd)  # it stays readable: watch it once
        self._stop_command(_CANCELLED)

    def _on_timeout(self) -> None:
        self._timer = None
        self._stop_command(_TIMED_OUT)

    def _on_stream(self, fd: int, feed: Callable[[bytes], None]) -> None:
        chunk = os.read(fd, _READ_SIZE)
        feed(chunk)
        if chunk:
            return
        self._unwatch(fd)  # EOF, also after POLLHUP: every writer is gone
        self._streams -= 1
        if self._draining and not self._streams:
            self._finish()

    # ----------------------------------------------------------- stopping it

    def _stop_command(self, why: str) -> None:
        self._cancel_timer()
        self._unwatch(self._stop_fd)
        self._why = why
        log.warning("job %s: %s; terminating process group %d", self._job_id, why, self._pgid)
        _signal_group(self._pgid, signal.SIGTERM, self._job_id)
        self._grace_end = time.monotonic() + self._runner.grace
        self._set_timer(self._runner.grace, self._on_grace_over)

    def _on_grace_over(self) -> None:
        self._timer = None
        if self._exited:
            self._check_group()
        else:
            self._kill()

    def _check_group(self) -> None:
        """The leader is gone; members that catch SIGTERM may still be cleaning up."""
        self._cancel_timer()
        if self._killed or not _group_alive(self._pgid):
            self._drain()
            return
        left = self._grace_end - time.monotonic()
        if left <= 0:
            self._kill()
        else:
            self._set_timer(min(left, _GROUP_POLL), self._check_group)

    def _kill(self) -> None:
        log.warning(
            "job %s: process group %d outlived SIGTERM; sending SIGKILL", self._job_id, self._pgid
        )
        self._killed = True
        _signal_group(self._pgid, signal.SIGKILL, self._job_id)
        if self._exited:
            self._drain()
        else:
            self._set_timer(_REAP_TIMEOUT, self._on_reap_timeout)

    def _on_reap_timeout(self) -> None:
        self._timer = None
        log.error("job %s: process %d survived SIGKILL", self._job_id, self._pgid)
        self._finish()

    # ---------------------------------------------------------------- the end

    def _drain(self) -> None:
        """Reads the output to its end, unless something outside keeps it open."""
        if not self._streams:
            self._finish()
            return
        self._draining = True
        self._set_timer(_DRAIN_TIMEOUT, self._on_drain_timeout)

    def _on_drain_timeout(self) -> None:
        self._timer = None
        log.warning(
            "job %s: output still open after the command ended; no longer reading it",
            self._job_id,
        )
        self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        stdout = self._stdout.text()
        if stdout:
            log.debug("job %s: stdout tail: %s", self._job_id, stdout)
        code = self._proc.returncode if self._exited else None
        outcome = _outcome(code, self._why, self._stderr.text(), self._runner.timeout)
        log.debug("job %s: %s %s", self._job_id, outcome.kind.value, outcome.reason)
        try:
            self._done(outcome)  # in the worker its ack goes out at once
        finally:
            self._leave_loop()
            if self._spares is None:
                self.release()
            else:
                self._spares.ended(self, self._loop)

    def release(self) -> None:
        """Closes the job's fds and removes its body file, once it has left the loop."""
        _close_fds(self._exit_fd, self._stop_fd)
        self._pipes.close_read_ends()
        self._runner.job_ended(self._body_path, self._job_id)

    def _release(self) -> None:
        self._leave_loop()
        self.release()

    def _leave_loop(self) -> None:
        self._cancel_timer()
        for fd in self._watched:
            self._loop.unwatch(fd)
        self._watched.clear()

    # ------------------------------------------------------------ the loop

    def _watch(self, fd: int, callback: Callable[[], None]) -> None:
        self._loop.watch(fd, self._guard(callback))
        self._watched.append(fd)

    def _watch_stream(self, fd: int, feed: Callable[[bytes], None]) -> None:
        self._watch(fd, lambda: self._on_stream(fd, feed))
        self._streams += 1

    def _unwatch(self, fd: int) -> None:
        if fd in self._watched:
            self._watched.remove(fd)
            self._loop.unwatch(fd)

    def _set_timer(self, delay: float, callback: Callable[[], None]) -> None:
        self._timer = self._loop.call_later(delay, self._guard(callback))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _guard(self, callback: Callable[[], None]) -> Callable[[], None]:
        """``callback``, but a failure ends the job instead of the loop."""

        def guarded() -> None:
            if self._finished:
                return
            try:
                callback()
            except Exception as exc:
                log.exception("job %s: internal error while supervising the command", self._job_id)
                self.abort()
                self._done(Outcome.failed(f"internal error while supervising the command: {exc}"))

        return guarded


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

    def close(self) -> None:
        self.close_write_ends()
        self.close_read_ends()

    def _pipe(self) -> tuple[int, int]:
        read_fd, write_fd = os.pipe()
        self._fds += (read_fd, write_fd)
        return read_fd, write_fd


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
            _write_all(made[0], body)
        except BaseException:
            self.discard(made)
            raise
        return made


class _Spare:
    """A body file and pipes made ahead for the next job."""

    __slots__ = ("body", "pipes")

    def __init__(self, body: tuple[int, str], pipes: _Pipes) -> None:
        self.body, self.pipes = body, pipes

    def discard(self, bodies: _BodyFiles) -> None:
        bodies.discard(self.body)
        self.pipes.close()


class _Spares:
    """Work kept out of the way of a short job, for the jobs of one event loop.

    Once a job's ack is sent, the broker needs the CPU to send the next job; once a
    command has been spawned, the worker only waits for it. So a job that ended
    keeps its fds and body file until the next command has started (or
    :data:`_TIDY_DELAY` has passed), and the body file and pipes of the next job are
    made then, before its delivery arrives. In the benchmark that took about 60 µs
    off each ``/bin/true`` job run one at a time.
    :meth:`close` may come from any thread.
    """

    def __init__(self, bodies: _BodyFiles) -> None:
        self._bodies = bodies
        self._lock = threading.Lock()
        self._ended: list[_Job] = []
        self._spare: _Spare | None = None
        self._timer: Timer | None = None
        self._closed = False

    def take(self, stdout: bool) -> _Spare | None:
        """The spare body file and pipes, if there are any (and made for ``stdout``)."""
        with self._lock:
            spare, self._spare = self._spare, None
        if spare is not None and (spare.pipes.stdout_r is not None) != stdout:
            spare.discard(self._bodies)  # the log level changed meanwhile
            return None
        return spare

    def ended(self, job: _Job, loop: FdLoop) -> None:
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
            spare = _Spare(body, _Pipes(stdout=log.isEnabledFor(logging.DEBUG)))
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
            return self.path


def _memory_dir() -> str | None:
    """``/dev/shm`` if body files may go there (no ``TMPDIR`` says otherwise)."""
    if os.environ.get("TMPDIR"):
        return None
    shm = "/dev/shm"  # noqa: S108 -- only the parent of a mkdtemp directory
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return None


def _write_all(fd: int, data: bytes) -> None:
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


def _child_env(base: Mapping[bytes, bytes], values: _Values, status_fd: int) -> dict[bytes, bytes]:
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
    """Splits a word into literal text and job slots; settings become literal text.

    A word without slots becomes its text, used as it is for every job.
    """
    parts: list[str | _Slot] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(word):
        parts.append(word[pos : match.start()])
        parts.append(_resolve(match, settings, where))
        pos = match.end()
    parts.append(word[pos:])
    if all(part.__class__ is str for part in parts):
        return "".join(parts)
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
    return _SLOTS[match.group(0)]


def _render(arg: _Arg, values: _Values) -> str:
    if arg.__class__ is str:
        return arg
    return "".join(values[part] if part.__class__ is _Slot else part for part in arg)


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
