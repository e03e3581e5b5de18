"""The worker's end of ``rbit ctl``: its control queue and its announces.

On every connection, before any job is consumed, a channel of its own declares:

* the direct exchange ``rbit.control`` and the exclusive, auto-delete queue
  ``rbit.control.<name>``, bound with ``all`` and ``worker:<name>``; commands are
  consumed with auto-ack (a command is not a job: one lost with a connection is
  simply asked again);
* the fanout exchange ``rbit.fleet`` and its queue ``rbit.fleet.seen`` (message TTL
  one day, at most :data:`SEEN_MAX` messages), to which the worker publishes a
  ``hello`` announce, and a ``bye`` on a graceful stop; with a broadcast queue
  (:mod:`rbit.amqp.broadcast`), an announce lists its queues under ``broadcast``.

An exclusive queue can be held by one connection only: when another connection holds
``rbit.control.<name>``, RabbitMQ refuses the declaration (405, RESOURCE_LOCKED). On the
first connection that means another worker of the same name is running, and the start
fails (:attr:`ControlChannel.duplicate`) once :data:`HELD_RETRIES` more tries, a second
apart, found it held too. On a reconnect it is most likely this worker's own old
connection, which the broker drops only when its heartbeat times out: jobs are consumed
meanwhile, and the control queue is tried again every :data:`REOPEN_DELAY` seconds.

Replies go out on the publish channel (:class:`~rbit.amqp.confirms.Publisher`) to the
sender's ``reply_to`` (direct reply-to) with its ``correlation_id``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rbit.amqp.records import Publish

if TYPE_CHECKING:
    from rbit.amqp.broker import Broker

log = logging.getLogger(__name__)

CONTROL_EXCHANGE = "rbit.control"
FLEET_EXCHANGE = "rbit.fleet"
FLEET_QUEUE = "rbit.fleet.seen"
#: Routing key reaching every worker; ``worker:<name>`` reaches one.
ALL_KEY = "all"
SEEN_TTL_MS = 24 * 3600 * 1000
SEEN_MAX = 10_000
#: A worker announces itself on a connection at most this often (seconds), and again
#: after it while connected, so that a long-lived worker stays "seen lately".
ANNOUNCE_EVERY = 3600.0
_RESOURCE_LOCKED = 405
#: At start, a held control queue is tried again this often (seconds) and this many
#: times before the name is taken to be in use: a worker restarted at once after it
#: was killed may find its predecessor's connection not yet dropped by the broker.
HELD_RETRY_DELAY = 1.0
HELD_RETRIES = 5
#: After a reconnect, a control queue still held is tried again this often (seconds).
REOPEN_DELAY = 5.0

#: The arguments of ``rbit.fleet.seen`` (every declarer must give the same).
FLEET_QUEUE_ARGUMENTS = {"x-message-ttl": SEEN_TTL_MS, "x-max-length": SEEN_MAX}


def fleet_queue_arguments(quorum: bool) -> dict[str, Any]:
    """The arguments of ``rbit.fleet.seen``; a quorum queue for a quorum fleet.

    In a cluster a classic queue lives on one node; while that node is down its
    declaration fails and would take every worker's control channel with it. Workers
    of a vhost declare it alike: all with ``[rbit] queue_type = quorum`` or none.
    """
    arguments: dict[str, Any] = dict(FLEET_QUEUE_ARGUMENTS)
    if quorum:
        arguments["x-queue-type"] = "quorum"
    return arguments


@dataclass(frozen=True)
class CommandEnvelope:
    """What a command arrived with, beside its body.

    Attributes:
        routing_key: The routing key it was published with.
        headers: Its AMQP headers.
        message_id: Its AMQP ``message_id``.
        content_type: Its AMQP ``content_type``.
    """

    routing_key: str
    headers: Mapping[str, Any]
    message_id: str | None
    content_type: str | None


#: handle(body, user_id, envelope) -> the reply document, or None for no reply.
Handler = Callable[[bytes, "str | None", CommandEnvelope], "bytes | None"]


def control_queue(name: str) -> str:
    """The exclusive control queue of the worker named ``name``."""
    return f"rbit.control.{name}"


def worker_key(name: str) -> str:
    """The routing key that reaches the worker named ``name`` only."""
    return f"worker:{name}"


class ControlChannel:
    """Declares and consumes the control queue (I/O thread only, but :meth:`announce`).

    Args:
        broker: The hub (connection, publisher, connect sequence).
        name: The worker's name.
        handle: Called on the I/O thread for each command; returns the reply.
        announce: The worker's announce document (``hello``/``bye`` added here).
        quorum: Declare ``rbit.fleet.seen`` as a quorum queue (see
            :func:`fleet_queue_arguments`).
    """

    def __init__(self, broker: Broker, name: str, handle: Handler,
                 announce: Callable[[], dict[str, Any]], quorum: bool = False) -> None:
        self._broker = broker
        self._fleet_arguments = fleet_queue_arguments(quorum)
        self.name = name
        self._handle = handle
        self._announce = announce
        #: Another worker holds this name's control queue (the start failed for it).
        self.duplicate = False
        self.channel: Any = None
        self.was_open = False  # a control queue was ours once: a 405 then is our own
        self._announced: float | None = None  # monotonic time of the last hello
        self._then: Callable[[], None] = lambda: None
        self._held = 0  # declarations refused at start because the queue was held

    def reset(self) -> None:
        self.channel = None

    def open(self, then: Callable[[], None]) -> None:
        """Declare everything on a new channel, consume, announce; then ``then``."""
        broker = self._broker
        self._then = then

        def on_channel(channel: Any) -> None:
            self.channel = channel
            channel.add_on_close_callback(self._on_closed)
            steps: list[Callable[[Callable[[Any], None]], None]] = [
                lambda cb: channel.exchange_declare(CONTROL_EXCHANGE, "direct", durable=True,
                                                    callback=cb),
                lambda cb: channel.exchange_declare(FLEET_EXCHANGE, "fanout", durable=True,
                                                    callback=cb),
                lambda cb: channel.queue_declare(FLEET_QUEUE, durable=True, callback=cb,
                                                 arguments=dict(self._fleet_arguments)),
                lambda cb: channel.queue_bind(FLEET_QUEUE, FLEET_EXCHANGE, "", callback=cb),
                lambda cb: channel.queue_declare(control_queue(self.name), exclusive=True,
                                                 auto_delete=True, callback=cb),
                lambda cb: channel.queue_bind(control_queue(self.name), CONTROL_EXCHANGE,
                                              ALL_KEY, callback=cb),
                lambda cb: channel.queue_bind(control_queue(self.name), CONTROL_EXCHANGE,
                                              worker_key(self.name), callback=cb),
            ]
            self._run(steps, lambda: self._consume(then))

        broker.connection.channel(on_open_callback=on_channel)

    def _run(self, steps: list, then: Callable[[], None]) -> None:
        if not steps:
            then()
            return
        steps[0](lambda _frame: self._run(steps[1:], then))

    def _consume(self, then: Callable[[], None]) -> None:
        self.channel.basic_consume(control_queue(self.name), self._on_command, auto_ack=True)
        first = not self.was_open
        self.was_open = True
        then()
        now = self._broker.clock()
        if self._announced is None or now - self._announced >= ANNOUNCE_EVERY:
            self._announced = now
            self.announce("hello")
        if first and self._broker.mode == "consume":
            self._broker.ioloop.call_later(ANNOUNCE_EVERY, self._periodic)

    def _periodic(self) -> None:
        if self._broker.stopping:
            return
        if self.channel is not None:
            self._announced = self._broker.clock()
            self.announce("hello")
        self._broker.ioloop.call_later(ANNOUNCE_EVERY, self._periodic)

    def announce(self, event: str, on_confirm: Callable[[bool], None] | None = None) -> None:
        """Publish this worker's announce to ``rbit.fleet`` (any thread)."""
        doc = {**self._announce(), "event": event}
        if self._broker.broadcast is not None:  # whom a broadcast caller expects to answer
            doc["broadcast"] = self._broker.broadcast.queues
        body = json.dumps(doc).encode()
        self._broker.send(Publish(FLEET_EXCHANGE, "", body, content_type="application/json"),
                          on_confirm)

    def _on_command(self, _channel: Any, method: Any, props: Any, body: bytes) -> None:
        envelope = CommandEnvelope(method.routing_key, props.headers or {}, props.message_id,
                                   props.content_type)
        try:
            answer = self._handle(body, props.user_id, envelope)
        except Exception:  # a command must not take the I/O thread down
            log.exception("internal error handling a control command")
            return
        if answer is None or not props.reply_to:
            return
        properties = {"correlation_id": props.correlation_id} if props.correlation_id else {}
        self._broker.publisher.publish(
            Publish("", props.reply_to, answer, content_type="application/json",
                    properties=properties, persistent=False, fail_fast=True), None)

    def _retry(self) -> None:
        broker = self._broker
        if broker.connection is not None and broker.connection.is_open and not broker.stopping:
            self.open(self._then)

    def _on_closed(self, _channel: Any, reason: Any) -> None:
        broker = self._broker
        self.channel = None
        connection = broker.connection
        if broker.stopping or broker.poller.closing or connection is None \
                or connection.is_closing or connection.is_closed:
            return  # the connection ends: nothing to say about its channels
        if getattr(reason, "reply_code", None) == _RESOURCE_LOCKED:
            if not self.was_open and self._held < HELD_RETRIES:
                self._held += 1
                log.info("control queue %s is held; trying again in %.0f s",
                         control_queue(self.name), HELD_RETRY_DELAY)
                broker.ioloop.call_later(HELD_RETRY_DELAY, self._retry)
                return
            if not self.was_open:
                self.duplicate = True
                log.error("another worker named %r is running (its control queue %s is "
                          "held by another connection)", self.name, control_queue(self.name))
                broker.fail_start(f"another worker named {self.name!r} is running")
                return
            log.warning("control queue %s still held (the broker has not yet dropped "
                        "the previous connection); trying again in %.0f s",
                        control_queue(self.name), REOPEN_DELAY)
            generation = broker.generation
            broker.ioloop.call_later(
                REOPEN_DELAY, lambda: self._retry() if broker.generation == generation else None)
            return
        log.warning("control channel closed: %s", reason)
        broker.connector.close()
