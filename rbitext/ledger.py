"""Deciding bills: samples against the last billed readings, one transaction each.

:class:`Ledger` holds the rules of :mod:`rbitext.usagebilling` (baseline, increase,
no change, stale sample, counter reset, grant levels) and writes every decision with
its messages to the :class:`~rbitext.billstore.BillStore` outbox; it publishes
nothing itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rbitext.billing import Bill, credit_events, decimal_of, levels_reached
from rbitext.billstore import BillStore, GroupTotals, OutboxItem, Reading
from rbitext.usagesamples import Sample

if TYPE_CHECKING:
    from rbitext.usagebilling import BillingSettings


@dataclass
class Report:
    """What one job's samples came to."""

    samples: int = 0
    bills: list[Bill] = field(default_factory=list)
    baselines: int = 0
    unchanged: int = 0
    stale: int = 0
    resets: list[str] = field(default_factory=list)


class Ledger:
    """Bills samples against the durable baselines.

    Args:
        store: The billing state.
        settings: Prices, precision, grants, exchange and credit queue.
        clock: Wall-clock time for samples that carry no time.
    """

    def __init__(self, store: BillStore, settings: BillingSettings, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self._clock = clock

    def bill(self, samples: Iterable[Sample]) -> Report:
        """Decide and record the bills of ``samples`` (oldest first).

        Raises:
            BillStoreError: The state could not be read or written.
        """
        now = self._clock()
        timed = sorted(((s, now if s.time is None else s.time) for s in samples),
                       key=lambda pair: pair[1])
        report = Report(samples=len(timed))
        for sample, when in timed:
            self._one(sample, when, report)
        return report

    def _one(self, sample: Sample, when: float, report: Report) -> None:
        value = decimal_of(sample.value)
        last = self.store.reading(sample.group, sample.metric)
        if last is None:
            report.baselines += 1
            self.store.save(sample.group, sample.metric, Reading(value, when))
        elif when < last.time:
            report.stale += 1
        elif value == last.value:
            report.unchanged += 1
        elif value < last.value:
            report.resets.append(
                f"{sample.group} {sample.metric} went down from {last.value} to {value} "
                "(a counter reset?): not billed; billing goes on from the new value")
            self.store.save(sample.group, sample.metric, Reading(value, when))
        else:
            report.bills.append(self._charge(sample, last, value, when))

    def _charge(self, sample: Sample, last: Reading, value, when: float) -> Bill:
        price = self.settings.prices[sample.metric]
        credits = price.credits(value - last.value, self.settings.precision)
        bill = Bill(sample.group, sample.metric, last.value, value, credits, when)
        before = self.store.totals(sample.group)
        outbox = [OutboxItem("bill", bill.id, self.settings.exchange, bill.group, bill.to_json())]
        carry = before.carry
        if self.settings.credit_queue:
            events, carry = credit_events(bill, before.carry)
            outbox += [OutboxItem("credit", e.id, "", self.settings.credit_queue, e.to_json())
                       for e in events]
        billed = before.billed + credits
        levels, warnings = self._levels(sample.group, before, billed)
        outbox += [OutboxItem("warning", bill.id, "", "", text.encode()) for text in warnings]
        self.store.save(sample.group, sample.metric, Reading(value, when),
                        GroupTotals(billed, carry, levels), outbox)
        return bill

    def _levels(self, group: str, before: GroupTotals, billed) -> tuple[int, list[str]]:
        """The levels now reached, and a warning for each one newly crossed."""
        grant = self.settings.grants.get(group.lower())
        if grant is None:
            return before.levels, []
        levels = self.settings.warn_at
        reached = levels_reached(billed, grant, levels)
        # A raised grant lowers the count: the next crossing is reported again.
        warnings = [
            f"group {group} has used {billed} credits, {float(level * 100):g}% or more of its "
            f"grant of {grant}"
            for level in levels[before.levels:reached]
        ]
        return reached, warnings
