"""The worker's end of ``rbit broadcast``: its broadcast queue, and the answers.

On every connection (``mode = consume`` only), before jobs are consumed, a channel of
its own declares the direct exchange ``rbit.broadcast`` and the worker's exclusive,
auto-delete queue ``rbit.broadcast.<name>``, bound with the name of each queue the
worker has a runner section for. A broadcast for QUEUE is one message published to
``rbit.broadcast`` with the routing key QUEUE: RabbitMQ puts a copy in the queue of
every connected worker serving QUEUE, and nowhere else.

A copy is consumed with manual acks (at most :data:`PREFETCH` unacked), checked by the
worker (:mod:`rbit.broadcast`) and run by QUEUE's job pool like a job of QUEUE; its
outcome is answered to the sender's ``reply_to`` (direct reply-to) with its
``correlation_id``, then the copy is acked. A copy is never requeued, retried or
dead-lettered: a copy that cannot run is answered with the reason; one whose worker
dies goes with the worker's exclusive queue, and its sender names that worker missing.

The queue is exclusive, like the control queue (:mod:`rbit.amqp.control`): after a
reconnect the broker may still hold it for the dropped connection, and it is tried
again every :data:`~rbit.amqp.control.REOPEN_DELAY` seconds meanwhile.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from rbit.amqp.control import REOPEN_DELAY
from rbit.amqp.records import Delivery, Publish
from rbit.message import UNDECODABLE_HEADER, BroadcastMessage
from rbit.outcome import Kind, Outcome, Output, Status
from rbit.safetext import escape

if TYPE_CHECKING:
    from rbit.amqp.broker import Broker

log = logging.getLogger(__name__)

BROADCAST_EXCHANGE = "rbit.broadcast"
#: Copies a worker takes ahead (each then waits for a slot of its queue's pool).
PREFETCH = 16
#: The largest answer sent back (bytes of JSON); a bigger result is answered an error.
MAX_ANSWER_BYTES = 1024 * 1024
#: The longest error text an answer quotes (its end: tracebacks end with the error).
MAX_ERROR_CHARS = 4000
_RESOURCE_LOCKED = 405

#: queue -> (accept(delivery), classes a jsonpickle body of that queue may name).
Routes = Mapping[str, tuple[Callable[[Delivery], None], frozenset[str]]]


def broadcast_queue(name: str) -> str:
    """The exclusive broadcast queue of the worker named ``name``."""
    return f"rbit.broadcast.{name}"


class BroadcastDelivery(Delivery):
    """A broadcast copy: settled by :meth:`answer`, never by an ack of the job path."""

    __slots__ = ("_answer", "channel")

    def __init__(self, message: BroadcastMessage, tag: int, generation: int, props: Any,
                 answer: Callable[[BroadcastDelivery, Outcome | None, str, bool], None],
                 channel: Any = None) -> None:
        super().__init__(message, tag, generation, props)
        self._answer = answer
        #: The channel it came on: its tag means nothing on another.
        self.channel = channel

    def answer(self, outcome: Outcome | None, error: str, refused: bool = False) -> None:
        """Send the caller ``outcome`` (None: no result, because of ``error``); any thread.

        ``refused``: the copy was refused by a check (its signature), not merely unrun.
        """
        self._answer(self, outcome, error, refused)


def answer_document(worker: str, delivery: Delivery, outcome: Outcome | None,
                    error: str, refused: bool = False) -> bytes:
    """The JSON answer to one broadcast copy (see :mod:`rbit.broadcast`)."""
    message = delivery.message
    doc: dict[str, Any] = {"worker": worker, "queue": message.queue, "job_id": message.job_id}
    if outcome is None:
        doc.update(ok=False, status=Status.FAILED.value, error=error[-MAX_ERROR_CHARS:])
        if refused:
            doc["refused"] = True
        return _dumps(doc)
    ok = outcome.kind is Kind.DONE
    status = (outcome.status or Status.DONE) if ok else \
        Status.BLOCKED if outcome.kind is Kind.BLOCKED else Status.FAILED
    doc.update(ok=ok, status=status.value)
    if not ok:
        doc["error"] = outcome.reason[-MAX_ERROR_CHARS:]
    result = outcome.result
    if isinstance(result, Output):
        doc.update(result=result.text, truncated=result.truncated)
    elif result is not None:
        doc["result"] = result
    try:
        body = _dumps(doc)
    except (TypeError, ValueError) as exc:  # a python! runner's return value
        doc.pop("result")
        return _dumps({**doc, "ok": False, "status": Status.FAILED.value,
                       "error": f"the result is not JSON-serialisable: {exc}"})
    if len(body) > MAX_ANSWER_BYTES:
        doc.pop("result", None)
        return _dumps({**doc, "ok": False, "status": Status.FAILED.value,
                       "error": f"the result is {len(body)} bytes of JSON, more than "
                                f"{MAX_ANSWER_BYTES}"})
    return body


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, allow_nan=False).encode()


class BroadcastChannel:
    """Declares and consumes the broadcast queue; answers copies (I/O thread, but answers).

    Args:
        broker: The hub (connection, publisher, generation).
        name: The worker's name.
        routes: What takes the copies of each queue the worker serves.
    """

    def __init__(self, broker: Broker, name: str, routes: Routes) -> None:
        self._broker = broker
        self.name = name
        self._routes = dict(routes)
        #: The queues whose broadcasts this worker takes (told in its announces).
        self.queues = sorted(self._routes)
        self.channel: Any = None
        self._then: Callable[[], None] | None = None
        #: Opened (or tried) on this connection.
        self.tried = False

    def reset(self) -> None:
        self.channel = None
        self._then = None
        self.tried = False

    def open(self, then: Callable[[], None]) -> None:
        """Declare, bind and consume on a new channel; then ``then`` (also on failure)."""
        self.tried = True
        self._then = then
        self._broker.connection.channel(on_open_callback=self._declare)

    def _declare(self, channel: Any) -> None:
        self.channel = channel
        channel.add_on_close_callback(self._on_closed)
        queue = broadcast_queue(self.name)
        steps: list[Callable[[Callable[[Any], None]], None]] = [
            lambda cb: channel.exchange_declare(BROADCAST_EXCHANGE, "direct", durable=True,
                                                callback=cb),
            lambda cb: channel.queue_declare(queue, exclusive=True, auto_delete=True,
                                             callback=cb),
        ]
        for key in self.queues:
            steps.append(lambda cb, key=key: channel.queue_bind(queue, BROADCAST_EXCHANGE, key,
                                                                callback=cb))
        steps.append(lambda cb: channel.basic_qos(prefetch_count=PREFETCH, callback=cb))
        self._run(steps, self._consume)

    def _run(self, steps: list, then: Callable[[], None]) -> None:
        if not steps:
            then()
            return
        steps[0](lambda _frame: self._run(steps[1:], then))

    def _consume(self) -> None:
        self.channel.basic_consume(broadcast_queue(self.name), self._on_message)
        self._go_on()

    def _go_on(self) -> None:
        then, self._then = self._then, None
        if then is not None:
            then()

    def _on_message(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        queue = method.routing_key
        headers = props.headers or {}
        accept, allowed = self._routes.get(queue, (None, frozenset()))
        message = BroadcastMessage(body, queue, headers, False, props.message_id,
                                   props.content_type, allowed)
        delivery = BroadcastDelivery(message, method.delivery_tag, self._broker.generation,
                                     props, self.answer, channel)
        if accept is None:
            delivery.answer(None, f"no runner for queue {escape(queue, 255)}")
        elif UNDECODABLE_HEADER in headers:
            reason = escape(headers[UNDECODABLE_HEADER], 300)
            delivery.answer(None, f"undecodable headers: {reason}")
        elif method.redelivered:
            # Its channel closed while it was unacked: it may have run already, and a
            # broadcast is never run twice.
            delivery.answer(None, "redelivered: it may have run here already")
        else:
            accept(delivery)

    def answer(self, delivery: BroadcastDelivery, outcome: Outcome | None, error: str,
               refused: bool = False) -> None:
        """Answer a copy's sender, then ack the copy (any thread)."""
        # Encoded here, in the job's thread: a big result costs the I/O thread nothing.
        body = answer_document(self.name, delivery, outcome, error, refused)
        props = delivery.properties
        log.info("job %s: broadcast answered (%s)", delivery.message.job_id,
                 "ok" if outcome is not None and outcome.kind is Kind.DONE else "error")
        self._broker.call_soon(lambda: self._send(delivery, body, props))

    def _send(self, delivery: BroadcastDelivery, body: bytes,
              props: Mapping[str, Any]) -> None:
        broker = self._broker
        reply_to = props.get("reply_to")
        if reply_to:
            correlation = props.get("correlation_id")
            properties = {"correlation_id": correlation} if correlation else {}
            broker.publisher.publish(
                Publish("", reply_to, body, content_type="application/json",
                        properties=properties, persistent=False, fail_fast=True), None)
        channel = delivery.channel
        if channel is not None and channel is self.channel and channel.is_open:
            channel.basic_ack(delivery.tag)

    def _retry(self, generation: int) -> None:
        broker = self._broker
        connection = broker.connection
        if broker.generation == generation and connection is not None and connection.is_open \
                and not broker.stopping and self.channel is None:
            self.open(lambda: None)

    def _on_closed(self, _channel: Any, reason: Any) -> None:
        broker = self._broker
        self.channel = None
        connection = broker.connection
        if broker.stopping or connection is None or connection.is_closing \
                or connection.is_closed:
            return
        if getattr(reason, "reply_code", None) == _RESOURCE_LOCKED:
            log.warning("broadcast queue %s is held by another connection (a worker of the "
                        "same name, or this one's before a reconnect); trying again in %.0f s",
                        broadcast_queue(self.name), REOPEN_DELAY)
        else:
            log.warning("broadcast channel closed: %s; opening it again in %.0f s", reason,
                        REOPEN_DELAY)
        generation = broker.generation
        broker.ioloop.call_later(REOPEN_DELAY, lambda: self._retry(generation))
        self._go_on()  # jobs do not wait for broadcasts
