"""Group billing inside a real worker process, with RabbitMQ and a real usage exporter.

The exporter is a real HTTP server on 127.0.0.1 serving Prometheus text; jobs come
through the broker; bills are read from the ``rbit.bills`` exchange, credit events
from the credit queue, statuses from the status exchange.
"""

from __future__ import annotations

import json
import signal
from decimal import Decimal
from typing import Any

import pytest
from worker_helpers import WorkerProcess, wait_until, write_config

from rbit.credit.events import CreditEvent
from rbitext.billstore import BillStore
from rbitext.ledger import Ledger
from rbitext.usagebilling import BillingSettings
from rbitext.usagesamples import Sample

QUEUE = "usage"
CREDITS = "test.credits"
WAIT = 60.0  # a shared, slow machine: generous bounds on every wait

pytestmark = pytest.mark.slow


def exposition(vcpu: dict[str, float], mb: dict[str, float] | None = None) -> str:
    lines = ["# TYPE project_vcpu_usage gauge"]
    lines += [f'project_vcpu_usage{{project_name="{g}"}} {v}' for g, v in vcpu.items()]
    lines.append("# TYPE project_mb_usage gauge")
    lines += [f'project_mb_usage{{project_name="{g}"}} {v}' for g, v in (mb or {}).items()]
    return "\n".join(lines) + "\n"


class Exporter:
    """The usage exporter: a real HTTP server whose gauges the test moves."""

    def __init__(self, server) -> None:
        self.server = server
        self.url = server.url_for("/metrics")

    def serve(self, vcpu: dict[str, float], mb: dict[str, float] | None = None) -> None:
        self.server.set_response("/metrics", 200, exposition(vcpu, mb).encode(),
                                 {"Content-Type": "text/plain; version=0.0.4"})


class Billing:
    """A worker process running the billing runner, and what it sends out."""

    def __init__(self, tmp_path, rabbit, vhost, amqp, exporter: Exporter, **keys: Any) -> None:
        section = {"runner": "python!rbitext.usagebilling:UsageBilling",
                   "exporter_url": exporter.url, "max_retries": 0, **keys}
        self.config = write_config(tmp_path, rabbit.url(vhost), {QUEUE: section},
                                   status={"sinks": "log, amqp"})
        self.state_file = tmp_path / "state-worker" / f"usagebilling-{QUEUE}.sqlite3"
        self.amqp = amqp
        self.rabbit, self.vhost = rabbit, vhost
        self.statuses = amqp.watch("rbit.status", "#")
        self.bills_queue = amqp.watch("rbit.bills", "#").queue
        self.bills: list[tuple[Any, dict[str, Any]]] = []  # (properties, body)
        self.worker: WorkerProcess | None = None
        self.jobs = 0

    def start(self) -> WorkerProcess:
        self.worker = WorkerProcess(self.config)
        wait_until(lambda: "consuming" in self.worker.output, WAIT, "the worker to consume")
        return self.worker

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.signal(signal.SIGTERM)
            assert self.worker.wait(WAIT) == 0, self.worker.output

    def job(self, body: bytes = b"", status: str = "Done") -> list[dict[str, Any]]:
        """Publish a job and wait for ``status``; its status events."""
        self.jobs += 1
        job_id = f"job{self.jobs}"
        self.amqp.publish(body, exchange="", routing_key=QUEUE, message_id=job_id)
        return self.statuses.wait_for(job_id, status, timeout=WAIT)

    def read_bills(self) -> list[dict[str, Any]]:
        while True:
            method, props, body = self.amqp.channel.basic_get(self.bills_queue, auto_ack=True)
            if method is None:
                return [bill for _props, bill in self.bills]
            assert method.routing_key == json.loads(body)["group"]
            assert props.delivery_mode == 2
            self.bills.append((props, json.loads(body)))

    def credit_events(self) -> list[CreditEvent]:
        events = []
        while (got := self.amqp.get(CREDITS)) is not None:
            events.append(CreditEvent.from_json(got[2]))
        return events


@pytest.fixture
def exporter(http_server):
    return Exporter(http_server)


