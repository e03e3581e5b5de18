"""One way to supervise a child process: watch it, time it out, cancel it, reap it.

Both ``shell!`` commands and ``python!`` runner children are started in a process
group (and session) of their own and then handed to a :class:`Supervisor`, which
watches them from an event loop (:class:`rbit.fdloop.FdLoop`) without a thread of its
own:

* their exit, through a pidfd (a thread blocked in ``waitpid`` where Linux has none);
* their pipes, fed to the caller's readers until EOF;
* a deadline: on expiry the whole process group gets SIGTERM, and whatever is left of
  it ``kill_grace`` seconds later gets SIGKILL;
* a stop pipe (:class:`StopSignal`): a cancel stops every process group the same way;
* once the leader exits by itself, processes it left running in its group are killed
  with SIGKILL, so that nothing outlives its job.

The end is reported once, to :meth:`Supervisor.on_end`, with the exit code (negative
for a signal, as :mod:`subprocess` has it) and why rbit stopped the process, if it
did; :attr:`Supervisor.usage` then holds what the process used (:mod:`rbit.usage`:
the exit is reaped with ``wait4``, which fills in the resource usage at no extra cost).
:func:`stop_outcome` and :func:`killed_by` word the results the same way for
every runner.

A long-lived child (one serving many requests over a pipe) fits the same mould: its
protocol pipe is one of the watched streams, :meth:`Supervisor.set_deadline` and
:meth:`Supervisor.clear_deadline` bound each request, :meth:`Supervisor.stop` ends it.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from rbit import jobguard
from rbit.errors import RunnerLoadError
from rbit.fdloop import FdLoop, Timer
from rbit.outcome import Outcome
from rbit.usage import Usage, from_rusage, reap

DEFAULT_KILL_GRACE = 5.0

#: Why rbit stopped a process (:attr:`Supervisor.stopped`).
CANCELLED = "cancelled"
TIMED_OUT = "timed out"
CANCEL_REASON = "cancelled: the worker is stopping"

#: Bytes one read of a watched pipe takes at most (the warm child's reply wait too).
READ_SIZE = 65536
_DRAIN_TIMEOUT = 2.0  # how long pipes may stay open once the process group is gone
_REAP_TIMEOUT = 10.0  # how long a SIGKILLed process may take to be reaped
_GROUP_POLL = 0.05  # nothing signals the end of group members that are not our children

Feed = Callable[[bytes], None]


class Child(Protocol):
    """A started process: :class:`subprocess.Popen` or anything with its ``wait``."""

    pid: int
    returncode: int | None

    def wait(self) -> int: ...


def kill_grace(settings: Mapping[str, str], queue: str) -> float:
    """The ``kill_grace`` of a runner section: seconds between SIGTERM and SIGKILL.

    Raises:
        RunnerLoadError: The value is not a number of seconds >= 0.
    """
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


class Supervisor:
    """One child process and its pipes, moved along by callbacks from a loop.

    The normal course is: exit, leftovers killed, pipes read to their end,
    :meth:`on_end`. A deadline or a cancel sends SIGTERM to the process group, waits
    for the group to be gone until the grace runs out, then sends SIGKILL.
    Subclasses implement :meth:`on_end` and :meth:`on_error`, and extend
    :meth:`release` with their own resources. All methods run on the loop's thread.

    Args:
        proc: The started process, leader of its own process group.
        loop: Where its fds and deadlines are watched.
        streams: Pipes to read until EOF, each with what receives its chunks (and
            ``b""`` at the end).
        label: Names the process in log lines, after :attr:`what`.
        grace: Seconds between SIGTERM and SIGKILL.
        timeout: Seconds the process may run; ``None`` for no limit.
        stop_fd: An fd that becomes readable when all processes must stop
            (:attr:`StopSignal.fd`); watched through a copy.
    """

    log = logging.getLogger(__name__)  # subclasses log under their runner's name
    what = "job"

    def __init__(
        self,
        proc: Child,
        loop: FdLoop,
        streams: Iterable[tuple[int, Feed]],
        *,
        label: str,
        grace: float,
        timeout: float | None = None,
        stop_fd: int | None = None,
    ) -> None:
        self.proc = proc
        self.pgid = proc.pid  # a new session makes the child its group's leader
        self.label = label
        self.loop = loop
        self.grace = grace
        self.timeout = timeout
        self.finished = False
        self.stopped: str | None = None  # CANCELLED, TIMED_OUT or the reason given to stop()
        self._watched: list[int] = []
        self._streams = 0
        self._exited = False
        self._draining = False
        self._killed = False
        self._grace_end = 0.0
        self._timer: Timer | None = None
        self._stop_fd = -1
        #: What the process used, once reaped (None if unknown, or reaped by abort()).
        self.usage: Usage | None = None
        self._started = time.monotonic()
        self._rusage = None  # from the fallback reaper thread, where there is no pidfd
        self._exit_fd = exit_fd(proc, self._keep_rusage)
        try:
            self._watch(self._exit_fd, self._on_exit)
            if stop_fd is not None:
                # A copy per process: one loop may watch an fd only once.
                self._stop_fd = os.dup(stop_fd)
                self._watch(self._stop_fd, self._on_stop)
            for fd, feed in streams:
                self.watch_stream(fd, feed)
            if timeout is not None:
                self._set_timer(timeout, self._on_timeout)
            jobguard.job_started(self.pgid)  # so that a next start finds it if we die
        except BaseException:
            self._leave_loop()  # the caller takes care of the pipes and the process
            Supervisor.release(self)
            raise

    # ------------------------------------------------------------- the API

    def on_end(self, code: int | None, stopped: str | None) -> None:
        """The process is gone and its pipes are read: report, then :meth:`release`.

        Args:
            code: Its exit code (negative: killed by that signal), or ``None`` when
                it could not be stopped.
            stopped: Why rbit stopped it, or ``None`` when it ended by itself.
        """
        raise NotImplementedError

    def on_error(self, exc: Exception) -> None:
        """Supervising failed with ``exc``; the process was killed and released."""
        raise NotImplementedError

    def release(self) -> None:
        """Closes the supervisor's own fds, once the process has left the loop."""
        os.close(self._exit_fd)
        if self._stop_fd >= 0:
            os.close(self._stop_fd)

    def watch_stream(self, fd: int, feed: Feed) -> None:
        """Reads ``fd`` into ``feed`` until EOF; the end waits for it."""
        self._watch(fd, lambda: self._on_stream(fd, feed))
        self._streams += 1

    def set_deadline(self, seconds: float, why: str = TIMED_OUT) -> None:
        """Stops the process (``why``) unless it ends within ``seconds``."""
        if self.stopped is None and not self._exited:
            self._cancel_timer()
            self._set_timer(seconds, lambda: self._on_deadline(why))

    def clear_deadline(self) -> None:
        """Forgets the deadline (not a stop under way)."""
        if self.stopped is None:
            self._cancel_timer()

    def stop(self, why: str) -> None:
        """SIGTERM to the process group now, SIGKILL after the grace."""
        if self.stopped is not None or self._exited or self.finished:
            return
        self._cancel_timer()
        self._unwatch(self._stop_fd)
        self.stopped = why
        self.log.warning(
            "%s %s: %s; terminating process group %d", self.what, self.label, why, self.pgid
        )
        signal_group(self.pgid, signal.SIGTERM, self.label)
        self._grace_end = time.monotonic() + self.grace
        self._set_timer(self.grace, self._on_grace_over)

    def abort(self) -> None:
        """Kills the process group and lets go of everything, without an end report."""
        if self.finished:
            return
        self.finished = True
        signal_group(self.pgid, signal.SIGKILL, self.label)
        if not self._exited:
            self.proc.wait()
        jobguard.job_ended(self.pgid)
        self._leave_loop()
        self.release()

    # ------------------------------------------------------------------ events

    def _on_exit(self) -> None:
        self._unwatch(self._exit_fd)
        # Already over: this only collects the status, and with wait4 its usage too.
        rusage = reap(self.proc) or self._rusage
        if rusage is not None:
            self.usage = from_rusage(time.monotonic() - self._started, rusage)
        self._exited = True
        if self.stopped is not None:
            self._check_group()
            return
        self._cancel_timer()
        self._unwatch(self._stop_fd)
        kill_leftovers(self.pgid, self.label, self.log)
        self._drain()

    def _on_stop(self) -> None:
        self._unwatch(self._stop_fd)  # it stays readable: watch it once
        self.stop(CANCELLED)

    def _on_timeout(self) -> None:
        self._timer = None
        self.stop(TIMED_OUT)

    def _on_deadline(self, why: str) -> None:
        self._timer = None
        self.stop(why)

    def _on_stream(self, fd: int, feed: Feed) -> None:
        chunk = os.read(fd, READ_SIZE)
        feed(chunk)
        if chunk:
            return
        self._unwatch(fd)  # EOF, also after POLLHUP: every writer is gone
        self._streams -= 1
        if self._draining and not self._streams:
            self._finish()

    # ----------------------------------------------------------- stopping it

    def _on_grace_over(self) -> None:
        self._timer = None
        if self._exited:
            self._check_group()
        else:
            self._kill()

    def _check_group(self) -> None:
        """The leader is gone; members that catch SIGTERM may still be cleaning up."""
        self._cancel_timer()
        if self._killed or not group_alive(self.pgid):
            self._drain()
            return
        left = self._grace_end - time.monotonic()
        if left <= 0:
            self._kill()
        else:
            self._set_timer(min(left, _GROUP_POLL), self._check_group)

    def _kill(self) -> None:
        self.log.warning(
            "%s %s: process group %d outlived SIGTERM; sending SIGKILL",
            self.what,
            self.label,
            self.pgid,
        )
        self._killed = True
        signal_group(self.pgid, signal.SIGKILL, self.label)
        if self._exited:
            self._drain()
        else:
            self._set_timer(_REAP_TIMEOUT, self._on_reap_timeout)

    def _on_reap_timeout(self) -> None:
        self._timer = None
        self.log.error("%s %s: process %d survived SIGKILL", self.what, self.label, self.pgid)
        self._finish(group_gone=False)  # still recorded: the next start tries again

    # ---------------------------------------------------------------- the end

    def _drain(self) -> None:
        """Reads the pipes to their end, unless something outside keeps them open."""
        if not self._streams:
            self._finish()
            return
        self._draining = True
        self._set_timer(_DRAIN_TIMEOUT, self._on_drain_timeout)

    def _on_drain_timeout(self) -> None:
        self._timer = None
        self.log.warning(
            "%s %s: output still open after the process ended; no longer reading it",
            self.what,
            self.label,
        )
        self._finish()

    def _finish(self, group_gone: bool = True) -> None:
        if self.finished:
            return
        self.finished = True
        if group_gone:
            jobguard.job_ended(self.pgid)
        self._leave_loop()
        self.on_end(self.proc.returncode if self._exited else None, self.stopped)

    def _keep_rusage(self, rusage: object) -> None:
        self._rusage = rusage

    def _leave_loop(self) -> None:
        self._cancel_timer()
        for fd in self._watched:
            self.loop.unwatch(fd)
        self._watched.clear()

    # ------------------------------------------------------------ the loop

    def _watch(self, fd: int, callback: Callable[[], None]) -> None:
        self.loop.watch(fd, self._guard(callback))
        self._watched.append(fd)

    def _unwatch(self, fd: int) -> None:
        if fd in self._watched:
            self._watched.remove(fd)
            self.loop.unwatch(fd)

    def _set_timer(self, delay: float, callback: Callable[[], None]) -> None:
        self._timer = self.loop.call_later(delay, self._guard(callback))

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _guard(self, callback: Callable[[], None]) -> Callable[[], None]:
        """``callback``, but a failure ends the supervision instead of the loop."""

        def guarded() -> None:
            if self.finished:
                return
            try:
                callback()
            except Exception as exc:
                self.failed(exc)

        return guarded

    def failed(self, exc: Exception) -> None:
        """Supervising failed with ``exc`` (in a callback): kill, release, report."""
        self.log.exception(
            "%s %s: internal error while supervising the process", self.what, self.label
        )
        self.abort()
        self.on_error(exc)


