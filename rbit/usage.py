"""What a job used: wall time, CPU time and peak memory, and how each runner measures it.

Every job a ``shell!`` or ``python!`` runner runs ends with a :class:`Usage` on its
:class:`~rbit.outcome.Outcome`; it travels with the final status (the amqp event's
``usage`` object), into the job history and the metrics, and is what credits are
computed from (:mod:`rbit.credit.usage_credits`). The measuring rides on calls each
runner makes anyway, so it costs a job a few microseconds and no extra system call
where one can be avoided:

``shell!`` commands
    The supervisor reaps the command with ``wait4`` instead of ``waitpid`` (the same
    system call, with the resource usage filled in). ``cpu_s`` is the user + system
    time of the command and of every descendant it waited for (a shell that runs a
    pipeline, ``make`` and its compilers); a process that was never waited for by its
    parent -- a double-forked daemon, a background job the command left behind -- is
    not in it (those still in the command's process group when it exits are killed
    then). ``max_rss_kib``
    is the largest peak resident set of the command or of one of the descendants it
    waited for (not their sum). ``wall_s`` runs from the start to the exit.
``python!`` jobs in a child process
    The child measures itself around the call (``getrusage`` of itself before and
    after, of its waited-for children after: the reading that closes one job opens
    the next, :class:`ProcessMeter`) and reports the difference with the outcome over
    its pipe. ``max_rss_kib`` is the child's peak since it started (a
    warm child serves many jobs; the kernel keeps no peak per job), or of a child it
    waited for, whichever is larger.
``python!`` jobs in a worker thread
    ``cpu_s`` is the CPU time of the thread that ran the call (``time.thread_time``),
    and only of it: threads the runner starts and work done elsewhere are not
    counted. Peak memory is not metered (``max_rss_kib`` is None): the thread shares
    the worker's memory with every other job. The thread's CPU clock is read twice
    per job, right before and right after the call: it is a real system call (not
    served by the vDSO as the wall clocks are), the larger part of what the metering
    costs a job. Taking the previous job's closing reading as the next one's
    opening reading would save one, but would charge the job with rbit's own work
    on the thread between the two calls (settling the previous job, its statuses
    and ack, taking the next delivery): about as much CPU as a trivial job uses, so
    ``cpu_s`` -- what credits are priced from -- would no longer be the job's own.

Batch runners (the credit runner, for one) are not metered.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

_RUSAGE_SELF = resource.RUSAGE_SELF
_RUSAGE_CHILDREN = resource.RUSAGE_CHILDREN
_getrusage = resource.getrusage
_monotonic = time.monotonic
_thread_time = time.thread_time


class Usage:
    """The resources one job's try used; treat it as immutable.

    Attributes:
        wall_s: Seconds from the start to the end of the work.
        cpu_s: CPU seconds, user + system (see the module docs for whose).
        max_rss_kib: Peak resident memory in KiB, or None when not metered.
    """

    __slots__ = ("wall_s", "cpu_s", "max_rss_kib")

    def __init__(self, wall_s: float, cpu_s: float, max_rss_kib: int | None = None) -> None:
        self.wall_s = wall_s
        self.cpu_s = cpu_s
        self.max_rss_kib = max_rss_kib

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Usage):
            return NotImplemented
        return (self.wall_s, self.cpu_s, self.max_rss_kib) == (
            other.wall_s, other.cpu_s, other.max_rss_kib)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (f"Usage(wall_s={self.wall_s!r}, cpu_s={self.cpu_s!r}, "
                f"max_rss_kib={self.max_rss_kib!r})")

    def to_dict(self) -> dict[str, Any]:
        """``{"wall_s", "cpu_s", "max_rss_kib"}``, times rounded to microseconds."""
        return {"wall_s": round(self.wall_s, 6), "cpu_s": round(self.cpu_s, 6),
                "max_rss_kib": self.max_rss_kib}

    @classmethod
    def from_dict(cls, doc: Any) -> Usage | None:
        """The usage a :meth:`to_dict` document describes, or None if it is not one."""
        if not isinstance(doc, dict):
            return None
        try:
            rss = doc.get("max_rss_kib")
            return cls(max(0.0, float(doc["wall_s"])), max(0.0, float(doc["cpu_s"])),
                       None if rss is None else max(0, int(rss)))
        except (KeyError, TypeError, ValueError, OverflowError):
            return None


# ------------------------------------------------------------- shell! (wait4)


def reap(proc: Any) -> Any:
    """Reap an exited child with ``wait4``; its ``struct_rusage``, or None.

    Sets ``proc.returncode`` as :meth:`subprocess.Popen.wait` would (negative for a
    signal). None when the child was reaped already (its status is then what the
    earlier wait found) or by someone else (returncode 0, as Popen has it).
    """
    if proc.returncode is not None:
        return None
    try:
        _, status, rusage = os.wait4(proc.pid, 0)
    except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored): as Popen does
        proc.returncode = 0
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return rusage


def from_rusage(wall_s: float, rusage: Any) -> Usage:
    """The usage of a reaped process (``ru_maxrss`` is in KiB on Linux)."""
    return Usage(wall_s, rusage.ru_utime + rusage.ru_stime, rusage.ru_maxrss)


# ------------------------------------------------------- python! in a child


class ProcessMeter:
    """Meters one job after another in this process (a warm child), around each call.

    The waited-for children's CPU changes only when the process reaps a child: the
    reading that closes a job also opens the next one (a ``getrusage`` less per job).
    A child reaped between two jobs (by a thread a runner left behind) is counted in
    the next job, as one reaped during it would be.
    """

    def __init__(self) -> None:
        children = _getrusage(_RUSAGE_CHILDREN)
        self._children = children.ru_utime + children.ru_stime

    def mark(self) -> tuple[float, float]:
        """The clock and CPU seconds (itself + waited-for children) now."""
        me = _getrusage(_RUSAGE_SELF)
        return _monotonic(), me.ru_utime + me.ru_stime + self._children

    def usage(self, mark: tuple[float, float]) -> Usage:
        """What this process used since :meth:`mark` returned ``mark``."""
        now = _monotonic()
        me, children = _getrusage(_RUSAGE_SELF), _getrusage(_RUSAGE_CHILDREN)
        self._children = children.ru_utime + children.ru_stime
        cpu = me.ru_utime + me.ru_stime + self._children
        return Usage(now - mark[0], max(0.0, cpu - mark[1]),
                     max(me.ru_maxrss, children.ru_maxrss))


# ------------------------------------------------------ python! in a thread


def thread_mark() -> tuple[float, float]:
    """The clock and this thread's CPU seconds now."""
    return _monotonic(), _thread_time()


def thread_usage(mark: tuple[float, float]) -> Usage:
    """What this thread used since :func:`thread_mark` returned ``mark`` (no memory)."""
    return Usage(_monotonic() - mark[0], _thread_time() - mark[1])
