"""Publishing with publisher confirms.

Confirms are pipelined: a publish returns at once and its ``on_confirm`` callback
runs when the broker acks or nacks it, or with ``False`` when the connection is lost
first. A message published while disconnected waits for the next connection (or is
refused, when the broker is stopping). A queue a message names in ``declare`` is
declared before the first publish to it on each connection (delay and holding queues).

A copy of a delivery (retry, dead letter, held copy) is checked before it goes out
and trimmed if it cannot go out whole (:func:`rbit.amqp.frames.fit`): a frame the
broker refuses would close the connection, and every reconnect makes the acks of jobs
in flight stale. Any other message pika cannot encode is failed alone (its confirm
callback gets False); the connection stays.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pika import spec

from rbit.amqp.frames import fit
from rbit.amqp.leases import held_back
from rbit.amqp.records import ConfirmCallback, Delivery, Publish
from rbit.safetext import escape

if TYPE_CHECKING:
    from rbit.amqp.broker import Broker

log = logging.getLogger(__name__)


def confirm(on_confirm: ConfirmCallback | None, ok: bool) -> None:
    """Run a confirm callback; its errors are logged, never raised into the loop."""
    if on_confirm is not None:
        try:
            on_confirm(ok)
        except Exception:
            log.exception("error in a publish confirm callback")


class Publisher:
    """The publish channel's side of the broker (I/O thread only).

    Args:
        broker: The hub (the publish channel, readiness, the declarer, the acks).
    """

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        #: Publishes waiting for a connection; they outlive the one that ended.
        self.held: list[tuple[Publish, ConfirmCallback | None]] = []

    def reset(self) -> None:
        """A new connection: its publish sequence numbers start afresh."""
        self._unconfirmed: dict[int, ConfirmCallback | None] = {}
        self._seq = 0

    def connection_lost(self) -> None:
        """Every publish still waiting for its confirm failed."""
        for on_confirm in self._unconfirmed.values():
            confirm(on_confirm, False)

    def publish(self, message: Publish, on_confirm: ConfirmCallback | None) -> None:
        broker = self._broker
        channel = broker.publish_channel
        if channel is None or not channel.is_open or not broker.is_ready():
            if broker.stopping:
                confirm(on_confirm, False)
            else:
                self.held.append((message, on_confirm))
            return
        declarer = broker.declarer
        if message.declare is not None and not declarer.is_declared(message.declare.name):
            declarer.declare_queue(message.declare, lambda: self.publish(message, on_confirm))
            return
        props = dict(message.properties)
        props.update(
            headers=message.headers if message.headers is not None else props.get("headers"),
            delivery_mode=2 if message.persistent else 1,
        )
        if message.message_id is not None:
            props["message_id"] = message.message_id
        if message.content_type is not None:
            props["content_type"] = message.content_type
        if message.expiration_ms is not None:
            props["expiration"] = str(message.expiration_ms)
        try:
            if message.trimmed_headers is None:
                properties = spec.BasicProperties(**props)
            else:
                message, properties = fit(message, props, broker.connection.params.frame_max)
            channel.basic_publish(message.exchange, message.routing_key, message.body,
                                  properties)
        except Exception as exc:  # noqa: BLE001 -- pika refused this message, not the link
            log.error("cannot publish to exchange %r key %r: %s", message.exchange,
                      message.routing_key, escape(f"{type(exc).__name__}: {exc}"))
            confirm(on_confirm, False)
            return
        self._seq += 1
        self._unconfirmed[self._seq] = on_confirm

    def release_held(self) -> None:
        held, self.held = self.held, []
        for message, on_confirm in held:
            self.publish(message, on_confirm)

    def on_confirm(self, frame) -> None:
        method = frame.method
        ok = isinstance(method, spec.Basic.Ack)
        if method.multiple:
            # Sequence numbers grow with each publish and the dict keeps them in that
            # order: stop at the first one past the confirmed tag.
            unconfirmed = self._unconfirmed
            tags = []
            for tag in unconfirmed:
                if tag > method.delivery_tag:
                    break
                tags.append(tag)
            for tag in tags:
                confirm(unconfirmed.pop(tag), ok)
        else:
            confirm(self._unconfirmed.pop(method.delivery_tag, None), ok)

    def publish_then_ack(self, delivery: Delivery, publish: Publish,
                         on_done: ConfirmCallback | None) -> None:
        """Publish a message derived from a delivery; ack it once confirmed, else nack."""
        if held_back(delivery, lambda: self.publish_then_ack(delivery, publish, on_done)):
            return
        broker = self._broker
        if delivery.generation != broker.generation:
            return  # the broker redelivers the original; publishing a copy would duplicate

        def confirmed(ok: bool) -> None:
            if ok:
                broker.acks.ack(delivery)
            else:
                broker.acks.nack(delivery)
            if on_done is not None:
                on_done(ok)

        self.publish(publish, confirmed)
