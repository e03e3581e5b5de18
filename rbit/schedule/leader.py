"""What the leader of a time schedule does at a moment ``now`` (no I/O, no clock).

The schedule's state is one message, the *token*, in its state queue
``rbit.schedule.NAME``; the leader holds it unacked (:mod:`rbit.schedule.scheduler`).
It records the last fire time (and, for ``next = job``, the run the last job named)
and a sequence number that grows with every write, so that when a hand-over leaves
two tokens in the queue the next leader keeps the newer one (:func:`newest`).

:func:`plan` decides which fires are due. Fire times are fixed by the trigger, not by
when the leader wakes up, so a leader that fires late still publishes the right ids.
Fires missed while no leader ran follow ``catch_up``:

* ``all``: every missed fire time, oldest first (at most :data:`MAX_FIRES_PER_PASS`
  per pass; the next passes go on where it stopped);
* ``once`` (default): one fire, for the latest missed time;
* ``skip``: none, unless the latest was missed by at most :data:`LATE_LIMIT` seconds
  (it is then on time, only late: e.g. during a hand-over).

Fire times that came while the current leader held the token, at most
:data:`LATE_LIMIT` seconds ago, were not missed, only reached late (a pass slowed by a
busy machine): they all fire. A longer gap (a suspended host) counts as missed.

With no state yet (a new schedule), the first fire is the first fire time after the
state was created: nothing is caught up from before.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from rbit.schedule.fire import Fire, iso_utc, parse_iso
from rbit.schedule.triggers import NextJob

if TYPE_CHECKING:
    from rbit.schedule.settings import ScheduleSettings

log = logging.getLogger(__name__)

#: Seconds a fire time may have passed and still be fired under ``catch_up = skip``.
LATE_LIMIT = 60.0
#: Fires one pass of ``catch_up = all`` publishes at most.
MAX_FIRES_PER_PASS = 100


@dataclass(frozen=True)
class State:
    """A schedule's state, as kept in its token."""

    seq: int
    created: datetime
    last: datetime | None = None
    next_at: datetime | None = None  # next = job: the run the last job named
    by: str = ""  # the worker that wrote it

    def encode(self) -> bytes:
        return json.dumps({
            "kind": "state", "seq": self.seq, "created": iso_utc(self.created),
            "last": self.last and iso_utc(self.last),
            "next": self.next_at and iso_utc(self.next_at), "by": self.by,
        }).encode()

    @classmethod
    def decode(cls, data: dict[str, Any]) -> State:
        """From a decoded token (ValueError, KeyError or TypeError when malformed)."""
        def moment(key: str) -> datetime | None:
            return parse_iso(data[key]) if data.get(key) else None

        return cls(int(data["seq"]), parse_iso(data["created"]), moment("last"),
                   moment("next"), str(data.get("by", "")))


def initial_state(schedule: ScheduleSettings, now: datetime, by: str = "") -> State:
    """The state of a schedule that has none yet."""
    next_at = None
    if isinstance(schedule.trigger, NextJob):
        next_at = schedule.trigger.first_run(now)
    return State(0, now, next_at=next_at, by=by)


def newest(states: list[State]) -> State:
    """The state to keep of several tokens: the highest sequence number."""
    return max(states, key=lambda state: (state.seq, state.last or state.created))


def next_fire(schedule: ScheduleSettings, state: State) -> datetime | None:
    """The next fire time after ``state`` (None: none known, e.g. no next run named)."""
    if isinstance(schedule.trigger, NextJob):
        return state.next_at
    return schedule.trigger.next_after(state.last or state.created)


def plan(schedule: ScheduleSettings, state: State, now: datetime,
         leading_since: datetime | None = None) -> tuple[list[Fire], State]:
    """The fires due at ``now`` and the state once they are published.

    Args:
        schedule: The schedule.
        state: Its state, as the token holds it.
        now: The time.
        leading_since: Since when this leader has held the token. Fire times after
            that, up to :data:`LATE_LIMIT` seconds old, were not missed, only reached
            late (a slow pass): they all fire, whatever ``catch_up`` says.
    """
    first = next_fire(schedule, state)
    if first is None or first > now:
        return [], state
    if isinstance(schedule.trigger, NextJob):
        # One run was named: it fires once, however late.
        return [Fire(schedule.name, first)], dataclasses.replace(state, last=first, next_at=None)
    on_duty = (leading_since is not None and first >= leading_since
               and now - first <= timedelta(seconds=LATE_LIMIT))
    if schedule.catch_up == "all" or on_duty:
        times = _times(schedule, first, now)
        return ([Fire(schedule.name, t) for t in times],
                dataclasses.replace(state, last=times[-1]))
    latest = schedule.trigger.latest_until(now) or first
    new_state = dataclasses.replace(state, last=latest)
    missed = now - latest > timedelta(seconds=LATE_LIMIT)
    if schedule.catch_up == "skip" and missed:
        log.warning("schedule %s: skipping fire time(s) up to %s (catch_up = skip)",
                    schedule.name, iso_utc(latest))
        return [], new_state
    if first < latest:
        log.info("schedule %s: fire times from %s missed; firing once for %s",
                 schedule.name, iso_utc(first), iso_utc(latest))
    return [Fire(schedule.name, latest)], new_state


def _times(schedule: ScheduleSettings, first: datetime, now: datetime) -> list[datetime]:
    times = [first]
    while len(times) < MAX_FIRES_PER_PASS:
        following = schedule.trigger.next_after(times[-1])
        if following is None or following > now:
            break
        times.append(following)
    return times


def apply_fired(schedule: ScheduleSettings, state: State, at: datetime) -> State:
    """``state`` once the fire of time ``at`` is known published (its copy was read).

    A copy no newer than the state's last fire changes nothing: the token records it.
    """
    if state.last is not None and at <= state.last:
        return state
    next_at = state.next_at
    if isinstance(schedule.trigger, NextJob) and next_at is not None and next_at <= at:
        next_at = None  # the run the last job named is the one that fired
    return dataclasses.replace(state, last=at, next_at=next_at)


def apply_next(schedule: ScheduleSettings, state: State, job_id: str,
               at: datetime) -> State:
    """``state`` after job ``job_id`` named its next run ``at``.

    Only the job of the last fire may name the next run: a request of an older fire (a
    job run again after a retry that came too late) is logged and ignored.
    """
    if state.last is None or Fire(schedule.name, state.last).job_id != job_id:
        log.warning("schedule %s: ignoring next run %s named by %s, not the last fire",
                    schedule.name, iso_utc(at), job_id)
        return state
    return dataclasses.replace(state, next_at=at)
