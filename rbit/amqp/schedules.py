"""The scheduler's AMQP session: state queues with a single active consumer.

A blocking session (its own connection and thread, apart from the worker's job I/O) in
confirm mode: it publishes fires (through :class:`~rbit.amqp.publisher.PublisherSession`)
and holds each schedule's state queue. Every pika error is translated here into
:class:`~rbit.errors.BrokerError`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pika
import pika.exceptions
from pika import spec

from rbit.amqp.publisher import PublisherSession
from rbit.errors import BrokerError

log = logging.getLogger(__name__)

#: ``(delivery_tag, body, headers)`` for each message the broker hands this (active)
#: consumer; ``headers`` is None when the message has none.
OnState = Callable[[int, bytes, "dict | None"], None]


class StateSession(PublisherSession):
    """One blocking connection for a worker's scheduler."""

    def declare_state(self, queue: str, queue_type: str) -> tuple[int, int]:
        """Declare a durable single-active-consumer queue; returns (ready, consumers).

        Raises:
            BrokerError: The broker refused (e.g. the queue exists with other arguments).
        """
        arguments = {"x-single-active-consumer": True, "x-queue-type": queue_type}
        frame = self._call(lambda: self._channel.queue_declare(
            queue, durable=True, arguments=arguments), queue)
        return frame.method.message_count, frame.method.consumer_count

    def ready(self, queue: str) -> int:
        """Messages of ``queue`` not delivered to any consumer (a passive declare)."""
        frame = self._call(lambda: self._channel.queue_declare(queue, passive=True), queue)
        return frame.method.message_count

    def consume(self, queue: str, on_state: OnState) -> None:
        """Consume ``queue``, unlimited prefetch (the queue holds a few messages)."""
        def deliver(_channel, method, props, body) -> None:
            on_state(method.delivery_tag, body, props.headers)

        self._call(lambda: self._channel.basic_qos(prefetch_count=0), queue)
        self._call(lambda: self._channel.basic_consume(queue, deliver), queue)

    def put_state(self, queue: str, body: bytes) -> None:
        """Publish a persistent message to ``queue`` and wait for the confirm."""
        props = spec.BasicProperties(delivery_mode=2, content_type="application/json")
        self._call(lambda: self._channel.basic_publish("", queue, body, props,
                                                       mandatory=True), queue)

    def ack(self, tag: int) -> None:
        self._call(lambda: self._channel.basic_ack(tag), "ack")

    def pump(self, seconds: float) -> None:
        """Serve the connection (heartbeats, deliveries) for up to ``seconds``."""
        self._call(lambda: self._connection.process_data_events(time_limit=seconds), "pump")

    def _call(self, call: Callable[[], object], what: str) -> object:
        try:
            return call()
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            raise BrokerError(f"state {what!r} refused: {exc}") from exc
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise BrokerError(f"schedule session ({what}): {exc!r}") from exc
