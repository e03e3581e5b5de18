"""Consumers: a ``basic_consume`` per queue, and the callback each delivery goes to.

The callback is the head of the job path: it builds the
:class:`~rbit.message.Message` and the :class:`~rbit.amqp.records.Delivery` and hands
them to the queue's job pool on the I/O thread, with what it needs bound once per
connection rather than looked up per delivery.

A delivery whose headers the boundary could not decode (they were replaced by
:data:`~rbit.message.UNDECODABLE_HEADER`, see :mod:`rbit.amqp.frames`) never reaches
a pool: it goes to the queue's dead letters at once, body kept, with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

from rbit import fate
from rbit.amqp.records import HELD_BY_HEADER, ConsumerSpec, Delivery
from rbit.message import UNDECODABLE_HEADER, Message
from rbit.safetext import escape

if TYPE_CHECKING:
    from rbit.amqp.broker import Broker

log = logging.getLogger(__name__)


class Consumers:
    """The queues a broker takes deliveries from (I/O thread, but :meth:`set`).

    Args:
        broker: The hub (consume channel, generation, live deliveries, acks).
        consumers: The queues and their job pools.
    """

    def __init__(self, broker: Broker, consumers: Sequence[ConsumerSpec]) -> None:
        self._broker = broker
        #: Queues not to consume (kept across connections: a pause outlives one).
        self.paused: set[str] = set()
        self._cancelled = False  # stop_consuming: no resume brings a consumer back
        self.set(consumers)
        #: queue -> deliveries sent to the dead letters undecoded (read by the metrics).
        self.refused: dict[str, int] = {}

    def set(self, consumers: Sequence[ConsumerSpec]) -> None:
        self._specs = {c.queue: c for c in consumers}

    def specs(self) -> Collection[ConsumerSpec]:
        return self._specs.values()

    def queues(self) -> Collection[str]:
        return self._specs.keys()

    def reset(self) -> None:
        self._tags: dict[str, str] = {}

    def start(self, pending: list[ConsumerSpec]) -> None:
        """Consume each queue in turn, each with its own prefetch window."""
        broker = self._broker
        if not pending or broker.stopping:
            return
        consumer = pending[0]
        channel = broker.consume_channel
        if consumer.queue in self.paused:
            self.start(pending[1:])
            return

        def consume(_frame) -> None:
            # basic_qos without global applies to consumers created after it on this
            # channel, so each queue gets its own prefetch window.
            if consumer.queue not in self.paused and consumer.queue not in self._tags:
                self._tags[consumer.queue] = channel.basic_consume(
                    consumer.queue, self.on_message(consumer))
            self.start(pending[1:])

        channel.basic_qos(prefetch_count=consumer.prefetch, callback=consume)

    def pause(self, queue: str) -> None:
        """Cancel the queue's consumer and keep it cancelled (I/O thread)."""
        self.paused.add(queue)
        self._broker.poller.skip(queue)
        tag = self._tags.pop(queue, None)
        channel = self._broker.consume_channel
        if tag is not None and channel is not None and channel.is_open:
            channel.basic_cancel(tag)

    def resume(self, queue: str) -> None:
        """Consume the queue again, if connected (I/O thread)."""
        self.paused.discard(queue)
        broker = self._broker
        spec = self._specs.get(queue)
        channel = broker.consume_channel
        if (spec is None or self._cancelled or broker.mode != "consume" or channel is None
                or not channel.is_open or not broker.is_ready() or queue in self._tags):
            return
        self.start([spec])

    def active(self) -> frozenset[str]:
        """The queues taking jobs now (any thread: a snapshot)."""
        if self._broker.mode == "poll":
            return frozenset(self._specs.keys() - self.paused) if not self._cancelled \
                else frozenset()
        return frozenset(list(self._tags))

    def on_message(self, consumer: ConsumerSpec) -> Callable[..., None]:
        """The delivery callback of one queue on the current connection."""
        broker = self._broker
        generation = broker.generation
        allowed = consumer.allowed_classes
        queue = consumer.queue
        deliver = consumer.on_delivery
        outstanding = broker.acks.outstanding
        live = broker.live
        clock = broker.clock

        def on_message(_channel, method, props, body) -> None:
            headers = props.headers or {}
            # A copy that comes back from a holding queue was being run by a worker
            # that died or lost its connection: as good as redelivered.
            redelivered = method.redelivered or HELD_BY_HEADER in headers
            message = Message(body, queue, headers, redelivered,
                              props.message_id, props.content_type, allowed)
            outstanding.append(method.delivery_tag)
            delivery = Delivery(message, method.delivery_tag, generation, props,
                                received=clock())
            live[id(delivery)] = delivery
            if UNDECODABLE_HEADER in headers:
                self._refuse(delivery, headers[UNDECODABLE_HEADER])
            else:
                deliver(delivery)

        return on_message

    def _refuse(self, delivery: Delivery, reason: object) -> None:
        broker = self._broker
        queue = delivery.message.queue
        self.refused[queue] = self.refused.get(queue, 0) + 1
        # A publisher may set the header itself: its text is theirs, so escaped.
        settlement = fate.refuse(delivery, delivery.message.queue, escape(reason, 300),
                                 worker=broker.worker_name)
        log.warning("job %s: %s; sent to the dead letters", delivery.message.job_id,
                    settlement.note)
        broker.publisher.publish_then_ack(delivery, settlement.publish, None)

    def cancel(self) -> None:
        """No new deliveries; the unacked ones stay ours to settle."""
        broker = self._broker
        self._cancelled = True
        if broker.mode == "poll":
            broker.poller.end_pass()
        channel = broker.consume_channel
        if channel is None or not channel.is_open:
            return
        for tag in self._tags.values():
            channel.basic_cancel(tag)
        self._tags.clear()

    def on_cancelled(self, _frame) -> None:
        log.warning("the broker cancelled a consumer (queue deleted?); reconnecting")
        self._broker.connector.close()
