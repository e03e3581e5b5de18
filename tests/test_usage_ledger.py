"""Billing decisions against the durable state, and the billing section's validation."""

from __future__ import annotations

import json
import os
import re
import stat
from decimal import Decimal
from pathlib import Path

import pytest

from rbit.credit.events import CreditEvent
from rbit.errors import ConfigError
from rbitext.billing import Bill, Price, slot_name
from rbitext.billstore import BillStore
from rbitext.ledger import Ledger
from rbitext.usagebilling import BillingSettings
from rbitext.usagesamples import Sample

VCPU, MB = "project_vcpu_usage", "project_mb_usage"


def _ledger(tmp_path, **keys):
    store = BillStore(str(tmp_path / "state" / "billing.sqlite3"))
    return Ledger(store, BillingSettings.from_mapping(keys), clock=lambda: 1000.0)


def _bodies(ledger, kind):
    return [json.loads(item.body) for item in ledger.store.outbox() if item.kind == kind]


def test_first_sample_is_a_baseline_then_the_increase_is_billed(tmp_path):
    ledger = _ledger(tmp_path)
    first = ledger.bill([Sample("physics", VCPU, 100.0)])
    assert (first.baselines, first.bills) == (1, [])
    second = ledger.bill([Sample("physics", VCPU, 112.5)])
    assert [b.credits for b in second.bills] == [Decimal("12.50")]
    assert _bodies(ledger, "bill") == [{
        "group": "physics", "metric": VCPU, "from": 100, "to": 112.5, "increase": 12.5,
        "credits": 12.5, "time": 1000.0}]


