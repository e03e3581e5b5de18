"""``next = job``: how a fired job names its next run, and how that reaches the leader.

* A ``python!`` runner returns or raises :class:`RunNext` (``delay=`` seconds from now,
  or ``at=`` an aware datetime). Raising it ends the job as Done, like returning it.
* A ``shell!`` runner writes ``Next <seconds>`` or ``Next <ISO-8601 time>`` on its status
  descriptor (``$RBIT_STATUS_FD``).

The worker that ran the job (any worker: it need not carry the schedule) publishes the
request to the schedule's state queue ``rbit.schedule.NAME`` (see
:mod:`rbit.schedule.scheduler`), where the leader picks it up. The job is recognised by
its id, ``NAME@<fire time>``; a ``RunNext`` from any other job is logged and ignored.
A ``python!`` runner in a child process (``python =`` or ``timeout =``) cannot send
one: the request is logged there and dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

log = logging.getLogger(__name__)

#: ``(job_id, at)`` -> publish the request; installed by the worker's scheduler.
NextSink = Callable[[str, datetime], None]
_sink: NextSink | None = None


class RunNext(Exception):  # noqa: N818 -- a value as much as an error: named for what it says
    """The next run of this job's schedule: ``delay`` seconds from now, or ``at``.

    Args:
        delay: Seconds from now (>= 0).
        at: An aware datetime (a naive one is taken as UTC).
    """

    def __init__(self, delay: float | None = None, at: datetime | None = None) -> None:
        if (delay is None) == (at is None):
            raise ValueError("RunNext: give delay or at, not both nor neither")
        if delay is not None and delay < 0:
            raise ValueError("RunNext: delay must be >= 0")
        super().__init__(f"next run {'in %gs' % delay if at is None else 'at ' + str(at)}")
        self.delay = delay
        self.at = at

    def when(self, now: datetime) -> datetime:
        """The next run's time, UTC."""
        if self.at is not None:
            at = self.at if self.at.tzinfo else self.at.replace(tzinfo=UTC)
            return at.astimezone(UTC)
        return now + timedelta(seconds=self.delay or 0.0)


def install(sink: NextSink | None) -> None:
    """Where requests go in this process (the worker's scheduler; None: nowhere)."""
    global _sink
    _sink = sink


def report(job_id: str, next_run: RunNext) -> None:
    """Send ``next_run`` of job ``job_id`` to its schedule's leader (never raises)."""
    at = next_run.when(datetime.now(UTC))
    if _sink is None:
        log.warning("job %s named its next run (%s), but it cannot be sent from this "
                    "process (a runner in a child process?)", job_id, at.isoformat())
        return
    try:
        _sink(job_id, at)
    except Exception:  # a job's outcome must not hang on this
        log.exception("job %s: cannot send its next run", job_id)


def parse_next_line(text: str, now: datetime) -> RunNext:
    """``<seconds>`` or ``<ISO-8601 time>`` (the rest of a ``Next`` status line).

    Raises:
        ValueError: Neither.
    """
    text = text.strip()
    try:
        return RunNext(delay=float(text))
    except ValueError:
        pass
    return RunNext(at=datetime.fromisoformat(text))
