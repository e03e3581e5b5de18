"""A runner section's price list: what a job's usage is worth in credits.

Keys of a ``[runner:<queue>]`` section (all optional; the section earns credits once
any ``credits_*`` key is set):

=========================  ==============================================================
``credits_per_cpu_hour``   credits per hour of CPU time (user + system)
``credits_per_wall_hour``  credits per hour of wall time
``credits_per_gib_hour``   credits per GiB of peak memory held for an hour (peak GiB x
                           wall hours)
``credits_min``            whole credits a Done job claims at least
``credits_max``            whole credits a Done job claims at most
``credit_queue``           where the credit events go (default ``rbit.credits``, as
                           ``rbit-credit``'s)
=========================  ==============================================================

Prices are numbers >= 0, the bounds whole numbers >= 0 with ``credits_min <=
credits_max``. Another key starting with ``credits_`` is refused as a misspelt price.
:func:`parse_pricing` is called by :mod:`rbit.config`, whose errors name file, section
and key.
"""

from __future__ import annotations

import math
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from rbit.errors import ConfigError

DEFAULT_CREDIT_QUEUE = "rbit.credits"
PRICE_KEYS = ("credits_per_cpu_hour", "credits_per_wall_hour", "credits_per_gib_hour")
BOUND_KEYS = ("credits_min", "credits_max")
QUEUE_KEY = "credit_queue"
#: Every key this module reads from a runner section.
KEYS = (*PRICE_KEYS, *BOUND_KEYS, QUEUE_KEY)
_PREFIX = "credits_"
_MACHINE_ID_FILE = "/etc/machine-id"
# A machine id travels in a CLAIM line: no separators, no control characters.
_BAD_MACHINE_CHARS = re.compile(r"[,=\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Pricing:
    """A runner section's prices, and where and as whom its credits are claimed.

    Attributes:
        per_cpu_hour: Credits per CPU hour.
        per_wall_hour: Credits per wall-clock hour.
        per_gib_hour: Credits per GiB-hour of peak memory.
        minimum: Whole credits claimed at least (None: no lower bound but 0).
        maximum: Whole credits claimed at most (None: no upper bound).
        credit_queue: The queue the credit runner consumes.
        machine_id: ``[rbit] machine_id``: the machine every claim names.
        queue_type: ``[rbit] queue_type`` (and ``quorum_group_size``): ``credit_queue``
            is declared as the fleet's work queues are, should it not exist yet, so
            that in a quorum fleet it is a quorum queue like the one ``rbit-credit``
            declares.
        group_size: ``[rbit] quorum_group_size``.
    """

    per_cpu_hour: float = 0.0
    per_wall_hour: float = 0.0
    per_gib_hour: float = 0.0
    minimum: int | None = None
    maximum: int | None = None
    credit_queue: str = DEFAULT_CREDIT_QUEUE
    machine_id: str = ""
    queue_type: str = "classic"
    group_size: int | None = None


def parse_pricing(values: Mapping[str, str], *, file: str, section: str,
                  machine_id: str, queue_type: str = "classic",
                  group_size: int | None = None) -> Pricing | None:
    """The price list of a runner section's raw ``values``; None when it has none.

    Raises:
        ConfigError: A price is not a number >= 0, a bound not a whole number >= 0,
            ``credits_min`` is above ``credits_max``, ``credit_queue`` is not a queue
            name, or a ``credits_*`` key is not one of :data:`KEYS`.
    """
    def error(key: str, reason: str) -> ConfigError:
        return ConfigError(reason, file=file, section=section, key=key)

    for key in values:
        if key.startswith(_PREFIX) and key not in KEYS:
            raise error(key, "unknown price key; expected one of " + ", ".join(KEYS[:-1]))
    if not any(key in values for key in (*PRICE_KEYS, *BOUND_KEYS)):
        return None
    prices = [_price(values, key, error) for key in PRICE_KEYS]
    minimum, maximum = (_bound(values, key, error) for key in BOUND_KEYS)
    if minimum is not None and maximum is not None and minimum > maximum:
        raise error("credits_min", f"{minimum} is above credits_max ({maximum})")
    queue = values.get(QUEUE_KEY, DEFAULT_CREDIT_QUEUE).strip()
    if not queue or len(queue.encode("utf-8")) > 255:
        raise error(QUEUE_KEY, "expected a queue name of 1-255 bytes")
    return Pricing(*prices, minimum, maximum, queue, machine_id, queue_type, group_size)


def _price(values: Mapping[str, str], key: str, error) -> float:
    raw = values.get(key)
    if raw is None:
        return 0.0
    try:
        number = float(raw)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number >= 0):
        raise error(key, f"expected a number >= 0 (credits per unit-hour), got {raw.strip()!r}")
    return number


def _bound(values: Mapping[str, str], key: str, error) -> int | None:
    raw = values.get(key)
    if raw is None:
        return None
    try:
        number = int(raw)
    except ValueError:
        number = -1
    if number < 0:
        raise error(key, f"expected a whole number of credits >= 0, got {raw.strip()!r}")
    return number


def default_machine_id(path: str = _MACHINE_ID_FILE) -> str:
    """This machine's stable id: the content of ``/etc/machine-id``, else the host name."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read().strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    if text and check_machine_id(text) is None:
        return text
    return socket.gethostname() or "localhost"


def check_machine_id(value: str) -> str | None:
    """Why ``value`` cannot name a machine in a claim, or None when it can."""
    if not value:
        return "must not be empty"
    if len(value) > 255:
        return "longer than 255 characters"
    if _BAD_MACHINE_CHARS.search(value):
        return "must not contain ',', '=' or control characters"
    return None
