"""The one place that decides what happens to a delivery once its try has ended.

``decide`` turns an :class:`~rbit.outcome.Outcome` into a :class:`Settlement`: ack it,
republish it to a delay queue (then ack), or republish it to the dead letters (then
ack). The caller only carries the decision out; no other module chooses a fate.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from rbit import backoff
from rbit.amqp.records import Delivery, Publish
from rbit.config import RetryPolicy, RunnerSettings
from rbit.message import ATTEMPTS_HEADER, LAST_ERROR_HEADER
from rbit.outcome import Kind, Outcome, Status
from rbit.topology import dead_letter_queue, delay_queue

#: Headers set on a dead-lettered job.
DEAD_REASON_HEADER = "x-rbit-dead-reason"
DEAD_WORKER_HEADER = "x-rbit-dead-worker"
DEAD_TIME_HEADER = "x-rbit-dead-time"
DEAD_QUEUE_HEADER = "x-rbit-dead-queue"
_MAX_REASON = 2000


@dataclass(frozen=True)
class Settlement:
    """What to do with a delivery, and the status that tells the world.

    Attributes:
        publish: ``None`` to ack; else publish this first and ack once confirmed.
        status: The status to report (``None``: nothing more to say).
        note: The status message.
    """

    publish: Publish | None
    status: Status | None
    note: str


_ACK = Settlement(None, Status.DONE, "")


def retry_delay(policy: RetryPolicy, attempt: int, rng: Callable[[], float]) -> tuple[int, int]:
    """The base delay of retry number ``attempt`` and the jittered one, in ms."""
    base = backoff.step(attempt, policy.retry_delay, policy.max_delay, policy.backoff)
    base_ms = int(base * 1000)
    spread = (1 - policy.jitter, 1 + policy.jitter)
    return base_ms, max(1, int(backoff.jittered(base_ms, spread, rng)))


def decide(
    outcome: Outcome,
    delivery: Delivery,
    runner: RunnerSettings,
    *,
    worker: str,
    now: Callable[[], float] = time.time,
    rng: Callable[[], float] = random.random,
) -> Settlement:
    """Decide the fate of a delivery whose try ended with ``outcome``."""
    if outcome.kind is Kind.DONE:
        return Settlement(None, Status.DONE, outcome.reason) if outcome.reason else _ACK
    if outcome.kind is Kind.REJECTED:
        return _dead(delivery, runner, worker, outcome.reason or "rejected", now)
    attempt = delivery.message.attempt
    verb = "blocked" if outcome.kind is Kind.BLOCKED else "failed"
    if attempt > runner.retry.max_retries:
        tries = f"{attempt} tr{'y' if attempt == 1 else 'ies'}"
        return _dead(delivery, runner, worker, f"{verb} after {tries}: {outcome.reason}", now)
    if outcome.kind is Kind.BLOCKED and outcome.delay is not None:
        base_ms = wait_ms = max(1, int(outcome.delay * 1000))
    else:
        base_ms, wait_ms = retry_delay(runner.retry, attempt, rng)
    headers = dict(delivery.message.headers)
    headers[ATTEMPTS_HEADER] = attempt
    headers[LAST_ERROR_HEADER] = outcome.reason[-_MAX_REASON:]
    target = delay_queue(runner.queue, base_ms)
    publish = Publish("", target.name, delivery.message.body, headers=headers,
                      expiration_ms=wait_ms, properties=delivery.properties, declare=target)
    status = Status.BLOCKED if outcome.kind is Kind.BLOCKED else Status.WAITING
    note = (f"try {attempt} of {runner.retry.max_retries + 1} {verb}: {outcome.reason}; "
            f"next try in {wait_ms / 1000:.1f} s")
    return Settlement(publish, status, note)


def _dead(delivery: Delivery, runner: RunnerSettings, worker: str, reason: str,
          now: Callable[[], float]) -> Settlement:
    headers = dict(delivery.message.headers)
    headers.update({
        DEAD_REASON_HEADER: reason[-_MAX_REASON:],
        ATTEMPTS_HEADER: delivery.message.attempt,
        DEAD_WORKER_HEADER: worker,
        DEAD_TIME_HEADER: datetime.fromtimestamp(now(), timezone.utc).isoformat(),
        DEAD_QUEUE_HEADER: runner.queue,
    })
    publish = Publish("", dead_letter_queue(runner.queue), delivery.message.body,
                      headers=headers, properties=delivery.properties)
    return Settlement(publish, Status.FAILED, reason)
