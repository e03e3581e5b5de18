"""Retries: bounded, backed off with jitter and a cap, and held by the broker."""

from __future__ import annotations

import pytest
from fault_helpers import (
    QUEUE,
    Publisher,
    Records,
    WorkerProcess,
    all_empty,
    amqp_keys,
    queue_totals,
    wait_until,
    write_config,
)

from rbit.amqp.records import Delivery
from rbit.config import RetryPolicy, RunnerSettings
from rbit.fate import DEAD_REASON_HEADER, decide, retry_delay
from rbit.message import ATTEMPTS_HEADER, LAST_ERROR_HEADER, Message
from rbit.outcome import Outcome, Status
from rbit.topology import policy_delays_ms


def _runner(**retry) -> RunnerSettings:
    return RunnerSettings(queue="q", runner="python!m:f", kind="python", target="m:f",
                          routing_key="q", retry=RetryPolicy(**retry))


def _delivery(attempts_so_far: int = 0, headers: dict | None = None) -> Delivery:
    headers = dict(headers or {})
    if attempts_so_far:
        headers[ATTEMPTS_HEADER] = attempts_so_far
    message = Message(b'{"x": 1}', "q", headers, False, "job-1", "application/json")
    return Delivery(message, 1, 1, {"message_id": "job-1", "content_type": "application/json"})


# ------------------------------------------------------------------ retry_delay


def test_delay_grows_by_the_backoff_factor_and_stops_at_the_cap():
    policy = RetryPolicy(retry_delay=10, backoff=3, max_delay=100, jitter=0)
    bases = [retry_delay(policy, attempt, lambda: 0.5)[0] for attempt in range(1, 6)]
    assert bases == [10_000, 30_000, 90_000, 100_000, 100_000]


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 9_000), (0.5, 10_000), (1.0, 11_000)])
def test_jitter_spreads_the_delay_by_the_configured_fraction(draw, expected):
    policy = RetryPolicy(retry_delay=10, jitter=0.1)
    assert retry_delay(policy, 1, lambda: draw) == (10_000, expected)


def test_delay_queues_are_named_after_the_unjittered_delays():
    policy = RetryPolicy(max_retries=4, retry_delay=1, backoff=2, max_delay=5)
    assert policy_delays_ms(policy) == [1_000, 2_000, 4_000, 5_000]


# ----------------------------------------------------------------------- decide


def test_failed_try_is_republished_to_its_delay_queue_with_attempts_and_error():
    runner = _runner(max_retries=3, retry_delay=2, backoff=2, jitter=0.5)
    settlement = decide(Outcome.failed("boom"), _delivery(attempts_so_far=1), runner,
                        worker="w", rng=lambda: 1.0)
    publish = settlement.publish
    assert publish.routing_key == "q.retry.4000"  # second try's base delay: 2 * 2
    assert publish.expiration_ms == 6000  # +50% jitter
    assert publish.headers[ATTEMPTS_HEADER] == 2
    assert publish.headers[LAST_ERROR_HEADER] == "boom"
    assert publish.declare.arguments["x-dead-letter-routing-key"] == "q"
    assert publish.properties["message_id"] == "job-1"
    assert settlement.status is Status.WAITING


def test_last_try_goes_to_the_dead_letters_with_reason_and_count():
    runner = _runner(max_retries=2)
    settlement = decide(Outcome.failed("boom"), _delivery(attempts_so_far=2), runner,
                        worker="w1", now=lambda: 0.0)
    headers = settlement.publish.headers
    assert settlement.publish.routing_key == "q.dead"
    assert headers[DEAD_REASON_HEADER] == "failed after 3 tries: boom"
    assert headers[ATTEMPTS_HEADER] == 3
    assert headers["x-rbit-dead-worker"] == "w1"
    assert headers["x-rbit-dead-time"] == "1970-01-01T00:00:00+00:00"
    assert settlement.status is Status.FAILED


def test_zero_retries_sends_the_first_failure_to_the_dead_letters():
    settlement = decide(Outcome.failed("boom"), _delivery(), _runner(max_retries=0), worker="w")
    assert settlement.publish.routing_key == "q.dead"


def test_rejected_job_is_dead_at_once_whatever_the_policy():
    settlement = decide(Outcome.rejected("undecodable body: garbage"), _delivery(),
                        _runner(max_retries=5), worker="w")
    assert settlement.publish.routing_key == "q.dead"
    assert settlement.publish.headers[DEAD_REASON_HEADER] == "undecodable body: garbage"


def test_blocked_with_its_own_delay_waits_that_long():
    settlement = decide(Outcome.blocked("disk full", 12.5), _delivery(), _runner(), worker="w")
    # Its delay queue is the next 1-2-5 step in ms: runners cannot multiply queues.
    assert settlement.publish.routing_key == "q.retry.20000"
    assert settlement.publish.expiration_ms == 12_500
    assert settlement.status is Status.BLOCKED


def test_done_is_acked_without_publishing():
    settlement = decide(Outcome.done(), _delivery(), _runner(), worker="w")
    assert settlement.publish is None
    assert settlement.status is Status.DONE


def test_message_exposes_attempt_and_last_error():
    message = Message(b"", "q", {ATTEMPTS_HEADER: 2, LAST_ERROR_HEADER: b"boom"})
    assert message.attempt == 3
    assert message.last_error == "boom"
    assert Message(b"", "q").attempt == 1


# ------------------------------------------------------------------- the broker


@pytest.mark.fault
def test_retry_waits_in_the_delay_queue_not_in_the_worker(tmp_path, rabbit, vhost):
    config = write_config(tmp_path / "worker.ini", amqp_keys(rabbit, vhost), {
        "runner": "python!fault_runners:fail_first", "record": tmp_path / "record",
        "retry_delay": 4, "retry_jitter": 0.1})
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    publisher = Publisher(rabbit.url(vhost))
    records = Records(tmp_path / "record")
    try:
        wait_until(lambda: QUEUE in rabbit.list_queues(vhost), 30, "the worker's queue")
        publisher.jobs(["job-1"])
        wait_until(lambda: records.events("failed"), 15, "the first try")
        waiting = wait_until(
            lambda: queue_totals(rabbit, vhost).get(f"{QUEUE}.retry.4000") == (1, 0),
            3, "the job in the delay queue")
        assert waiting
        assert queue_totals(rabbit, vhost)[QUEUE] == (0, 0)  # nothing unacked in the worker
        wait_until(lambda: records.count(), 15, "the second try")
        wait_until(lambda: all_empty(rabbit, vhost), 15, "empty queues")
    finally:
        worker.stop()
        publisher.close()
    (done,) = records.events("done")
    assert done[2] == "2"  # message.attempt
    assert done[4] == "RuntimeError: first try always fails"  # message.last_error
