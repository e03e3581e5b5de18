"""What the job pools tell about each job: held and running now, counts, history.

One entry per job: the job's own :class:`~rbit.dispatch.JobStatus`, kept in one dict
keyed by its message from the job's start (:meth:`JobObserver.started`) to its
settlement (:meth:`JobObserver.ended`). The same dict holds the jobs a worker with
PyBit's command queue has received but not started yet (:meth:`JobObserver.arrived`),
so that a ``CancelRequest`` finds a job wherever it is (:mod:`rbit.pybit`). A job's
path costs one dict insert and one pop (atomic under the GIL), two counter increments
under a lock held for nothing else and, with the history on, the entry itself handed
to ``record``: the state store's writer thread turns it into a row
(:meth:`~rbit.dispatch.JobStatus.history_row`). Nothing here waits for a disk or the
network.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rbit.outcome import Status

if TYPE_CHECKING:
    from rbit.dispatch import JobStatus
    from rbit.message import Message
    from rbit.usage import Usage

#: The counters kept since start, as named in the status snapshot.
COUNTS = ("done", "failed", "retried", "dead_lettered")

_FAILED, _WAITING, _BLOCKED = Status.FAILED, Status.WAITING, Status.BLOCKED


class JobObserver:
    """The jobs held and running, counts since start; outcomes go to the history.

    Args:
        keeper: ``keeper(queue)`` gives the callable that keeps the ended jobs' entries
            (:class:`~rbit.dispatch.JobStatus`) of ``queue``, and must not block (see
            :meth:`rbit.control.state.StateStore.keeper`); it is asked once per queue.
            None: no history.
        clock: Wall-clock time (Unix seconds).
    """

    def __init__(self, keeper: Callable[[str], Callable[[Any], None]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._keeper = keeper
        #: queue -> its keeper, as ``keeper`` gave it (None: no history).
        self._keep: dict[str, Callable[[Any], None]] | None = (
            None if keeper is None else {})
        self._clock = clock
        #: message -> its entry once started (None: received, not started yet).
        self._jobs: dict[Message, JobStatus | None] = {}
        self.counts = dict.fromkeys(COUNTS, 0)
        self._lock = threading.Lock()  # += is not atomic across job threads

    def arrived(self, message: Message) -> None:
        """A job was received (PyBit's commands only: it can be cancelled from now)."""
        self._jobs[message] = None

    def started(self, job: JobStatus) -> None:
        """A job starts; ``job`` is its entry until it ends."""
        job.since = self._clock()
        self._jobs[job.message] = job

    def dropped(self, message: Message) -> None:
        """A received job will not run here (given back, or its delivery is stale)."""
        self._jobs.pop(message, None)

    def ended(self, job: JobStatus, status: Status | None, attempt: int, note: str,
              failed: bool, usage: Usage | None = None) -> None:
        """A job's fate was decided (``status`` None: cut short, to be redelivered).

        Args:
            job: The job's entry.
            status: Done, Waiting/Blocked (retried) or Failed (dead-lettered).
            attempt: Which try this was.
            note: The settlement's note (why it was retried or dead-lettered).
            failed: The try failed (it may still be retried).
            usage: What the try used (:mod:`rbit.usage`), when metered.
        """
        begun = self._jobs.pop(job.message, None)
        job.message = None  # the history keeps the entry a while, not the job's body
        if status is None:
            return
        if status is _FAILED:
            key = "dead_lettered"
        elif status is _WAITING or status is _BLOCKED:
            key = "retried"
        else:
            key = "done"
        counts = self.counts
        with self._lock:
            counts[key] += 1
            if failed:
                counts["failed"] += 1
        keep = self._keep
        if keep is not None:
            job.fate = status  # one store each: a tuple assignment would build a tuple
            job.attempt = attempt
            job.note = note
            job.usage = usage
            job.ended = now = self._clock()
            if begun is not job:  # settled without starting (cancelled while it waited)
                job.since = now
            append = keep.get(job.queue)
            if append is None:
                append = keep[job.queue] = self._keeper(job.queue)  # type: ignore[misc]
            append(job)

    def snapshot_counts(self) -> dict[str, int]:
        """The counts since start, consistent with each other."""
        with self._lock:
            return dict(self.counts)

    def held(self, job_id: str) -> list[tuple[Message, JobStatus | None]]:
        """The messages of job ``job_id`` held here, with their entries once started.

        Two copies of one job id may be held at once (a redelivery racing its first
        copy's end).
        """
        return [(message, job) for message, job in list(self._jobs.items())
                if message.job_id == job_id]

    def running_count(self) -> int:
        """How many jobs run now."""
        return sum(1 for job in list(self._jobs.values()) if job is not None)

    def running_jobs(self) -> list[dict[str, Any]]:
        """The jobs running now: job id, queue, since (Unix seconds), oldest first."""
        jobs = [{"job_id": job.job_id, "queue": job.queue, "since": job.since}
                for job in list(self._jobs.values()) if job is not None]
        return sorted(jobs, key=lambda job: job["since"])
