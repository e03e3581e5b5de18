"""``rbit ctl``'s AMQP session: ask the fleet, gather the replies, read who was seen.

Blocking, for the command line only. A command is published to the control exchange
with ``reply_to = amq.rabbitmq.reply-to`` (RabbitMQ's direct reply-to: no reply queue
is declared; replies come straight back on this channel) and ``user_id`` set to the
user this session logged in as, which RabbitMQ checks; its ``message_id`` is the
correlation id, and it carries the operator's signature when ``rbit ctl`` has a key.
The announces kept in ``rbit.fleet.seen`` are read with ``basic_get`` and never acked:
closing their channel hands them back, so reading them removes nothing.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
from pika import spec

from rbit.amqp.admin import blocking_connection, close_quietly
from rbit.amqp.control import (
    CONTROL_EXCHANGE,
    FLEET_QUEUE,
    SEEN_MAX,
)
from rbit.config import AmqpSettings
from rbit.errors import BrokerError

log = logging.getLogger(__name__)

_REPLY_TO = "amq.rabbitmq.reply-to"
_NOT_FOUND = 404


class FleetSession:
    """One blocking connection to ask the workers of a vhost.

    Args:
        amqp: Where and how to connect; hosts are tried in order.

    Raises:
        BrokerUnreachable: No host accepts a connection.
    """

    def __init__(self, amqp: AmqpSettings, name: str = "rbit ctl") -> None:
        self._user = amqp.user
        self._connection = blocking_connection(amqp, name)

    def __enter__(self) -> FleetSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        close_quietly(self._connection, "the ctl session")

    def seen(self) -> list[bytes]:
        """The announces in ``rbit.fleet.seen``, oldest first (left in the queue)."""
        bodies: list[bytes] = []
        try:
            channel = self._connection.channel()
            # Passive: the workers declare it (classic or quorum, as their [rbit]
            # queue_type says); before any worker started, nobody was seen.
            try:
                channel.queue_declare(FLEET_QUEUE, passive=True)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code == _NOT_FOUND:
                    return bodies
                raise
            while len(bodies) < SEEN_MAX:
                method, _props, body = channel.basic_get(FLEET_QUEUE, auto_ack=False)
                if method is None:
                    break
                bodies.append(body)
            channel.close()  # hands every announce back, in its place
        except pika.exceptions.AMQPError as exc:
            raise BrokerError(f"cannot read {FLEET_QUEUE}: {exc!r}") from exc
        return bodies

    def ask(self, routing_key: str, body: bytes, timeout: float,
            enough: Callable[[list[bytes]], bool], *,
            sign: Callable[[str, str, bytes], dict[str, Any]] | None = None) -> list[bytes]:
        """Publish a command and gather replies until ``timeout`` or ``enough(replies)``.

        ``sign(routing_key, message_id, body)`` gives the command's signature headers
        (:mod:`rbit.control.authority`); each command gets a new message id.

        Raises:
            BrokerError: The broker refused the command or the session failed.
        """
        def properties(correlation: str) -> dict[str, Any]:
            headers = sign(routing_key, correlation, body) if sign is not None else None
            return {"user_id": self._user, "content_type": "application/json",
                    "message_id": correlation, "headers": headers}

        return self._request(CONTROL_EXCHANGE, routing_key, body, properties, timeout,
                             enough, "command")

    def _request(self, exchange: str, routing_key: str, body: bytes,
                 properties: Callable[[str], dict[str, Any]], timeout: float,
                 enough: Callable[[list[bytes]], bool], what: str) -> list[bytes]:
        """Publish ``body`` to ``exchange`` and gather the answers sent to its reply-to.

        ``properties(correlation_id)`` gives the message's other AMQP properties. Answers
        come through RabbitMQ's direct reply-to, those with another correlation id are
        dropped; gathering ends at ``timeout`` or once ``enough(answers)``.

        Raises:
            BrokerError: The broker refused the publish or the session failed (``what``
                names the message in the error).
        """
        answers: list[bytes] = []
        correlation = uuid.uuid4().hex

        def on_answer(_channel, _method, props, answer: bytes) -> None:
            if props.correlation_id == correlation:
                answers.append(answer)

        try:
            channel = self._connection.channel()
            channel.exchange_declare(exchange, "direct", durable=True)
            channel.basic_consume(_REPLY_TO, on_answer, auto_ack=True)
            props = spec.BasicProperties(reply_to=_REPLY_TO, correlation_id=correlation,
                                         delivery_mode=1, **properties(correlation))
            channel.basic_publish(exchange, routing_key, body, props)
            deadline = time.monotonic() + timeout
            while not enough(answers):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._connection.process_data_events(time_limit=min(left, 0.1))
        except pika.exceptions.AMQPError as exc:
            raise BrokerError(f"cannot send the {what}: {exc!r}") from exc
        return answers
