"""Publishing with publisher confirms.

Confirms are pipelined: a publish returns at once and its ``on_confirm`` callback
runs when the broker acks or nacks it, or with ``False`` when the connection is lost
first. A message published while disconnected waits for the next connection (or is
refused, when the broker is stopping or the message asks to ``fail_fast``). A queue a
message names in ``declare`` is declared before the first publish to it on each
connection (delay and holding queues).

A ``mandatory`` message that no queue takes comes back as a ``basic.return``, which
RabbitMQ sends before that message's ``basic.ack``: the ack then means "handled", not
"stored", so the publish fails with :data:`~rbit.amqp.records.RETURNED`.

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
from rbit.amqp.records import (
    NOT_CONFIRMED,
    NOT_SENT,
    RETURNED,
    ConfirmCallback,
    Delivery,
    Publish,
)
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


def fail(message: Publish, on_confirm: ConfirmCallback | None, reason: str) -> None:
    """A publish failed: tell ``message.on_failure`` why, or ``on_confirm`` False."""
    if message.on_failure is None:
        confirm(on_confirm, False)
        return
    try:
        message.on_failure(reason)
    except Exception:
        log.exception("error in a publish failure callback")


class _Tracked:
    """The confirm callback of a publish that is mandatory or wants a failure reason."""

    __slots__ = ("publisher", "message", "on_confirm", "returned")

    def __init__(self, publisher: Publisher, message: Publish,
                 on_confirm: ConfirmCallback | None) -> None:
        self.publisher, self.message, self.on_confirm = publisher, message, on_confirm
        self.returned = False

    def __call__(self, ok: bool) -> None:
        if self.message.mandatory:
            self.publisher.untrack(self)
        if ok and not self.returned:
            confirm(self.on_confirm, True)
        else:
            fail(self.message, self.on_confirm, RETURNED if self.returned else NOT_CONFIRMED)


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
        #: message_id -> mandatory publishes awaiting their confirm (for basic.return).
        self._returnable: dict[str, list[_Tracked]] = {}

    def connection_lost(self) -> None:
        """Every publish still waiting for its confirm failed."""
        for on_confirm in self._unconfirmed.values():
            confirm(on_confirm, False)

    def publish(self, message: Publish, on_confirm: ConfirmCallback | None) -> None:
        broker = self._broker
        channel = broker.publish_channel
        if channel is None or not channel.is_open or not broker.is_ready():
            if broker.stopping or message.fail_fast:
                fail(message, on_confirm, NOT_SENT)
            else:
                self.held.append((message, on_confirm))
            return
        if message.fail_fast and broker.blocked:
            # A resource alarm: the broker would leave it unread in the socket for as
            # long as the alarm lasts.
            fail(message, on_confirm, NOT_SENT)
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
                                  properties, mandatory=message.mandatory)
        except Exception as exc:  # noqa: BLE001 -- pika refused this message, not the link
            log.error("cannot publish to exchange %r key %r: %s", message.exchange,
                      message.routing_key, escape(f"{type(exc).__name__}: {exc}"))
            fail(message, on_confirm, NOT_SENT)
            return
        self._seq += 1
        if message.mandatory or message.on_failure is not None:
            on_confirm = self._track(message, on_confirm)
        self._unconfirmed[self._seq] = on_confirm

    def _track(self, message: Publish, on_confirm: ConfirmCallback | None) -> _Tracked:
        tracked = _Tracked(self, message, on_confirm)
        if message.mandatory:
            self._returnable.setdefault(message.message_id, []).append(tracked)
        return tracked

    def untrack(self, tracked: _Tracked) -> None:
        """``tracked`` got its confirm (or its connection ended): no return can follow."""
        waiting = self._returnable.get(tracked.message.message_id)
        if waiting is not None:
            if tracked in waiting:
                waiting.remove(tracked)
            if not waiting:
                del self._returnable[tracked.message.message_id]

    def on_return(self, _channel, method, properties, _body) -> None:
        """A mandatory message came back unrouted (its confirm follows)."""
        message_id = getattr(properties, "message_id", None)
        waiting = self._returnable.get(message_id, ())
        tracked = next((item for item in waiting if not item.returned), None)
        if tracked is None:
            log.warning("a returned message (id %r) matches no publish", message_id)
            return
        tracked.returned = True
        log.warning("message %s returned by the broker: %s (exchange %r, key %r)",
                    message_id, method.reply_text, method.exchange, method.routing_key)
        if tracked.message.declare is not None:
            # The queue was deleted behind our back: declare it before the next publish.
            self._broker.declarer.forget(tracked.message.declare.name)

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
        if held_back(delivery, lambda d: self.publish_then_ack(d, publish, on_done)):
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
