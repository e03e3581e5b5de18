"""What rbit declares on the broker, and how its queues are named.

For a runner section ``[runner:Q]`` rbit uses:

* ``Q`` -- the work queue, durable, bound to the ``pybit`` direct exchange with the
  runner's dotted route (``dist.arch.suite.format``).
* ``Q.dead`` -- the dead letters: jobs that failed for good, with the reason in headers.
* ``Q.held.<worker>.<instance>`` -- a worker's holding queue for long jobs (see
  :mod:`rbit.amqp.leases`): declared on first use, deleted by the broker an hour after the
  worker is gone.
* ``Q.retry.<ms>`` -- delay queues. A job to be retried after about ``ms`` milliseconds
  waits there with a per-message expiration; on expiry the broker dead-letters it back
  to ``Q`` through the default exchange. Each queue holds delays of one size (the
  jitter only spreads them a little), so an expired job never waits behind a much
  longer one at the head of the queue.

Classic work queues are declared without arguments, so a queue created earlier by a
PyBit front-end is accepted as it is. Quorum work queues carry ``x-queue-type``,
``x-delivery-limit`` and a dead-letter route to ``Q.dead`` so that a job that keeps
killing its worker ends in the dead letters instead of looping.

With ``queue_type = quorum`` every durable queue of a runner is a quorum queue: the work
queue, ``Q.dead`` and the delay queues. A classic queue lives on one node of a cluster;
while that node is down, declaring it fails on every other node, so a worker that
reconnected elsewhere could not even declare its topology. Delay queues dead-letter
back with ``x-dead-letter-strategy = at-least-once`` (which needs ``x-overflow =
reject-publish``): a job whose delay ends while the work queue elects a leader is kept
until the work queue takes it. ``quorum_group_size`` (``x-quorum-initial-group-size``)
is sent only when configured, so queues declared before it existed stay equivalent.
What stays classic, on the node the worker is connected to: the holding queues (per
worker, see above), PyBit's command queue (:mod:`rbit.pybit`) and the control queue
(:mod:`rbit.amqp.control`): they belong to one worker or connection, and the worker
declares them again through whichever node it reconnects to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from rbit import backoff
from rbit.config import RetryPolicy, RunnerSettings, Settings

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True)
class ExchangeDecl:
    name: str
    type: str = "direct"
    durable: bool = True


@dataclass(frozen=True)
class QueueDecl:
    name: str
    durable: bool = True
    arguments: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    bindings: tuple[tuple[str, str], ...] = ()  # (exchange, routing key)
    exclusive: bool = False  # this connection's only (a worker's command queue)
    auto_delete: bool = False


@dataclass(frozen=True)
class Topology:
    exchanges: tuple[ExchangeDecl, ...] = ()
    queues: tuple[QueueDecl, ...] = ()


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dead"


def quorum_arguments(group_size: int | None) -> dict[str, Any]:
    """``x-queue-type = quorum``, with the replication factor when one is configured."""
    arguments: dict[str, Any] = {"x-queue-type": "quorum"}
    if group_size is not None:
        arguments["x-quorum-initial-group-size"] = group_size
    return arguments


def delay_queue(queue: str, delay_ms: int, runner: RunnerSettings | None = None) -> QueueDecl:
    """The delay queue holding ``queue``'s jobs that wait about ``delay_ms``.

    Args:
        queue: The work queue the jobs go back to.
        delay_ms: The delay this queue holds.
        runner: The runner's settings: a quorum runner gets a quorum delay queue.
    """
    arguments: dict[str, Any] = {"x-dead-letter-exchange": "",
                                 "x-dead-letter-routing-key": queue}
    if runner is not None and runner.queue_type == "quorum":
        arguments.update(quorum_arguments(runner.quorum_group_size))
        arguments["x-dead-letter-strategy"] = "at-least-once"
        arguments["x-overflow"] = "reject-publish"
    return QueueDecl(f"{queue}.retry.{delay_ms}", arguments=MappingProxyType(arguments))


#: How long a held copy may wait in its holding queue before it goes back to the work
#: queue. Only copies nobody holds wait there: a worker takes its copy back at once.
HOLD_TTL_MS = 5_000
#: An idle holding queue (its worker gone) is deleted after this long.
HOLD_EXPIRES_MS = 3_600_000


def hold_queue(queue: str, holder: str) -> QueueDecl:
    """The queue where a worker parks copies of ``queue``'s long jobs it holds.

    ``holder`` names one worker process (name and instance id). A copy nobody holds
    (the worker died, or its connection dropped) expires after :data:`HOLD_TTL_MS` and
    is dead-lettered back to ``queue``; a copy held unacked never expires.
    """
    arguments = {
        "x-message-ttl": HOLD_TTL_MS,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        "x-expires": HOLD_EXPIRES_MS,
        "x-queue-type": "classic",
    }
    name = f"{queue}.held.{holder}"
    if len(name.encode("utf-8")) > 255:  # AMQP short string; keep the instance id
        name = f"{queue[:200]}.held.{holder[-40:]}"
    return QueueDecl(name, arguments=MappingProxyType(arguments))


def policy_delays_ms(policy: RetryPolicy) -> list[int]:
    """The base delay (before jitter) of each retry the policy allows, in ms."""
    # backoff.step: a long policy must not overflow a float (retry_backoff ** 1000).
    return [
        int(backoff.step(attempt, policy.retry_delay, policy.max_delay, policy.backoff) * 1000)
        for attempt in range(1, policy.max_retries + 1)
    ]


def work_queue_arguments(queue: str, queue_type: str, delivery_limit: int | None = None,
                         group_size: int | None = None) -> dict[str, Any]:
    """The arguments of work queue ``queue``: none for a classic one.

    Every declarer of a queue must give the same (the worker consuming it and, for the
    credit queue, ``rbit-credit`` publishing to it), or RabbitMQ refuses with 406.
    """
    if queue_type != "quorum":
        return {}
    arguments = {
        **quorum_arguments(group_size),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_queue(queue),
    }
    if delivery_limit is not None:
        arguments["x-delivery-limit"] = delivery_limit
    return arguments


def work_queue(runner: RunnerSettings, exchange: str) -> QueueDecl:
    arguments = work_queue_arguments(runner.queue, runner.queue_type, runner.delivery_limit,
                                     runner.quorum_group_size)
    return QueueDecl(
        runner.queue,
        arguments=MappingProxyType(arguments),
        bindings=((exchange, runner.routing_key),),
    )


def runner_queues(runner: RunnerSettings, exchange: str) -> list[QueueDecl]:
    """Work queue, dead letters and the policy's delay queues of one runner."""
    quorum = runner.queue_type == "quorum"
    dead_args = quorum_arguments(runner.quorum_group_size) if quorum else {}
    queues = [
        work_queue(runner, exchange),
        QueueDecl(dead_letter_queue(runner.queue), arguments=MappingProxyType(dead_args)),
    ]
    for delay_ms in sorted(set(policy_delays_ms(runner.retry))):
        queues.append(delay_queue(runner.queue, delay_ms, runner))
    return queues


def worker_topology(settings: Settings) -> Topology:
    """Everything the worker declares on every (re)connection."""
    exchange = settings.worker.exchange
    exchanges = [ExchangeDecl(exchange, "direct")]
    if "amqp" in settings.status.sinks:
        exchanges.append(ExchangeDecl(settings.status.exchange, "topic"))
    queues: list[QueueDecl] = []
    for runner in settings.runners:
        queues.extend(runner_queues(runner, exchange))
    return Topology(tuple(exchanges), tuple(queues))
