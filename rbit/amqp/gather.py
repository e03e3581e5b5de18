"""``rbit broadcast``'s AMQP session: one copy of a job to each worker, answers gathered.

Blocking, for the command line and :func:`rbit.broadcast.broadcast`. Like ``rbit ctl``
(:mod:`rbit.amqp.fleet`) it reads who was seen lately from ``rbit.fleet.seen``, and
takes the answers through RabbitMQ's direct reply-to: nothing is declared for them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import pika.exceptions
from pika import spec

from rbit.amqp.broadcast import BROADCAST_EXCHANGE
from rbit.amqp.fleet import FleetSession
from rbit.errors import BrokerError

_REPLY_TO = "amq.rabbitmq.reply-to"


class BroadcastSession(FleetSession):
    """A :class:`~rbit.amqp.fleet.FleetSession` that also publishes broadcasts.

    Raises:
        BrokerUnreachable: No host accepts a connection.
    """

    def broadcast(self, queue: str, body: bytes, *, message_id: str,
                  headers: Mapping[str, Any], content_type: str | None, timeout: float,
                  enough: Callable[[list[bytes]], bool]) -> list[bytes]:
        """Publish one broadcast for ``queue``; gather answers until ``timeout`` or ``enough``.

        The copy expires (per-message TTL) at the timeout: a worker that would only get
        to it later never runs it.

        Raises:
            BrokerError: The broker refused the publish or the session failed.
        """
        answers: list[bytes] = []
        correlation = uuid.uuid4().hex

        def on_answer(_channel, _method, props, answer: bytes) -> None:
            if props.correlation_id == correlation:
                answers.append(answer)

        try:
            channel = self._connection.channel()
            channel.exchange_declare(BROADCAST_EXCHANGE, "direct", durable=True)
            channel.basic_consume(_REPLY_TO, on_answer, auto_ack=True)
            props = spec.BasicProperties(
                reply_to=_REPLY_TO, correlation_id=correlation, message_id=message_id,
                headers=dict(headers), content_type=content_type, delivery_mode=1,
                timestamp=int(time.time()), expiration=str(max(1, int(timeout * 1000))))
            channel.basic_publish(BROADCAST_EXCHANGE, queue, body, props)
            deadline = time.monotonic() + timeout
            while not enough(answers):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._connection.process_data_events(time_limit=min(left, 0.1))
        except pika.exceptions.AMQPError as exc:
            raise BrokerError(f"cannot send the broadcast: {exc!r}") from exc
        return answers
