"""What the job pools tell about each job: running now, counts, history.

A pool calls :meth:`JobObserver.started` when a job starts and :meth:`JobObserver.ended`
once its fate is decided, from whatever thread runs it. Both are a few dict operations
(atomic under the GIL), two counter increments under a lock held for nothing else, and
one deque append: nothing here waits for a disk or the network.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from rbit.control.state import MAX_MESSAGE, RecordTuple
from rbit.outcome import Status
from rbit.usage import Usage

#: The counters kept since start, as named in the status snapshot.
COUNTS = ("done", "failed", "retried", "dead_lettered")


class JobObserver:
    """Running jobs and counts since start; outcomes go to ``record``.

    Args:
        record: Takes each outcome (a :data:`~rbit.control.state.RecordTuple`); must
            not block. None: no history.
        clock: Wall-clock time (Unix seconds).
    """

    def __init__(self, record: Callable[[RecordTuple], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._record = record
        self._clock = clock
        #: job id -> (queue, started): the jobs running now.
        self.running: dict[str, tuple[str, float]] = {}
        self.counts = dict.fromkeys(COUNTS, 0)
        self._lock = threading.Lock()  # += is not atomic across job threads

    def started(self, job_id: str, queue: str) -> None:
        self.running[job_id] = (queue, self._clock())

    def ended(self, job_id: str, queue: str, status: Status | None, attempt: int,
              note: str, failed: bool, usage: Usage | None = None) -> None:
        """A job's fate was decided (``status`` None: cut short, to be redelivered).

        Args:
            job_id: The job.
            queue: Its queue.
            status: Done, Waiting/Blocked (retried) or Failed (dead-lettered).
            attempt: Which try this was.
            note: The settlement's note (why it was retried or dead-lettered).
            failed: The try failed (it may still be retried).
            usage: What the try used (:mod:`rbit.usage`), when metered.
        """
        begun = self.running.pop(job_id, None)
        if status is None:
            return
        if status is Status.FAILED:
            key = "dead_lettered"
        elif status is Status.WAITING or status is Status.BLOCKED:
            key = "retried"
        else:
            key = "done"
        counts = self.counts
        with self._lock:
            counts[key] += 1
            if failed:
                counts["failed"] += 1
        if self._record is not None:
            now = self._clock()
            started = begun[1] if begun is not None else now
            self._record((job_id, queue, status.value, attempt, started, now,
                          now - started, note[-MAX_MESSAGE:] if note else "", usage))

    def snapshot_counts(self) -> dict[str, int]:
        """The counts since start, consistent with each other."""
        with self._lock:
            return dict(self.counts)

    def running_jobs(self) -> list[dict[str, Any]]:
        """The jobs running now: job id, queue, since (Unix seconds), oldest first."""
        jobs = [{"job_id": job_id, "queue": queue, "since": since}
                for job_id, (queue, since) in list(self.running.items())]
        return sorted(jobs, key=lambda job: job["since"])
