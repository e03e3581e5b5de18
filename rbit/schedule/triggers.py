"""The time triggers: when a schedule fires.

Every trigger answers two questions about fire times, always in UTC-aware datetimes:
``next_after(t)`` (the first fire time strictly after ``t``) and ``latest_until(t)``
(the last fire time at or before ``t``). ``every`` fires on a grid counted from the Unix
epoch, so every worker computes the same fire times (and so the same fire ids).
``next = job`` has no times of its own: the schedule's state carries the one its last
job named (see :mod:`rbit.schedule.leader`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Every:
    """``every = 30s``: fires at every multiple of ``seconds`` since the epoch (UTC)."""

    seconds: float
    text: str = ""

    def next_after(self, moment: datetime) -> datetime | None:
        steps = math.floor((moment - EPOCH).total_seconds() / self.seconds) + 1
        return EPOCH + timedelta(seconds=steps * self.seconds)

    def latest_until(self, moment: datetime) -> datetime | None:
        steps = math.floor((moment - EPOCH).total_seconds() / self.seconds)
        return EPOCH + timedelta(seconds=steps * self.seconds)

    def describe(self) -> str:
        return f"every {self.text or f'{self.seconds:g}s'}"


@dataclass(frozen=True)
class Cron:
    """``cron = 0 3 * * *`` in ``zone`` (cronsim: standard five fields, DST-aware)."""

    expression: str
    zone: tzinfo

    def next_after(self, moment: datetime) -> datetime | None:
        return self._step(moment, reverse=False)

    def latest_until(self, moment: datetime) -> datetime | None:
        # cronsim's reverse iteration starts strictly before its start: nudge past it.
        return self._step(moment + timedelta(microseconds=1), reverse=True)

    def _step(self, moment: datetime, reverse: bool) -> datetime | None:
        # cronsim works at minute precision from the start it is given.
        local = moment.astimezone(self.zone)
        from cronsim import CronSim  # only for cron schedules (it loads calendar, locale)
        try:
            found = next(CronSim(self.expression, local, reverse=reverse))
        except StopIteration:
            return None
        return found.astimezone(UTC)

    def describe(self) -> str:
        return f"cron {self.expression} ({self.zone})"


@dataclass(frozen=True)
class NextJob:
    """``next = job``: the fired job names the next run; the first is at ``first``.

    Attributes:
        first: The first run's time, or None for "at once" (when no state exists yet).
        first_delay: Or a delay after the schedule's state was created.
    """

    first: datetime | None = None
    first_delay: float = 0.0

    def next_after(self, moment: datetime) -> datetime | None:
        return None

    def latest_until(self, moment: datetime) -> datetime | None:
        return None

    def first_run(self, created: datetime) -> datetime:
        """When the first job runs, for a state created at ``created``."""
        return self.first or created + timedelta(seconds=self.first_delay)

    def describe(self) -> str:
        return "next = job"


def check_cron(expression: str) -> str | None:
    """Why ``expression`` is not a five-field cron expression (None when it is)."""
    from cronsim import CronSim, CronSimError  # only for cron schedules (calendar, locale)
    if len(expression.split()) != 5:
        return f"expected 5 fields (minute hour day month weekday), got {len(expression.split())}"
    try:
        CronSim(expression, datetime(2000, 1, 1))
    except CronSimError as exc:
        return f"not a valid cron expression: {exc}"
    return None
