"""A blocking publisher session for ``rbit submit``, ``rbit watch`` and :mod:`rbit.client`.

One connection, one channel in confirm mode: :meth:`PublisherSession.publish` returns once
the broker confirmed the job and raises :class:`~rbit.errors.Unroutable` when the
broker returned it (``mandatory``: no queue is bound to its route). A session can also
follow the status exchange through a private queue (:meth:`PublisherSession.watch`),
bound *before* the job is published so that no status can be missed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import pika
import pika.exceptions
from pika import spec

from rbit.amqp.admin import AdminSession
from rbit.errors import BrokerError, Unroutable

log = logging.getLogger(__name__)


class PublisherSession(AdminSession):
    """A blocking AMQP session that publishes jobs and follows statuses.

    Args:
        amqp: Where and how to connect (:class:`rbit.config.AmqpSettings`).
        name: Connection name shown in the RabbitMQ management UI.

    Raises:
        BrokerUnreachable: No host accepts a connection.
    """

    def __init__(self, amqp, name: str = "rbit publisher") -> None:
        super().__init__(amqp, name)
        self._watch_queue: str | None = None

    def publish_job(self, exchange: str, routing_key: str, body: bytes, *,
                    message_id: str, headers: Mapping[str, Any], timestamp: int,
                    content_type: str | None = None) -> None:
        """Publish one persistent job, mandatory, and wait for the confirm.

        Raises:
            Unroutable: The broker returned it: no queue would receive it.
            BrokerError: The broker nacked it or the connection failed.
        """
        props = spec.BasicProperties(delivery_mode=2, message_id=message_id,
                                     headers=dict(headers), timestamp=timestamp,
                                     content_type=content_type)
        try:
            self._channel.basic_publish(exchange, routing_key, body, props, mandatory=True)
        except pika.exceptions.UnroutableError as exc:
            raise Unroutable(f"no queue is bound to exchange {exchange or '(default)'!r} "
                             f"with routing key {routing_key!r}") from exc
        except pika.exceptions.NackError as exc:
            raise BrokerError(f"the broker refused the job: {exc}") from exc
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise BrokerError(f"publish to {routing_key!r} failed: {exc!r}") from exc

    def watch(self, exchange: str, binding: str = "#") -> None:
        """Bind a private, exclusive queue to the status ``exchange`` (topic).

        Raises:
            BrokerError: The exchange does not exist (no worker declared it yet) or the
                broker refused.
        """
        try:
            if self._watch_queue is None:
                frame = self._channel.queue_declare("", exclusive=True, auto_delete=True)
                self._watch_queue = frame.method.queue
            self._channel.queue_bind(self._watch_queue, exchange, binding)
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise BrokerError(f"cannot follow status exchange {exchange!r}: "
                              f"{exc.reply_text}") from exc
        except (pika.exceptions.AMQPError, OSError) as exc:
            raise BrokerError(f"cannot follow status exchange {exchange!r}: {exc!r}") from exc

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next status event (a JSON object), or None after ``timeout`` seconds.

        Events that are not JSON objects are skipped.
        """
        if self._watch_queue is None:
            raise BrokerError("watch() first")
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                for method, _props, body in self._channel.consume(
                        self._watch_queue, auto_ack=True, inactivity_timeout=min(left, 1.0)):
                    if method is None:
                        break
                    event = _event(body)
                    if event is not None:
                        return event
            except (pika.exceptions.AMQPError, OSError) as exc:
                raise BrokerError(f"following statuses failed: {exc!r}") from exc


def _event(body: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return event if isinstance(event, dict) else None