def test_memory_is_priced_per_gib_hour(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.bill([Sample("physics", MB, 2048.0)])
    report = ledger.bill([Sample("physics", MB, 3072.0)])
    assert [b.credits for b in report.bills] == [Decimal("0.30")]


def test_rounding_is_half_up_to_the_precision(tmp_path):
    assert Price(Decimal(1)).credits(Decimal("0.125"), Decimal("0.01")) == Decimal("0.13")
    assert Price(Decimal(1)).credits(Decimal("0.124"), Decimal("0.01")) == Decimal("0.12")
    assert Price(Decimal(3), Decimal(1)).credits(Decimal("2.5"), Decimal(1)) == Decimal(8)


def test_no_change_and_the_same_sample_twice_bill_nothing(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.bill([Sample("physics", VCPU, 100.0)])
    ledger.bill([Sample("physics", VCPU, 112.5)])
    again = ledger.bill([Sample("physics", VCPU, 112.5)])
    assert (again.bills, again.unchanged) == ([], 1)
    assert len(_bodies(ledger, "bill")) == 1


def test_a_decrease_is_reported_re_baselined_and_never_billed_negative(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.bill([Sample("physics", VCPU, 100.0)])
    reset = ledger.bill([Sample("physics", VCPU, 40.0)])
    assert reset.bills == []
    assert len(reset.resets) == 1
    assert "went down from 100.0 to 40.0" in reset.resets[0]
    after = ledger.bill([Sample("physics", VCPU, 45.0)])
    assert [(b.start, b.end, b.credits) for b in after.bills] == [
        (Decimal("40.0"), Decimal("45.0"), Decimal("5.00"))]


def test_a_sample_older_than_the_baseline_is_skipped(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.bill([Sample("g", VCPU, 100.0, 50.0), Sample("g", VCPU, 110.0, 60.0)])
    replayed = ledger.bill([Sample("g", VCPU, 100.0, 50.0)])
    assert (replayed.stale, replayed.resets, replayed.bills) == (1, [], [])
    later = ledger.bill([Sample("g", VCPU, 111.0, 70.0)])
    assert [b.credits for b in later.bills] == [Decimal("1.00")]


def test_bill_ids_are_derived_from_group_metric_and_values():
    one = Bill("g", VCPU, Decimal(100), Decimal("112.5"), Decimal("12.50"), 1.0)
    same = Bill("g", VCPU, Decimal(100), Decimal("112.5"), Decimal("12.50"), 99.0)
    other = Bill("g", VCPU, Decimal(100), Decimal(113), Decimal("13.00"), 1.0)
    assert one.id == same.id != other.id
    assert slot_name(one) == f"usage:g:{VCPU}:{one.id[:12]}"


def test_credit_events_claim_whole_credits_and_carry_fractions(tmp_path):
    ledger = _ledger(tmp_path, credit_queue="credits")
    ledger.bill([Sample("g", VCPU, 0.0)])
    ledger.bill([Sample("g", VCPU, 2.6)])  # 2.60: 2 now, 0.60 carried
    ledger.bill([Sample("g", VCPU, 3.1)])  # 0.50 + 0.60 = 1.10: 1 now, 0.10 carried
    ledger.bill([Sample("g", VCPU, 3.5)])  # 0.40 + 0.10 = 0.50: nothing yet
    events = [CreditEvent.from_json(item.body) for item in ledger.store.outbox()
              if item.kind == "credit"]
    assert [(e.command, e.args.get("credits")) for e in events] == [
        ("alloc", 2), ("claim", None), ("alloc", 1), ("claim", None)]
    assert all(e.args["machine"] == "g" for e in events if e.command == "claim")
    assert events[0].args["slot"] == events[1].args["slot"] != events[2].args["slot"]
    assert ledger.store.totals("g").carry == Decimal("0.50")
    assert len({e.id for e in events}) == 4


def test_crossing_half_of_a_grant_warns_once_and_durably(tmp_path):
    ledger = _ledger(tmp_path, **{"grant.Physics": "100"})
    ledger.bill([Sample("physics", VCPU, 0.0)])
    ledger.bill([Sample("physics", VCPU, 49.0)])
    assert _bodies(ledger, "bill")
    assert not [i for i in ledger.store.outbox()
                                            if i.kind == "warning"]
    ledger.bill([Sample("physics", VCPU, 51.0)])
    ledger.bill([Sample("physics", VCPU, 60.0)])
    warnings = [i.body.decode() for i in ledger.store.outbox() if i.kind == "warning"]
    assert len(warnings) == 1
    assert "51.00 credits, 50% or more of its grant of 100" in warnings[0]
    reopened = Ledger(BillStore(ledger.store.path), ledger.settings)
    reopened.bill([Sample("physics", VCPU, 70.0)])
    assert len([i for i in reopened.store.outbox() if i.kind == "warning"]) == 1


def test_state_file_is_private(tmp_path):
    ledger = _ledger(tmp_path)
    assert stat.S_IMODE(os.stat(ledger.store.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(ledger.store.path)).st_mode) == 0o700


def test_settings_defaults():
    settings = BillingSettings.from_mapping({})
    assert settings.prices == {VCPU: Price(Decimal(1)), MB: Price(Decimal("0.3"), Decimal(1024))}
    assert (settings.precision, settings.warn_at) == (Decimal("0.01"), (Decimal("0.5"),))
    assert (settings.exchange, settings.credit_queue, settings.group_label) == (
        "rbit.bills", None, "project_name")


@pytest.mark.parametrize(("keys", "key"), [
    ({"price.project_vcpu_usage": "-1"}, "price.project_vcpu_usage"),
    ({"price.gpu": "x"}, "price.gpu"),
    ({"per.gpu": "2"}, "per.gpu"),
    ({"per.project_mb_usage": "0"}, "per.project_mb_usage"),
    ({"precision": "0"}, "precision"),
    ({"warn_at": "0.5, -1"}, "warn_at"),
    ({"grant.physics": "lots"}, "grant.physics"),
    ({"exporter_url": "ftp://x/metrics"}, "exporter_url"),
    ({"scrape_timeout": "0"}, "scrape_timeout"),
    ({"max_samples": "1.5"}, "max_samples"),
])
def test_invalid_settings_name_the_key(keys, key):
    with pytest.raises(ConfigError) as caught:
        BillingSettings.from_mapping(keys)
    assert caught.value.key == key


def test_the_shipped_example_section_is_valid():
    root = Path(__file__).resolve().parent.parent
    text = (root / "rbit.ini.example").read_text(encoding="utf-8")
    section = text.partition("#[runner:rbit.usage]")[2]
    keys = dict(re.findall(r"(?m)^#(?!#)\s*([\w.]+)\s*=\s*(.*)$", section))
    assert keys.pop("runner") == "python!rbitext.usagebilling:UsageBilling"
    settings = BillingSettings.from_mapping(keys)
    assert settings.grants == {"physics": Decimal(5000)}
    assert settings.warn_at == (Decimal("0.5"), Decimal("0.9"))
    assert settings.credit_queue == "rbit.credits"
