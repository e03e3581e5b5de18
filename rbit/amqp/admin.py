"""A short synchronous AMQP session for command-line verbs (``rbit dead-letters``).

Not for the worker: it blocks the calling thread on every call. Every pika error is
translated here: :class:`~rbit.errors.BrokerUnreachable` when no host answers,
:class:`~rbit.errors.QueueNotFound` for a queue that does not exist,
:class:`~rbit.errors.BrokerError` for anything else.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import pika
import pika.exceptions
from pika import spec

from rbit.amqp.connection import parameters
from rbit.amqp.frames import SafeFrames
from rbit.amqp.records import Delivery, Publish
from rbit.config import AmqpSettings
from rbit.errors import BrokerError, BrokerUnreachable, QueueNotFound
from rbit.message import Message

log = logging.getLogger(__name__)

_NOT_FOUND = 404


class _SafeConnection(SafeFrames, pika.SelectConnection):
    """The blocking session's connection: undecodable content headers substituted."""


@contextlib.contextmanager
def _translated(queue: str) -> Iterator[None]:
    try:
        yield
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == _NOT_FOUND:
            raise QueueNotFound(queue) from exc
        raise BrokerError(f"queue {queue!r}: {exc.reply_text}") from exc
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BrokerError(f"queue {queue!r}: {exc!r}") from exc


def blocking_connection(amqp: AmqpSettings, name: str) -> pika.BlockingConnection:
    """A blocking connection to the first host of ``amqp`` that accepts one.

    Its frames are read the safe way (:mod:`rbit.amqp.frames`): headers a publisher made
    undecodable cannot break a command-line session either.

    Raises:
        BrokerUnreachable: No host accepts a connection.
    """
    errors = []
    for index in range(len(amqp.hosts)):
        try:
            params = parameters(amqp, index, name, amqp.heartbeat)
            return pika.BlockingConnection(params, _impl_class=_SafeConnection)
        except (pika.exceptions.AMQPError, OSError) as exc:
            errors.append(f"{amqp.hosts[index].host}:{amqp.hosts[index].port}: {exc!r}")
    raise BrokerUnreachable("; ".join(errors))


def close_quietly(connection: pika.BlockingConnection, what: str) -> None:
    """Close ``connection``; an error then is logged at DEBUG (nothing is left to save)."""
    try:
        if connection.is_open:
            connection.close()
    except pika.exceptions.AMQPError as exc:
        log.debug("closing %s: %r", what, exc)


class AdminSession:
    """One blocking connection with one channel in confirm mode.

    Args:
        amqp: Where and how to connect; hosts are tried in order.
        name: Connection name shown in the RabbitMQ management UI.

    Raises:
        BrokerUnreachable: From the constructor, when no host accepts a connection.
    """

    def __init__(self, amqp: AmqpSettings, name: str = "rbit admin") -> None:
        self._connection = blocking_connection(amqp, name)
        try:
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
        except pika.exceptions.AMQPError as exc:
            self.close()
            raise BrokerError(f"cannot open a channel: {exc!r}") from exc

    def __enter__(self) -> AdminSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close; deliveries not acked go back to their queues."""
        close_quietly(self._connection, "the admin session")

    def count(self, queue: str) -> int:
        """Ready messages in an existing queue.

        Raises:
            QueueNotFound: There is no such queue.
            BrokerError: The broker refused otherwise.
        """
        with _translated(queue):
            return self._channel.queue_declare(queue, passive=True).method.message_count

    def depth(self, queue: str) -> tuple[int, int]:
        """(ready messages, consumers) of an existing queue, from a passive declare.

        The session stays usable after a queue that does not exist (the broker closes
        the channel then: a new one is opened), so a long-lived reader can ask again.

        Raises:
            QueueNotFound: There is no such queue.
            BrokerError: The broker refused otherwise.
        """
        try:
            with _translated(queue):
                method = self._channel.queue_declare(queue, passive=True).method
        except QueueNotFound:
            with _translated(queue):
                self._channel = self._connection.channel()
                self._channel.confirm_delivery()
            raise
        return method.message_count, method.consumer_count

    def get(self, queue: str) -> Delivery | None:
        """Take one message without acking it (None when the queue is empty).

        Raises:
            QueueNotFound: There is no such queue.
            BrokerError: The broker refused otherwise.
        """
        with _translated(queue):
            method, props, body = self._channel.basic_get(queue, auto_ack=False)
        if method is None:
            return None
        message = Message(body, queue, props.headers or {}, method.redelivered,
                          props.message_id, props.content_type)
        return Delivery(message, method.delivery_tag, 0, props)

    def ack(self, delivery: Delivery) -> None:
        """Ack a delivery taken with :meth:`get`."""
        with _translated(delivery.message.queue):
            self._channel.basic_ack(delivery.tag)

    def publish(self, message: Publish) -> None:
        """Publish and wait for the broker's confirm (BrokerError if refused)."""
        props = dict(message.properties)
        props.update(headers=message.headers, delivery_mode=2 if message.persistent else 1)
        if message.message_id is not None:
            props["message_id"] = message.message_id
        if message.content_type is not None:
            props["content_type"] = message.content_type
        try:
            self._channel.basic_publish(message.exchange, message.routing_key, message.body,
                                        spec.BasicProperties(**props), mandatory=True)
        except (pika.exceptions.UnroutableError, pika.exceptions.NackError) as exc:
            raise BrokerError(f"publish to {message.routing_key!r} refused: {exc}") from exc
        except pika.exceptions.AMQPError as exc:
            raise BrokerError(f"publish to {message.routing_key!r} failed: {exc!r}") from exc
        except Exception as exc:  # noqa: BLE001 -- headers pika cannot encode
            raise BrokerError(f"publish to {message.routing_key!r} failed: "
                              f"{type(exc).__name__}: {exc}") from exc

    def purge(self, queue: str) -> int:
        """Delete every ready message of a queue; returns how many.

        Raises:
            QueueNotFound: There is no such queue.
            BrokerError: The broker refused otherwise.
        """
        with _translated(queue):
            return self._channel.queue_purge(queue).method.message_count