@pytest.fixture
def billing(tmp_path, rabbit, vhost, amqp, exporter):
    made: list[Billing] = []

    def make(**keys: Any) -> Billing:
        made.append(Billing(tmp_path, rabbit, vhost, amqp, exporter, **keys))
        return made[-1]

    yield make
    for each in made:
        if each.worker is not None:
            each.worker.kill()


def test_exporter_increases_are_billed_at_their_price_and_a_repeated_scrape_bills_nothing(
        billing, exporter):
    bills = billing()
    bills.start()
    exporter.serve({"physics": 100}, {"physics": 2048})
    baseline = bills.job()
    assert "2 new baselines" in baseline[-1]["message"]
    assert bills.read_bills() == []
    exporter.serve({"physics": 112.5}, {"physics": 3072})
    bills.job()
    billed = wait_until(lambda: len(bills.read_bills()) == 2 and bills.read_bills(), WAIT,
                        "two bills")
    by_metric = {bill["metric"]: bill for bill in billed}
    vcpu, mb = by_metric["project_vcpu_usage"], by_metric["project_mb_usage"]
    assert (vcpu["group"], vcpu["from"], vcpu["to"], vcpu["increase"], vcpu["credits"]) == (
        "physics", 100, 112.5, 12.5, 12.5)
    assert (mb["from"], mb["to"], mb["increase"], mb["credits"]) == (2048, 3072, 1024, 0.3)
    assert isinstance(vcpu["time"], float)
    again = bills.job()
    assert "0 bills" in again[-1]["message"]
    assert "2 unchanged" in again[-1]["message"]
    assert len(bills.read_bills()) == 2
    bills.stop()


def test_a_decrease_bills_nothing_and_is_reported(billing, exporter):
    bills = billing()
    bills.start()
    exporter.serve({"physics": 100})
    bills.job()
    exporter.serve({"physics": 90})
    events = bills.job()
    reports = [e["message"] for e in events if "went down" in e["message"]]
    assert reports
    assert "from 100.0 to 90.0" in reports[0]
    assert bills.read_bills() == []
    exporter.serve({"physics": 95})
    bills.job()
    assert [(b["from"], b["to"], b["credits"]) for b in bills.read_bills()] == [(90, 95, 5)]
    assert "went down from 100.0 to 90.0" in bills.worker.output  # the WARNING log line
    bills.stop()


def test_crossing_half_of_a_grant_emits_exactly_one_event(billing, exporter):
    bills = billing(**{"grant.physics": 40, "warn_at": 0.5})
    bills.start()
    seen: list[str] = []
    for value in (0, 15, 25, 30, 38):  # 20 credits (half of 40) is crossed at 25
        exporter.serve({"physics": value})
        seen += [e["message"] for e in bills.job() if "grant" in e["message"]]
    assert len(seen) == 1
    assert "25.00 credits, 50% or more of its grant of 40" in seen[0]
    warnings = [line for line in bills.worker.output.splitlines()
                if "WARNING" in line and "50% or more of its grant" in line]
    assert len(warnings) == 1
    bills.stop()


def test_a_restarted_worker_bills_nothing_twice(billing, exporter):
    bills = billing(**{"grant.physics": 20})
    bills.start()
    exporter.serve({"physics": 100})
    bills.job()
    exporter.serve({"physics": 112.5})
    crossing = bills.job()
    assert any("grant" in e["message"] for e in crossing)
    assert len(wait_until(bills.read_bills, WAIT, "the bill")) == 1
    bills.stop()
    exporter.serve({"physics": 113.5})
    bills.start()
    for _ in range(2):  # billed from the baseline kept across the restart, once
        events = bills.job()
        assert not any("grant" in e["message"] for e in events)  # crossed before it
    assert [(b["from"], b["to"]) for b in bills.read_bills()] == [(100, 112.5), (112.5, 113.5)]
    bills.stop()


