"""``[schedule:NAME]`` sections: where fires go, what they carry, what triggers them.

Keys:

* ``queue = Q``: a queue with a ``[runner:Q]`` section in this file (routed as ``rbit
  submit`` routes), or any queue when ``exchange =`` / ``routing_key =`` say how to
  reach it (``exchange`` defaults to the default exchange, ``routing_key`` to ``Q``);
* ``body = TEXT`` or ``body_file = PATH`` (read when the config is loaded);
  ``content_type =``; ``header.NAME = VALUE`` (one application header each);
* exactly one trigger: ``every = 30s`` (s, m, h, d), ``cron = 0 3 * * *`` (+
  ``timezone =``, default UTC), ``next = job`` (+ ``first =``, an ISO-8601 time or a
  delay such as ``10m``); ``watch = DIR`` (+ ``pattern =``,
  :mod:`rbit.schedule.watch`), ``listen = unix:PATH | tcp:HOST:PORT``
  (:mod:`rbit.schedule.listen`);
* ``catch_up = skip | once | all`` (default ``once``).

A trigger's parser is a function ``parse(section, value) -> trigger`` in
:data:`TRIGGER_PARSERS`; it reads its own extra keys from ``section`` (so that the
others are reported as unknown) and raises ``section.error(key, reason)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from rbit.schedule.triggers import Cron, Every, NextJob, check_cron

if TYPE_CHECKING:
    from rbit.config import RunnerSettings
    from rbit.schedule.watch import WatchFiles

SECTION_PREFIX = "schedule:"
HEADER_PREFIX = "header."
CATCH_UP = ("skip", "once", "all")
#: Schedule names make queue names (``rbit.schedule.NAME``) and job ids (``NAME@...``).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
#: The longest interval (a year): fire times stay far inside datetime's range.
MAX_EVERY = 366 * 86400.0
MIN_EVERY = 1.0


@dataclass(frozen=True)
class ScheduleSettings:
    """One ``[schedule:NAME]`` section, validated.

    Attributes:
        name: NAME.
        exchange: Where fires are published ("" is the default exchange).
        routing_key: Their routing key.
        queue: The target queue as written (None when only a routing key was given).
        runner_queue: ``queue`` is a runner section's queue of this file, named without
            ``exchange`` or ``routing_key``: time fires go straight to it
            (:func:`rbit.schedule.fire.publish_fire`).
        body: What every fire carries.
        headers: Application headers of every fire.
        content_type: The AMQP content type of fires, if set.
        trigger: A trigger object (:mod:`rbit.schedule.triggers` or a plugged-in one);
            its ``kind`` below is the key that made it.
        kind: ``every``, ``cron``, ``next``, ``watch`` or ``listen``.
        catch_up: What happens to fires missed while no worker ran.
    """

    name: str
    exchange: str
    routing_key: str
    queue: str | None
    body: bytes
    trigger: Any
    kind: str
    catch_up: str = "once"
    headers: Mapping[str, str] = field(default_factory=dict)
    runner_queue: bool = False
    content_type: str | None = None

    @property
    def timed(self) -> bool:
        """Whether this is a time trigger (fired once across the fleet by a leader)."""
        return self.kind in TIME_TRIGGERS


def parse_duration(section: Any, key: str, text: str) -> float:
    """``30s``, ``5m``, ``2h``, ``1d`` (a bare number is seconds) -> seconds.

    Raises:
        ConfigError: Not a number with a known unit.
    """
    match = _DURATION.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if not match or (unit and unit not in UNITS):
        shown = repr(text[:80])
        raise section.error(key, f"expected a number with a unit s, m, h or d "
                                 f"(e.g. 30s, 5m), got {shown}")
    return float(match.group(1)) * UNITS.get(unit, 1.0)


def parse_every(section: Any, value: str) -> Every:
    """``every = 30s``."""
    seconds = parse_duration(section, "every", value)
    if not MIN_EVERY <= seconds <= MAX_EVERY:
        raise section.error("every", f"expected between {MIN_EVERY:g} s and 366 d, "
                                     f"got {value!r}")
    return Every(seconds, value.strip())


def parse_cron(section: Any, value: str) -> Cron:
    """``cron = 0 3 * * *`` with ``timezone =`` (an IANA name, default UTC)."""
    reason = check_cron(value)
    if reason:
        raise section.error("cron", f"{reason}: {value[:80]!r}")
    zone_name = section.text("timezone", "UTC")
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError  # only for cron schedules
    try:
        zone = UTC if zone_name.upper() == "UTC" else ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise section.error("timezone", f"unknown time zone {zone_name[:80]!r}") from None
    return Cron(" ".join(value.split()), zone)


def parse_next(section: Any, value: str) -> NextJob:
    """``next = job`` with ``first =`` (an ISO-8601 time, or a delay like ``10m``)."""
    if value.strip().lower() != "job":
        raise section.error("next", f"expected 'job', got {value[:80]!r}")
    first = section.text("first")
    if not first:
        return NextJob()
    try:
        moment = datetime.fromisoformat(first)
    except ValueError:
        return NextJob(first_delay=parse_duration(section, "first", first))
    if moment.tzinfo is None:
        raise section.error("first", "give a time zone, e.g. 2026-01-01T03:00:00+00:00")
    return NextJob(first=moment.astimezone(UTC))


def parse_watch(section: Any, value: str) -> WatchFiles:
    """``watch = DIR`` with ``pattern =`` (:func:`rbit.schedule.watch.parse_watch`)."""
    # Imported here: the watch module loads inotify (ctypes) and sqlite3 for the fired files.
    from rbit.schedule.watch import parse_watch as parse
    return parse(section, value)


def parse_listen(section: Any, value: str) -> Any:
    """``listen = unix:PATH | tcp:HOST:PORT`` (:func:`rbit.schedule.listen.parse_listen`)."""
    # Imported here: the listen module uses the credit server, which needs rbit.config.
    from rbit.schedule.listen import parse_listen as parse
    return parse(section, value)


#: Trigger key -> parser; a parser must accept ``(section, value)``.
TRIGGER_PARSERS: dict[str, Callable[[Any, str], Any]] = {
    "every": parse_every,
    "cron": parse_cron,
    "next": parse_next,
    "watch": parse_watch,
    "listen": parse_listen,
}
TIME_TRIGGERS = frozenset({"every", "cron", "next"})


def parse_schedule(section: Any, runners: Sequence[RunnerSettings],
                   exchange: str) -> ScheduleSettings:
    """Validate one ``[schedule:NAME]`` section.

    Args:
        section: The section reader of :mod:`rbit.config` (typed reads, ``error()``).
        runners: The file's runner sections (a ``queue`` must be one of theirs unless
            a routing key is given).
        exchange: ``[rbit] exchange``, where runner queues are routed from.

    Raises:
        ConfigError: Naming file, section, key and reason.
    """
    name = section.name[len(SECTION_PREFIX):]
    if not NAME_PATTERN.fullmatch(name):
        raise section.error("", f"schedule name {name[:80]!r}: use letters, digits and "
                                "._- (not first), at most 100 characters")
    kind, trigger = _trigger(section)
    target_exchange, routing_key, queue = _target(section, runners, exchange)
    return ScheduleSettings(
        name=name, exchange=target_exchange, routing_key=routing_key, queue=queue,
        body=_body(section), trigger=trigger, kind=kind,
        catch_up=section.choice("catch_up", "once", CATCH_UP),
        headers=_headers(section), content_type=section.text("content_type"),
        runner_queue=queue is not None and not (section.has("exchange")
                                                or section.has("routing_key")),
    )


def _trigger(section: Any) -> tuple[str, Any]:
    given = [key for key in TRIGGER_PARSERS if section.has(key)]
    if not given:
        raise section.error("", f"no trigger: give one of {', '.join(TRIGGER_PARSERS)}")
    if len(given) > 1:
        raise section.error(given[1], f"one trigger per schedule, got {' and '.join(given)}")
    kind = given[0]
    return kind, TRIGGER_PARSERS[kind](section, section.text(kind, required=True))


def _target(section: Any, runners: Sequence[RunnerSettings],
            exchange: str) -> tuple[str, str, str | None]:
    queue = section.text("queue")
    routing_key = section.text("routing_key")
    target_exchange = section.text("exchange")
    if routing_key is not None or target_exchange is not None:
        if not (routing_key or queue):
            raise section.error("routing_key", "give routing_key (or queue) with exchange")
        return target_exchange or "", routing_key or queue, queue
    if not queue:
        raise section.error("queue", "required: a [runner:QUEUE] queue of this file, or "
                                     "exchange and routing_key")
    for runner in runners:
        if runner.queue == queue:
            return exchange, runner.routing_key, queue
    raise section.error("queue", f"no [runner:{queue[:80]}] section in this file and no "
                                 "exchange/routing_key to route it")


def _body(section: Any) -> bytes:
    body, body_file = section.raw("body"), section.text("body_file")
    if body is not None and body_file:
        raise section.error("body_file", "give body or body_file, not both")
    if not body_file:
        return (body or "").encode("utf-8")
    try:
        with open(body_file, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise section.error("body_file", f"cannot read {body_file!r}: "
                                         f"{exc.strerror or exc}") from None


def _headers(section: Any) -> dict[str, str]:
    headers = {}
    for key in list(section.keys()):  # noqa: SIM118 -- a section reader, not a dict
        if key.startswith(HEADER_PREFIX):
            name = key[len(HEADER_PREFIX):]
            if not name or name.lower().startswith("x-rbit-"):
                raise section.error(key, "a header name, not empty and not x-rbit-*")
            headers[name] = section.text(key)
    return headers
