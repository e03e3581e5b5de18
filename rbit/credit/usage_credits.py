"""The credit events a Done job earns from its usage: ALLOC, COUNTERS and CLAIM.

A priced runner section (:mod:`rbit.credit.pricing`) turns each Done job's
:class:`~rbit.usage.Usage` into three credit events for the credit runner, published
to the section's ``credit_queue`` before the job's delivery is acked:

``ALLOC``
    ``slot`` = the job id, with ``min`` / ``max`` when ``credits_min`` /
    ``credits_max`` are set.
``COUNTERS``
    the raw usage: ``usage/cpu_ms``, ``usage/wall_ms`` and (when metered)
    ``usage/max_rss_kib``.
``CLAIM``
    ``slot`` = the job id, ``machine`` = ``[rbit] machine_id``, ``credits`` = the
    whole credits: cpu hours x ``credits_per_cpu_hour`` + wall hours x
    ``credits_per_wall_hour`` + peak GiB x wall hours x ``credits_per_gib_hour``,
    rounded half up, then raised to ``credits_min`` and cut to ``credits_max``.

Each event's id is derived from the queue, the job id and the command (see
:func:`event_id`), never drawn at random: a job that runs again -- redelivered after
a worker died between the confirms and the ack, or a try that is repeated for any
other reason -- publishes the same ids, and the credit runner, which counts an id
once (:mod:`rbitext.seen`), counts the job once.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable
from types import MappingProxyType
from typing import TYPE_CHECKING

from rbit.amqp.records import Delivery, Publish
from rbit.credit.events import CreditEvent
from rbit.credit.pricing import Pricing
from rbit.topology import QueueDecl, work_queue_arguments
from rbit.usage import Usage

if TYPE_CHECKING:
    from rbit.amqp.broker import Broker
    from rbit.config import RunnerSettings

log = logging.getLogger(__name__)

#: A fault-injection point for tests, never for production: a worker started with
#: this variable set to ``1`` kills itself with SIGKILL as soon as a job's credit events
#: are confirmed, before the job's delivery is acked (see :func:`credits_confirmed`).
FAULT_KILL_BEFORE_ACK_ENV = "RBIT_FAULT_KILL_AFTER_CREDITS"
# Read once, at import: the job path only tests a module global.
_kill_before_ack = os.environ.get(FAULT_KILL_BEFORE_ACK_ENV) == "1"

_KIB_PER_GIB = 1024 * 1024
_SECONDS_PER_HOUR = 3600.0


def event_id(queue: str, job_id: str, command: str) -> str:
    """The id of a usage credit event: 32 hex digits of sha256 of queue, job, command."""
    import hashlib  # only for priced runners: loading it costs every worker's start ~4 ms
    text = f"usage:{queue}\x00{job_id}\x00{command}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def credits_for(usage: Usage, pricing: Pricing) -> int:
    """Whole credits ``usage`` earns: rounded half up, then bounded by min and max."""
    wall_hours = usage.wall_s / _SECONDS_PER_HOUR
    gib = (usage.max_rss_kib or 0) / _KIB_PER_GIB
    raw = (usage.cpu_s / _SECONDS_PER_HOUR * pricing.per_cpu_hour
           + wall_hours * pricing.per_wall_hour + gib * wall_hours * pricing.per_gib_hour)
    credits = math.floor(raw + 0.5)
    if pricing.minimum is not None:
        credits = max(credits, pricing.minimum)
    if pricing.maximum is not None:
        credits = min(credits, pricing.maximum)
    return max(0, credits)


def usage_events(queue: str, job_id: str, usage: Usage, pricing: Pricing,
                 now: Callable[[], float] = time.time) -> list[CreditEvent]:
    """ALLOC, COUNTERS and CLAIM for one Done job, in that order."""
    when = now()
    alloc: dict[str, object] = {"slot": job_id}
    if pricing.minimum is not None:
        alloc["min"] = pricing.minimum
    if pricing.maximum is not None:
        alloc["max"] = pricing.maximum
    counters: dict[str, object] = {"slot": job_id,
                                   "usage/cpu_ms": round(usage.cpu_s * 1000),
                                   "usage/wall_ms": round(usage.wall_s * 1000)}
    if usage.max_rss_kib is not None:
        counters["usage/max_rss_kib"] = usage.max_rss_kib
    claim = {"slot": job_id, "machine": pricing.machine_id,
             "credits": credits_for(usage, pricing)}
    return [CreditEvent(command, args, event_id(queue, job_id, command), when)
            for command, args in (("alloc", alloc), ("counters", counters), ("claim", claim))]


def usage_publishes(queue: str, job_id: str, usage: Usage, pricing: Pricing) -> list[Publish]:
    """The credit events of one Done job as persistent, mandatory publishes."""
    # Declared only if it does not exist yet, as the fleet's work queues are.
    arguments = work_queue_arguments(pricing.credit_queue, pricing.queue_type, None,
                                     pricing.group_size)
    target = QueueDecl(pricing.credit_queue, arguments=MappingProxyType(arguments))
    return [Publish("", pricing.credit_queue, event.to_json(), message_id=event.id,
                    content_type="application/json", declare=target, mandatory=True)
            for event in usage_events(queue, job_id, usage, pricing)]


def ack_after_credits(broker: Broker, runner: RunnerSettings, delivery: Delivery,
                      usage: Usage) -> None:
    """Publish a Done job's credit events; ack the job once all are confirmed.

    A publish that fails (nacked, returned, connection lost) sends the job back to its
    queue instead: its next run publishes the same event ids, counted once.

    Args:
        broker: Publishes the events and settles the delivery.
        runner: The job's section (its queue and its ``pricing``).
        delivery: The Done job.
        usage: What it used.
    """
    job_id = delivery.message.job_id
    publishes = usage_publishes(runner.queue, job_id, usage, runner.pricing)
    left = len(publishes)
    failed = False

    def confirmed(ok: bool) -> None:  # on the I/O thread, like every confirm
        nonlocal left, failed
        left -= 1
        failed = failed or not ok
        if left:
            return
        if failed:
            log.warning("job %s: its credit events were not confirmed; the job goes back "
                        "to its queue", job_id)
            broker.requeue(delivery)
            return
        credits_confirmed()  # a fault-injection point for tests; nothing otherwise
        broker.ack(delivery)

    broker.send_many([(publish, confirmed) for publish in publishes])


def credits_confirmed() -> None:
    """Called once a job's credit events are confirmed, just before its ack.

    A no-op, unless the fault-injection variable :data:`FAULT_KILL_BEFORE_ACK_ENV`
    was set when the worker started: then the worker dies here, as a crash would.
    """
    if _kill_before_ack:
        os.kill(os.getpid(), signal.SIGKILL)
