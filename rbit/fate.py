"""The one place that decides what happens to a delivery once its try has ended.

``decide`` turns an :class:`~rbit.outcome.Outcome` into a :class:`Settlement`: ack it,
republish it to a delay queue (then ack), or republish it to the dead letters (then
ack). The caller only carries the decision out; no other module chooses a fate.
:func:`refuse` is the fate of a delivery refused before any runner saw it.

Values read from the delivery are bounded first: the try number is clamped to the
policy (an attempts header of -500 is a first try, one of 10**9 a last), a delay a
runner asks for is clamped to ``[0.001, retry_max_delay]`` seconds and its delay queue
is the next step of 1, 2, 5, 10... ms, so a job never names a delay queue of its own. Every
copy carries, beside the original's headers, rbit's own as
:attr:`~rbit.amqp.records.Publish.trimmed_headers`: what is published instead when
the whole copy cannot be (see :mod:`rbit.amqp.confirms`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from rbit import backoff
from rbit.amqp.records import Delivery, Publish
from rbit.config import RetryPolicy, RunnerSettings
from rbit.message import ATTEMPTS_HEADER, LAST_ERROR_HEADER, UNDECODABLE_HEADER
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


#: The settlement of nearly every job: Done, acked.
ACK = Settlement(None, Status.DONE, "")


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
        if outcome.status is not None:
            return Settlement(None, outcome.status, outcome.reason)
        return Settlement(None, Status.DONE, outcome.reason) if outcome.reason else ACK
    if outcome.kind is Kind.REJECTED:
        return _dead(delivery, runner.queue, worker, outcome.reason or "rejected", now)
    attempt = min(delivery.message.attempt, runner.retry.max_retries + 1)
    verb = "blocked" if outcome.kind is Kind.BLOCKED else "failed"
    if attempt > runner.retry.max_retries:
        tries = f"{attempt} tr{'y' if attempt == 1 else 'ies'}"
        reason = f"{verb} after {tries}: {outcome.reason}"
        return _dead(delivery, runner.queue, worker, reason, now, attempt)
    if outcome.kind is Kind.BLOCKED and outcome.delay is not None:
        base_ms, wait_ms = blocked_delay(runner.retry, outcome.delay)
    else:
        base_ms, wait_ms = retry_delay(runner.retry, attempt, rng)
    own = {ATTEMPTS_HEADER: attempt, LAST_ERROR_HEADER: outcome.reason[-_MAX_REASON:]}
    target = delay_queue(runner.queue, base_ms, runner)
    publish = Publish("", target.name, delivery.message.body,
                      headers=_copy_headers(delivery, own), expiration_ms=wait_ms,
                      properties=delivery.properties, declare=target, trimmed_headers=own)
    status = Status.BLOCKED if outcome.kind is Kind.BLOCKED else Status.WAITING
    note = (f"try {attempt} of {runner.retry.max_retries + 1} {verb}: {outcome.reason}; "
            f"next try in {wait_ms / 1000:.1f} s")
    return Settlement(publish, status, note)


def blocked_delay(policy: RetryPolicy, delay: float) -> tuple[int, int]:
    """The delay queue's delay and the wait of a job Blocked for ``delay`` s, in ms.

    The wait is clamped to [1 ms, the policy's ``retry_max_delay``]; the queue's delay
    is the next step of 1, 2, 5, 10, 20, 50... ms at or above it (at most the cap), so
    however many different delays runners ask for, a queue has at most three delay
    queues per decade, and a job waits at most 2.5 times as long as it asked.
    """
    cap_ms = max(1, int(policy.max_delay * 1000))
    try:
        wait_ms = min(max(1, int(delay * 1000)), cap_ms)
    except (OverflowError, ValueError, TypeError):  # inf, nan, not a number
        wait_ms = cap_ms
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= wait_ms:
                return min(step * factor, cap_ms), wait_ms
        step *= 10


def refuse(delivery: Delivery, queue: str, reason: str, *, worker: str,
           now: Callable[[], float] = time.time) -> Settlement:
    """The fate of a delivery refused before any runner saw it: the dead letters."""
    return _dead(delivery, queue, worker, reason, now)


def _copy_headers(delivery: Delivery, own: dict[str, object]) -> dict[str, object]:
    headers = dict(delivery.message.headers)
    headers.pop(UNDECODABLE_HEADER, None)  # the reason is in rbit's own headers now
    headers.update(own)
    return headers


def _dead(delivery: Delivery, queue: str, worker: str, reason: str,
          now: Callable[[], float], attempt: int | None = None) -> Settlement:
    own = {
        DEAD_REASON_HEADER: reason[-_MAX_REASON:],
        ATTEMPTS_HEADER: delivery.message.attempt if attempt is None else attempt,
        DEAD_WORKER_HEADER: worker,
        DEAD_TIME_HEADER: datetime.fromtimestamp(now(), UTC).isoformat(),
        DEAD_QUEUE_HEADER: queue,
    }
    publish = Publish("", dead_letter_queue(queue), delivery.message.body,
                      headers=_copy_headers(delivery, own), properties=delivery.properties,
                      trimmed_headers=own)
    return Settlement(publish, Status.FAILED, reason)