def test_a_worker_killed_after_publishing_a_bill_never_bills_it_again(billing, exporter):
    bills = billing()
    bills.start()
    exporter.serve({"physics": 100})
    bills.job()
    exporter.serve({"physics": 112.5})
    bills.amqp.publish(b"", exchange="", routing_key=QUEUE, message_id="killed")
    wait_until(bills.read_bills, WAIT, "the bill")
    bills.worker.signal(signal.SIGKILL)  # whether its outbox entry was forgotten or not
    bills.worker.wait(WAIT)
    bills.start()  # the job is redelivered if its ack was lost; the outbox re-sent
    bills.job()
    wait_until(lambda: bills.rabbit.list_queues(bills.vhost)[QUEUE] == (0, 0), WAIT,
               "every job acked")
    bills.read_bills()
    ids = {props.message_id for props, _bill in bills.bills}
    assert len(ids) == 1  # a re-sent bill carries the same id: consumers drop it
    assert {json.dumps(bill, sort_keys=True) for _props, bill in bills.bills} == {
        json.dumps(bills.bills[0][1], sort_keys=True)}
    bills.stop()


def test_bills_decided_before_a_crash_are_published_at_start_with_their_ids(
        billing, exporter):
    bills = billing()
    # What a worker killed between deciding a bill and publishing it leaves behind.
    store = BillStore(str(bills.state_file))
    ledger = Ledger(store, BillingSettings.from_mapping({}), clock=lambda: 5.0)
    ledger.bill([Sample("physics", "project_vcpu_usage", 100.0)])
    decided = ledger.bill([Sample("physics", "project_vcpu_usage", 101.0)]).bills[0]
    store.close()
    bills.start()
    published = wait_until(bills.read_bills, WAIT, "the pending bill")
    assert published == [{"group": "physics", "metric": "project_vcpu_usage", "from": 100,
                          "to": 101, "increase": 1, "credits": 1, "time": 5.0}]
    assert bills.bills[0][0].message_id == decided.id
    exporter.serve({"physics": 101})
    bills.job()
    assert len(bills.read_bills()) == 1
    bills.stop()


def test_bills_become_whole_credit_events_with_fractions_carried(billing, exporter):
    bills = billing(credit_queue=CREDITS)
    bills.start()
    for value in (0, 2.6, 3.1, 3.5):  # 2.60 -> 2 (0.60 left); 0.50 -> 1 (0.10); 0.40 -> 0
        exporter.serve({"physics": value})
        bills.job()
    assert [b["credits"] for b in bills.read_bills()] == [2.6, 0.5, 0.4]
    events = bills.credit_events()
    assert [(e.command, e.args.get("credits"), e.args.get("machine")) for e in events] == [
        ("alloc", 2, None), ("claim", None, "physics"),
        ("alloc", 1, None), ("claim", None, "physics")]
    assert events[0].args["slot"].startswith("usage:physics:project_vcpu_usage:")
    assert sum(Decimal(str(b["credits"])) for b in bills.read_bills()) == Decimal("3.5")
    bills.stop()


@pytest.mark.parametrize(("body", "reason"), [
    (b"project_vcpu_usage,project_name=a value=oops", "line protocol, line 1: bad field value"),
    (b'[{"group": "a"}]', "sample 0: 'metric' must be a non-empty string"),
    (b'{"exporter_url": "file:///etc/passwd"}', "exporter_url 'file:///etc/passwd' is not"),
])
def test_a_malformed_body_goes_to_the_dead_letters_with_the_reason(
        billing, exporter, rabbit, vhost, amqp, body, reason):
    bills = billing()
    bills.start()
    bills.job(body, status="Failed")
    wait_until(lambda: rabbit.list_queues(vhost)[f"{QUEUE}.dead"] == (1, 0), WAIT,
               "a dead letter")
    _method, props, dead = amqp.get(f"{QUEUE}.dead")
    assert dead == body
    assert reason in props.headers["x-rbit-dead-reason"]
    bills.stop()


def test_body_samples_are_billed_as_they_are(billing):
    bills = billing()
    bills.start()
    bills.job(b"project_vcpu_usage,project_name=chem value=10 1700000000000000000")
    bills.job(b'[{"group": "chem", "metric": "project_vcpu_usage", "value": 13.25, '
              b'"time": 1700000060}]')
    assert [(b["group"], b["credits"], b["time"]) for b in bills.read_bills()] == [
        ("chem", 3.25, 1700000060.0)]
    bills.stop()
