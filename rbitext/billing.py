"""Group billing: prices, bills, credit events and grant levels (no I/O here).

A bill charges the increase of one group's cumulative usage gauge between two
readings, at the metric's price: ``credits = increase * price / per``, rounded half
up to ``precision``. The defaults price ``project_vcpu_usage`` (vCPU-hours) at 1 credit
per vCPU-hour and ``project_mb_usage`` (MB-hours) at 0.3 credits per GiB-hour, that
is per 1024 MB-hours.

All arithmetic is :class:`decimal.Decimal`, from the shortest text of each reading, so
that 112.5 - 100 is 12.5 and not a float's neighbour of it.

Identities are derived, never random: a bill's id is a hash of (group, metric, from,
to), and its credit events' ids a hash of the bill id and the command, so that
publishing the same bill again (after a crash) carries the same ids and consumers
that remember ids (the credit runner does) count it once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal

from rbit.credit.events import CreditEvent

#: Credits per ``per`` units of each metric unless the section says otherwise.
DEFAULT_PRICES = {"project_vcpu_usage": Decimal("1"), "project_mb_usage": Decimal("0.3")}
#: How many of a metric's units one price is for (MB-hours per GiB-hour).
DEFAULT_PER = {"project_mb_usage": Decimal("1024")}


@dataclass(frozen=True)
class Price:
    """``amount`` credits per ``per`` units (unit-hours) of a metric."""

    amount: Decimal
    per: Decimal = Decimal(1)

    def credits(self, increase: Decimal, precision: Decimal) -> Decimal:
        """The credits for ``increase`` units, rounded half up to ``precision``."""
        return (increase * self.amount / self.per).quantize(precision, rounding=ROUND_HALF_UP)


def decimal_of(value: float) -> Decimal:
    """A reading as a Decimal, from its shortest text (``repr``)."""
    return Decimal(repr(float(value)))


def _number(value: Decimal) -> int | float:
    """A Decimal for JSON: an int when whole, else a float."""
    return int(value) if value == value.to_integral_value() else float(value)


def _digest(*parts: str) -> str:
    text = json.dumps(list(parts), separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class Bill:
    """The charge for one increase of one group's gauge.

    Attributes:
        group: Who is charged.
        metric: The gauge.
        start: The last billed reading (``from`` in the JSON).
        end: The new reading (``to``).
        credits: The price of ``end - start``, rounded.
        time: When ``end`` was read (seconds since the epoch).
    """

    group: str
    metric: str
    start: Decimal
    end: Decimal
    credits: Decimal
    time: float

    @property
    def increase(self) -> Decimal:
        return self.end - self.start

    @property
    def id(self) -> str:
        """Derived from (group, metric, from, to): the same bill always has the same id."""
        return _digest("bill", self.group, self.metric, str(self.start), str(self.end))

    def to_json(self) -> bytes:
        """The message published on the bills exchange."""
        doc = {
            "group": self.group, "metric": self.metric, "from": _number(self.start),
            "to": _number(self.end), "increase": _number(self.increase),
            "credits": _number(self.credits), "time": self.time,
        }
        return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def slot_name(bill: Bill) -> str:
    """The credit slot of a bill: ``usage:<group>:<metric>:<first 12 hex of bill id>``."""
    return f"usage:{bill.group}:{bill.metric}:{bill.id[:12]}"


def credit_events(bill: Bill, carry: Decimal) -> tuple[list[CreditEvent], Decimal]:
    """ALLOC + CLAIM of a bill's whole credits, with the group's carried fraction.

    The credit server counts whole credits: ``carry + bill.credits`` is split into a
    whole part, allocated and claimed now (slot :func:`slot_name`, machine = the
    group), and a fraction carried to the group's next bill.

    Returns:
        The events (none when the whole part is 0) and the new carry.
    """
    total = carry + bill.credits
    whole = total.to_integral_value(rounding=ROUND_FLOOR)
    rest = total - whole
    if whole <= 0:
        return [], total
    slot = slot_name(bill)
    events = [
        CreditEvent("alloc", {"slot": slot, "credits": int(whole)},
                    id=_digest(bill.id, "alloc"), time=bill.time),
        CreditEvent("claim", {"slot": slot, "machine": bill.group},
                    id=_digest(bill.id, "claim"), time=bill.time),
    ]
    return events, rest


def levels_reached(billed: Decimal, grant: Decimal, levels: Sequence[Decimal]) -> int:
    """How many of the (ascending) ``levels`` fractions of ``grant`` ``billed`` reached."""
    if grant <= 0:
        return 0
    return sum(1 for level in levels if billed >= level * grant)
