"""A fire: one job message of a schedule, published like ``rbit submit`` publishes.

Its message id (the job id) is ``NAME@<fire time>``, the time in ISO-8601 UTC
(``2026-11-30T03:00:00Z``; milliseconds only when the time has some), so that the same
fire always has the same id whichever worker publishes it. It is persistent, mandatory
and confirmed (:meth:`rbit.client.Client.publish`), and signed when ``[security]
signing_key`` is set: an ordinary job, with retries, dead letters, statuses and history.

A time fire for a runner section's queue (``queue =`` alone) is published straight to
that queue through the default exchange -- the way rbit's own retries come back to it
-- rather than through ``[rbit] exchange`` and the runner's routing key (which reach
the same queue); one for ``exchange =`` left empty goes through the default exchange
too. Either leaves a copy in its schedule's state queue in the same publish
(RabbitMQ's ``BCC`` header, removed by the broker before delivery): the fire and the
record that it happened reach the broker together, so a leader that dies before
writing its token leaves the next one that record, and the fire is not published
again (:mod:`rbit.schedule.scheduler`). Such a fire also carries the sequence number of
the token its leader held (``x-schedule-seq``): each queue takes a publish on its own,
so a fire the broker refused (nacked) may have left its copy without reaching its
queue, and its leader then writes a newer token, which voids the copies made under the
old one (:func:`rbit.schedule.leader.apply_fired`). The copy makes the publish routable
while the state queue exists, so a target queue deleted under a running fleet is not
reported as unroutable for those fires. A fire to a named exchange leaves no copy: one
routed there by the state queue's name could reach any queue bound with ``#``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rbit.client import Client
    from rbit.schedule.settings import ScheduleSettings

#: Headers every fire carries besides the schedule's own.
SCHEDULE_HEADER = "x-schedule"
FIRE_TIME_HEADER = "x-schedule-fire-time"
#: On a fire that leaves a copy: the sequence number of the token its leader held.
SEQ_HEADER = "x-schedule-seq"


def iso_utc(moment: datetime) -> str:
    """``moment`` as ISO-8601 UTC with a ``Z`` (milliseconds only when non-zero)."""
    moment = moment.astimezone(UTC)
    spec = "milliseconds" if moment.microsecond else "seconds"
    return moment.replace(tzinfo=None).isoformat(timespec=spec) + "Z"


def parse_iso(text: str) -> datetime:
    """The inverse of :func:`iso_utc` (any aware ISO-8601 time is accepted)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


@dataclass(frozen=True)
class Fire:
    """One firing of schedule ``schedule`` for fire time ``at``."""

    schedule: str
    at: datetime

    @property
    def job_id(self) -> str:
        return f"{self.schedule}@{iso_utc(self.at)}"


def schedule_of(job_id: str) -> str | None:
    """The schedule name of a fire's job id (None for any other id)."""
    name, sep, when = job_id.rpartition("@")
    if not sep or not name:
        return None
    try:
        parse_iso(when)
    except ValueError:
        return None
    return name


def publish_fire(client: Client, schedule: ScheduleSettings, fire: Fire,
                 record_in: str | None = None, token: int = 0) -> None:
    """Publish ``fire`` and wait for the broker's confirm.

    ``record_in``: the schedule's state queue, which gets a copy in the same publish
    when the fire goes through the default exchange; ``token``: the sequence number of
    the token held, which the copy carries.

    Raises:
        Unroutable: No queue would receive it.
        BrokerError: The broker refused it or the connection failed.
    """
    headers = dict(schedule.headers)
    headers[SCHEDULE_HEADER] = schedule.name
    headers[FIRE_TIME_HEADER] = iso_utc(fire.at)
    exchange, route = schedule.exchange, schedule.routing_key
    if schedule.runner_queue:
        exchange, route = "", schedule.queue
    if not exchange and record_in is not None:
        headers[SEQ_HEADER] = token
    client.publish(exchange, route, schedule.body, job_id=fire.job_id, headers=headers,
                   content_type=schedule.content_type,
                   also_to=None if exchange else record_in)


def fire_time_of(schedule: str, headers: dict[str, Any] | None) -> datetime | None:
    """The fire time of a fire's copy of ``schedule`` (None: not such a copy).

    Raises:
        ValueError: The copy's fire time is malformed.
    """
    if not headers or headers.get(SCHEDULE_HEADER) != schedule:
        return None
    when = headers.get(FIRE_TIME_HEADER)
    if not isinstance(when, str):
        return None
    return parse_iso(when)


def token_of(headers: dict[str, Any]) -> int | None:
    """The token sequence number a fire's copy carries (None: a copy without one).

    Raises:
        ValueError: It is malformed.
    """
    seq = headers.get(SEQ_HEADER)
    if seq is None:
        return None
    if isinstance(seq, bool) or not isinstance(seq, int):
        raise ValueError(f"malformed {SEQ_HEADER}: {seq!r}")
    return seq