class StopSignal:
    """A runner's "no more processes" flag, with a pipe that wakes every supervisor.

    The pipe is written once and never read, so it stays readable: each process's
    loop sees it however late it starts watching, and no list of running processes
    is needed.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reason = ""
        self._woken = False
        self._read, self._write = os.pipe()
        self.fd = self._read
        weakref.finalize(self, close_fds, self._read, self._write)

    def is_set(self) -> bool:
        return bool(self.reason)

    def set(self, reason: str, *, wake: bool) -> None:
        """Starts no more processes; with ``wake``, stops those that run."""
        with self._lock:
            if wake or not self.reason:  # a cancel after close() still stops them
                self.reason = reason
            if wake and not self._woken:
                os.write(self._write, b"x")
                self._woken = True


# ---------------------------------------------------------------- wording


def with_tail(reason: str, tail: str) -> str:
    return f"{reason}: {tail}" if tail else reason


def stop_outcome(stopped: str, timeout: float | None, tail: str = "") -> Outcome:
    """The outcome of a process rbit stopped: cancelled is blocked, the rest failed."""
    if stopped == CANCELLED:
        return Outcome.blocked(with_tail(CANCEL_REASON, tail))
    if stopped == TIMED_OUT:
        return Outcome.failed(with_tail(f"timed out after {timeout:g} s", tail))
    return Outcome.failed(with_tail(stopped, tail))


def killed_by(code: int) -> str:
    """``killed by signal SIGNAME`` for a negative exit code."""
    return f"killed by signal {signal_name(-code)}"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


# ------------------------------------------------------- processes and groups


def close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


_pidfd_supported = hasattr(os, "pidfd_open")


def pidfd_supported() -> bool:
    """Whether exits are watched without a thread (``pidfd_open``, Linux >= 5.3)."""
    return _pidfd_supported


def exit_fd(proc: Child, keep_rusage: Callable[[object], None] | None = None) -> int:
    """An fd that becomes readable when ``proc`` exits (it is not reaped yet).

    Where there is no pidfd, a thread reaps it and hands its resource usage to
    ``keep_rusage`` before the fd becomes readable.
    """
    global _pidfd_supported
    if _pidfd_supported:
        try:
            return os.pidfd_open(proc.pid)
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            _pidfd_supported = False
    # Elsewhere a thread blocks in waitpid and closes a pipe, which reads as EOF.
    read_fd, write_fd = os.pipe()

    def reap_in_thread() -> None:
        rusage = reap(proc)
        if rusage is not None and keep_rusage is not None:
            keep_rusage(rusage)
        proc.wait()
        os.close(write_fd)

    threading.Thread(target=reap_in_thread, name=f"rbit-wait-{proc.pid}", daemon=True).start()
    return read_fd


def signal_group(pgid: int, sig: signal.Signals, label: str = "") -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except OSError as exc:
        logging.getLogger(__name__).warning(
            "%s: cannot send %s to process group %d: %s", label, sig.name, pgid, exc
        )


def kill_leftovers(pgid: int, label: str, log: logging.Logger) -> None:
    # Once the leader is gone nobody waits for what it left behind; a clean process
    # leaves nothing, so the rest is killed outright.
    if group_alive(pgid):
        log.warning("job %s: killing processes the command left running (group %d)", label, pgid)
        signal_group(pgid, signal.SIGKILL, label)


def group_alive(pgid: int) -> bool:
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
