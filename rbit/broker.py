"""The one module that talks to pika.

A :class:`Broker` owns one AMQP connection and the thread that runs its I/O loop
(pika's ``SelectConnection``). Everything that touches the connection runs on that
thread; other threads hand work over with :meth:`Broker.ack`, :meth:`Broker.publish`
and friends, which queue a call and wake the loop through
``add_callback_threadsafe``. Heartbeats therefore keep flowing however long a job runs;
the heartbeat is at most the poll time, so a dead peer is noticed within it. Jobs that
are child processes (``shell!``) are supervised on the I/O thread itself, through
:meth:`Broker.fd_loop`; their acks need no wake-up.

Three channels per connection: one consumes (and acks), one publishes in confirm mode,
one holds the copies of long jobs (below). Confirms are pipelined: a publish returns at
once and its ``on_confirm`` callback runs when the broker acks or nacks it (or with
``False`` when the connection is lost first).

Acks are batched. A job thread's ack waits in a queue; the loop is woken for it at
most once per :data:`ACK_DELAY` (5 ms), or at once when half the smallest prefetch
window is waiting (so with ``prefetch = 1`` every ack goes out at once). Each flush
acks the longest finished run of delivery tags with one ``multiple=True`` ack, and
finished tags stuck behind a still-running job one by one (so a long job never holds
back the prefetch window of the others). Shutdown flushes what is left. A delivery is
still acked only after its job's outcome was handled: batching delays acks, it never
sends one early.

Reconnection. The broker reconnects until stopped: the next host of the list at once,
then, after a whole round failed, with exponential backoff and jitter; it redeclares
the topology and consumes again. Each connection has a *generation*. A delivery
carries the generation it came from; settling a delivery of an older generation is a
no-op, because its delivery tag means nothing on the new channel -- the broker has
already put that message back in its queue. So a job that was running while the
connection dropped is finished by its runner, its ack is dropped as stale, and the
broker delivers it again: it may run twice (at-least-once), never zero times.

Long jobs. RabbitMQ closes a channel when one of its deliveries stays unacked longer
than ``consumer_timeout`` (30 min by default, server-wide in 3.10), requeueing every
unacked delivery on it. The broker therefore renews the *lease* of every delivery held
for ``consumer_timeout / 2``:

1. publish a copy (same body and properties, headers plus ``x-rbit-held-by`` and a
   hold id) to the worker's holding queue ``<queue>.held.<worker>.<instance>`` and wait
   for its confirm; the holding queue has a short message TTL and dead-letters expired
   messages back to the work queue;
2. ack the current delivery (the copy is safe);
3. ``basic_get`` the copy back on the lease channel: a fresh unacked delivery whose ack
   timeout starts now. An unacked message never expires, so the copy stays put.

Renewals run one at a time, so the copy is the head of the holding queue when it is
taken back (a copy with another hold id is sent back to the work queue). The job pool
keeps the same :class:`Delivery` object throughout; the broker swaps its tag, so the
outcome is settled against the current copy. A settlement that arrives mid-renewal
waits for the renewal to end. If the worker dies, its unacked copy returns to the
holding queue, already older than the TTL, expires and is dead-lettered to the work
queue: redelivered (the message then says ``redelivered``), not lost. The same happens
when the connection drops; the running job's settlement is then stale and the job may
run twice. If the I/O loop stalls past the hold TTL between steps 1 and 3, the copy
is back in the work queue before it can be taken: the running job's settlement is
dropped and the job runs again (logged).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import select
import ssl
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import pika
import pika.exceptions
from pika import spec
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.adapters.select_connection import IOLoop

try:  # pika's transport for plain TCP, to which _Connection writes directly
    from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport
except ImportError:  # another pika layout: frames go out on the loop's next pass
    _AsyncPlaintextTransport = None

from rbit.config import AmqpSettings
from rbit.errors import BrokerError, BrokerUnreachable
from rbit.fdloop import FdLoop, Timer
from rbit.message import Message
from rbit.topology import QueueDecl, Topology, hold_queue

log = logging.getLogger(__name__)

ConfirmCallback = Callable[[bool], None]

#: The longest an ack waits to be sent together with later ones, in seconds.
ACK_DELAY = 0.005

#: RabbitMQ's default delivery-ack timeout (``consumer_timeout``), in seconds.
DEFAULT_CONSUMER_TIMEOUT = 1800.0
#: Header on a held copy: the worker (name and instance) that holds the job.
HELD_BY_HEADER = "x-rbit-held-by"
#: Header on a held copy: which renewal made it (to tell copies apart).
HOLD_ID_HEADER = "x-rbit-hold-id"
_PROPERTY_NAMES = ("content_type", "content_encoding", "headers", "message_id",
                   "correlation_id", "reply_to", "priority", "timestamp", "type", "app_id")


class Delivery:
    """A message taken from a queue and not yet settled.

    ``properties`` are the AMQP properties worth keeping when the job is republished
    (retry, dead letter), as a plain mapping; they are only extracted from pika's
    object when asked for, since most jobs are simply acked.
    """

    __slots__ = ("message", "tag", "generation", "_properties", "received", "leased",
                 "renewing", "settling", "deferred")

    def __init__(self, message: Message, tag: int, generation: int,
                 properties: Mapping[str, Any] | spec.BasicProperties | None = None,
                 received: float = 0.0) -> None:
        self.message = message
        self.tag = tag
        self.generation = generation
        self._properties = properties
        # The rest is the broker's, touched on its I/O thread only: when the current tag
        # was received, whether it lives on the lease channel, and a renewal in progress
        # with the settlements that wait for it.
        self.received = received
        self.leased = False
        self.renewing = False
        self.settling = False
        self.deferred: list[Callable[[], None]] = []

    @property
    def properties(self) -> Mapping[str, Any]:
        props = self._properties
        if props is None:
            self._properties = props = {}
        elif isinstance(props, spec.BasicProperties):
            self._properties = props = _plain_properties(props)
        return props

    def __repr__(self) -> str:
        return f"Delivery({self.message!r}, tag={self.tag}, generation={self.generation})"


@dataclass(frozen=True)
class Publish:
    """A message to publish (persistent unless told otherwise)."""

    exchange: str
    routing_key: str
    body: bytes
    headers: Mapping[str, Any] | None = None
    message_id: str | None = None
    content_type: str | None = None
    expiration_ms: int | None = None
    properties: Mapping[str, Any] = field(default_factory=dict)  # others kept from a delivery
    declare: QueueDecl | None = None  # declare this queue first (once per connection)
    persistent: bool = True


@dataclass(frozen=True)
class ConsumerSpec:
    """A queue to take jobs from.

    Attributes:
        queue: The queue name.
        prefetch: Unacked deliveries the broker may push (consume mode).
        on_delivery: Called on the I/O thread for every delivery; must not block.
        capacity: Poll mode only: how many more deliveries the caller takes now.
        allowed_classes: Passed on to every :class:`Message` of this queue.
    """

    queue: str
    prefetch: int
    on_delivery: Callable[[Delivery], None]
    capacity: Callable[[], int] = lambda: 1
    allowed_classes: frozenset[str] = frozenset()


def _parameters(amqp: AmqpSettings, index: int, name: str, heartbeat: int):
    address = amqp.hosts[index]
    ssl_options = None
    if amqp.tls:
        context = ssl.create_default_context(cafile=amqp.tls_ca_file)
        if amqp.tls_cert_file:
            context.load_cert_chain(amqp.tls_cert_file, amqp.tls_key_file)
        if not amqp.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        ssl_options = pika.SSLOptions(context, server_hostname=address.host)
    return pika.ConnectionParameters(
        host=address.host,
        port=address.port,
        virtual_host=amqp.virtual_host,
        credentials=pika.PlainCredentials(amqp.user, amqp.password),
        heartbeat=heartbeat,
        ssl_options=ssl_options,
        connection_attempts=1,
        socket_timeout=amqp.connect_timeout,
        stack_timeout=amqp.connect_timeout * 2,
        client_properties={"connection_name": name},
    )


def _plain_properties(props: spec.BasicProperties) -> dict[str, Any]:
    return {n: getattr(props, n) for n in _PROPERTY_NAMES if getattr(props, n) is not None}


class Broker:
    """One AMQP connection with its I/O thread, reconnecting until stopped.

    Args:
        amqp: Where and how to connect; hosts are tried in order.
        topology: Declared on every (re)connection, before consuming.
        consumers: Queues to take deliveries from.
        name: Connection name shown in the RabbitMQ management UI.
        mode: ``"consume"`` (pushed deliveries) or ``"poll"`` (basic_get passes).
        poll_time: Poll mode: the pause between passes. Both modes: the heartbeat is
            at most this long, so a dead connection is noticed within it.
        rng: Random source for the reconnect jitter.
        consumer_timeout: The broker's delivery-ack timeout in seconds (None: RabbitMQ's
            default, 30 min). A delivery held for half of it is renewed (see above).
        worker_name: Names this worker in its holding queues and held copies.
        clock: Monotonic time source for lease renewals.
        loop: Run on this asyncio event loop instead of an I/O thread of its own
            (for a program that already has one, such as the credit front door):
            no thread hand-over at all. Then use :meth:`wait_ready_async` and
            :meth:`stop_async` from the loop.
    """

    def __init__(
        self,
        amqp: AmqpSettings,
        topology: Topology | None = None,
        *,
        consumers: Sequence[ConsumerSpec] = (),
        name: str = "rbit",
        mode: str = "consume",
        poll_time: float = 60.0,
        rng: Callable[[], float] = random.random,
        consumer_timeout: float | None = None,
        worker_name: str = "rbit",
        clock: Callable[[], float] = time.monotonic,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._amqp = amqp
        self._topology = topology or Topology()
        self._consumers = {c.queue: c for c in consumers}
        self._ack_batch = _ack_batch(consumers)
        self._acks: collections.deque[Delivery] = collections.deque()
        self._ack_timer_armed = False
        self._name = name
        self._mode = mode
        self._poll_time = poll_time
        self._heartbeat = max(1, min(amqp.heartbeat, int(poll_time))) if amqp.heartbeat else 0
        self._rng = rng
        self._clock = clock
        self.lease_renewal = (consumer_timeout or DEFAULT_CONSUMER_TIMEOUT) / 2
        self._lease_period = min(max(self.lease_renewal / 5, 0.2), 30.0)
        #: Names this worker process in holding queues: name and a per-run instance id.
        self.holder = f"{worker_name}.{uuid.uuid4().hex[:8]}"
        self._ioloop: Any = IOLoop() if loop is None else _AsyncioLoop(loop, self)
        self._pika_loop: Any = self._ioloop if loop is None else loop
        self._connection_class: Any = (
            _Connection if loop is None else AsyncioConnection)
        self._fd_loop = _PikaFdLoop(self._ioloop) if loop is None else None
        self._thread = threading.Thread(target=self._run, name=f"{name}-io", daemon=True)
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._in_drain = False
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self._stopping = False
        self.start_error: str | None = None  # why the first connection round failed
        self.generation = 0
        self._connection: pika.SelectConnection | None = None
        self._host_index = 0
        self._failures = 0
        self._ever_connected = False
        self._reset_connection_state()

    # ----------------------------------------------------------- public, any thread

    def set_consumers(self, consumers: Sequence[ConsumerSpec]) -> None:
        """Set the queues to consume (before :meth:`start`)."""
        self._consumers = {c.queue: c for c in consumers}
        self._ack_batch = _ack_batch(consumers)

    def start(self) -> None:
        """Start the I/O thread, or the connection on an asyncio loop.

        It connects and keeps reconnecting until stopped.
        """
        if isinstance(self._ioloop, _AsyncioLoop):
            self._ioloop.add_callback_threadsafe(self._connect)
        else:
            self._thread.start()

    async def wait_ready_async(self, timeout: float) -> bool:
        """:meth:`wait_ready` for a broker running on an asyncio loop."""
        deadline = time.monotonic() + timeout
        while not self._ready.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self._ready.is_set() and self.start_error is None

    async def stop_async(self, timeout: float = 10.0) -> None:
        """:meth:`stop` for a broker running on an asyncio loop."""
        self._call_soon(self._shutdown)
        deadline = time.monotonic() + timeout
        while not self._stopped.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def wait_ready(self, timeout: float) -> bool:
        """Wait until connected with the topology declared.

        Returns:
            False on timeout or when a first round of connection attempts failed.
        """
        self._ready.wait(timeout)
        return self._ready.is_set() and self.start_error is None

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    def is_current(self, delivery: Delivery) -> bool:
        """False when the delivery's connection is gone (the broker requeued it)."""
        return delivery.generation == self.generation

    def fd_loop(self) -> FdLoop:
        """The I/O thread's loop, for fds and timers (to be used on that thread only).

        Deliveries arrive on this thread; a job supervised from here is started,
        watched and settled without handing anything to another thread. A broker on
        an asyncio loop (the credit daemon's) runs no jobs and has none to offer.
        """
        if self._fd_loop is None:
            raise RuntimeError("a broker on an asyncio loop offers no fd loop")
        return self._fd_loop

    def ack(self, delivery: Delivery) -> None:
        """Ack a delivery (batched; dropped if the delivery is stale).

        Acks wait up to :data:`ACK_DELAY` to be sent together with later ones, unless
        half a prefetch window is already waiting: one wake-up of the I/O thread and
        one ``multiple=True`` ack then serve many jobs.
        """
        acks = self._acks
        acks.append(delivery)
        if len(acks) >= self._ack_batch:
            if not self._on_io_thread():
                self._call_soon(self._apply_acks)
            elif not self._in_drain:  # else the running drain sends it
                self._apply_acks()
            return
        with self._wake_lock:
            arm = not self._ack_timer_armed
            self._ack_timer_armed = True
        if arm:
            if self._on_io_thread():
                self._arm_ack_timer()
            else:
                self._call_soon(self._arm_ack_timer)

    def requeue(self, delivery: Delivery) -> None:
        """Give a delivery back to its queue at once (nack with requeue)."""
        self._call_soon(lambda: self._nack(delivery))

    def publish_then_ack(self, delivery: Delivery, publish: Publish,
                         on_done: ConfirmCallback | None = None) -> None:
        """Publish a message derived from a delivery, then ack the delivery.

        The ack follows the broker's confirm. A nacked publish requeues the delivery instead; a lost
        connection leaves it to the broker's redelivery. ``on_done(ok)`` follows.
        """
        self._call_soon(lambda: self._publish_then_ack(delivery, publish, on_done))

    def publish(self, exchange: str, routing_key: str, body: bytes, *,
                message_id: str | None = None, headers: Mapping[str, Any] | None = None,
                content_type: str | None = None,
                on_confirm: ConfirmCallback | None = None) -> None:
        """Publish a persistent message with a publisher confirm (thread-safe).

        ``on_confirm(True)`` runs on the I/O thread once the broker confirmed it,
        ``on_confirm(False)`` when it was nacked or the connection was lost first. A
        message published while disconnected waits for the next connection.
        """
        message = Publish(exchange, routing_key, body, headers, message_id, content_type)
        self.send(message, on_confirm)

    def send(self, message: Publish, on_confirm: ConfirmCallback | None = None) -> None:
        """Publish a :class:`Publish` (thread-safe); see :meth:`publish`."""
        self._call_soon(lambda: self._publish(message, on_confirm))

    def send_many(self, messages: Sequence[tuple[Publish, ConfirmCallback | None]]) -> None:
        """Publish several messages with one wake-up of the I/O thread (thread-safe)."""
        def publish_all() -> None:
            for message, on_confirm in messages:
                self._publish(message, on_confirm)

        if isinstance(self._ioloop, _AsyncioLoop) and self._ioloop.on_loop_thread():
            publish_all()  # already on the connection's thread: no need to wait a pass
        else:
            self._call_soon(publish_all)

    def stop_consuming(self) -> None:
        """Cancel the consumers: no new deliveries; unacked ones stay ours to settle."""
        self._call_soon(self._cancel_consumers)

    def stop(self, timeout: float = 10.0) -> None:
        """Flush acks, close the connection and end the I/O thread."""
        self._call_soon(self._shutdown)
        self._stopped.wait(timeout)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------ cross-thread wake

    def _on_io_thread(self) -> bool:
        if isinstance(self._ioloop, _AsyncioLoop):
            return self._ioloop.on_loop_thread()
        return threading.current_thread() is self._thread

    def _call_soon(self, call: Callable[[], None]) -> None:
        self._calls.append(call)
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self._ioloop.add_callback_threadsafe(self._drain)
        except Exception:  # the loop is already closed: nothing will run it
            log.debug("I/O loop closed; call dropped")

    def _drain(self) -> None:
        with self._wake_lock:
            self._wake_pending = False
        self._in_drain = True
        while self._calls:
            call = self._calls.popleft()
            try:
                call()
            except Exception:
                log.exception("internal error in the AMQP I/O thread")
        self._apply_acks()

    def _arm_ack_timer(self) -> None:
        self._ioloop.call_later(ACK_DELAY, self._apply_acks)

    def _apply_acks(self) -> None:
        """Carry out the acks the job threads queued, then send them."""
        with self._wake_lock:
            self._ack_timer_armed = False
        self._in_drain = True
        acks = self._acks
        while acks:
            try:
                self._ack(acks.popleft())
            except Exception:
                log.exception("internal error in the AMQP I/O thread")
        self._in_drain = False
        self._flush_acks()
        if self._mode == "poll":
            self._poll_next()

    # --------------------------------------------------------------- the I/O thread

    def _run(self) -> None:
        self._ioloop.add_callback_threadsafe(self._connect)
        try:
            self._ioloop.start()
        finally:
            self._ioloop.close()  # its wake-up socket pair would leak otherwise
            self._stopped.set()

    def _reset_connection_state(self) -> None:
        self._consume_channel = None
        self._publish_channel = None
        self._lease_channel = None
        self._live: dict[int, Delivery] = {}  # id() -> unsettled delivery, this connection
        self._renewals: collections.deque[Delivery] = collections.deque()
        self._renewing: Delivery | None = None
        self._consumer_tags: dict[str, str] = {}
        self._outstanding: collections.deque[int] = collections.deque()
        self._done: set[int] = set()
        self._settled: set[int] = set()
        self._unconfirmed: dict[int, ConfirmCallback | None] = {}
        self._publish_seq = 0
        self._declared: set[str] = set()
        self._held_publishes: list[tuple[Publish, ConfirmCallback | None]] = []
        self._get_pending = False
        self._empty_queues: set[str] = set()
        self._closing_for_poll = False

    def _connect(self) -> None:
        if self._stopping:
            self._ioloop.stop()
            return
        params = _parameters(self._amqp, self._host_index, self._name, self._heartbeat)
        log.debug("connecting to %s:%s", params.host, params.port)
        self._connection = self._connection_class(
            parameters=params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
            custom_ioloop=self._pika_loop,
        )

    def _on_open_error(self, _connection, error) -> None:
        address = self._amqp.hosts[self._host_index]
        log.warning("cannot connect to %s:%s: %s", address.host, address.port,
                    error or type(error).__name__)
        self._connection = None
        self._schedule_reconnect(f"{address.host}:{address.port}: {error}")

    def _schedule_reconnect(self, reason: str) -> None:
        self._failures += 1
        self._host_index = (self._host_index + 1) % len(self._amqp.hosts)
        if not self._ever_connected and self._failures >= len(self._amqp.hosts):
            self.start_error = reason
            self._ready.set()
            self._ioloop.stop()
            return
        if self._stopping:
            self._ioloop.stop()
            return
        # Try the next host at once; back off only after a whole round failed.
        rounds = (self._failures - 1) // len(self._amqp.hosts)
        delay = 0.0
        if self._host_index == 0 or len(self._amqp.hosts) == 1:
            base = min(self._amqp.reconnect_delay * 2 ** rounds, self._amqp.reconnect_max_delay)
            delay = base * (0.5 + self._rng())  # jitter: 50% to 150% of the step
        log.info("reconnecting in %.1f s", delay)
        self._ioloop.call_later(delay, self._connect)

    def _on_open(self, connection) -> None:
        connection.add_on_connection_blocked_callback(
            lambda *_: log.warning("broker blocked this connection (resource alarm); "
                                   "publishing pauses until it clears"))
        connection.add_on_connection_unblocked_callback(
            lambda *_: log.warning("broker unblocked this connection; publishing resumes"))
        connection.channel(on_open_callback=self._on_publish_channel)

    def _on_publish_channel(self, channel) -> None:
        self._publish_channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.confirm_delivery(
            self._on_confirm,
            callback=lambda _f: self._connection.channel(on_open_callback=self._on_lease_channel))

    def _on_lease_channel(self, channel) -> None:
        self._lease_channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_callback(self._on_lease_empty, [spec.Basic.GetEmpty], one_shot=False)
        self._declare(0)

    def _declare(self, step: int) -> None:
        """Declare exchanges, then queues and their bindings, one after the other."""
        exchanges, queues = self._topology.exchanges, self._topology.queues
        channel = self._publish_channel
        if step < len(exchanges):
            ex = exchanges[step]
            channel.exchange_declare(ex.name, ex.type, durable=ex.durable,
                                     callback=lambda _f: self._declare(step + 1))
            return
        step -= len(exchanges)
        if step < len(queues):
            self._declare_queue(queues[step], lambda: self._declare(step + 1 + len(exchanges)))
            return
        self._connection.channel(on_open_callback=self._on_consume_channel)

    def _declare_queue(self, queue: QueueDecl, then: Callable[[], None]) -> None:
        def bind(index: int) -> None:
            if index == len(queue.bindings):
                self._declared.add(queue.name)
                then()
                return
            exchange, key = queue.bindings[index]
            self._publish_channel.queue_bind(queue.name, exchange, key,
                                             callback=lambda _f: bind(index + 1))

        self._publish_channel.queue_declare(queue.name, durable=queue.durable,
                                            arguments=dict(queue.arguments),
                                            callback=lambda _f: bind(0))

    def _on_consume_channel(self, channel) -> None:
        self._consume_channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_cancel_callback(self._on_cancelled)
        channel.add_callback(self._on_get_empty, [spec.Basic.GetEmpty], one_shot=False)
        self._ever_connected = True
        self._failures = 0
        self.generation += 1
        log.info("connected to %s:%s (vhost %s)", self._amqp.hosts[self._host_index].host,
                 self._amqp.hosts[self._host_index].port, self._amqp.virtual_host)
        self._ready.set()
        self._release_held_publishes()
        generation = self.generation
        self._ioloop.call_later(self._lease_period, lambda: self._lease_tick(generation))
        if self._mode == "consume":
            self._start_consumers(list(self._consumers.values()))
        else:
            self._empty_queues = set()
            self._poll_next()

    def _start_consumers(self, pending: list[ConsumerSpec]) -> None:
        if not pending or self._stopping:
            return
        consumer = pending[0]
        channel = self._consume_channel

        def consume(_frame) -> None:
            # basic_qos without global applies to consumers created after it on this
            # channel, so each queue gets its own prefetch window.
            self._consumer_tags[consumer.queue] = channel.basic_consume(
                consumer.queue, self._make_on_message(consumer))
            self._start_consumers(pending[1:])

        channel.basic_qos(prefetch_count=consumer.prefetch, callback=consume)

    def _make_on_message(self, consumer: ConsumerSpec):
        generation = self.generation
        allowed = consumer.allowed_classes
        queue = consumer.queue
        deliver = consumer.on_delivery
        outstanding = self._outstanding

        def on_message(_channel, method, props, body) -> None:
            headers = props.headers or {}
            # A copy that comes back from a holding queue was being run by a worker
            # that died or lost its connection: as good as redelivered.
            redelivered = method.redelivered or HELD_BY_HEADER in headers
            message = Message(body, queue, headers, redelivered,
                              props.message_id, props.content_type, allowed)
            outstanding.append(method.delivery_tag)
            delivery = Delivery(message, method.delivery_tag, generation, props,
                                received=self._clock())
            self._live[id(delivery)] = delivery
            deliver(delivery)

        return on_message

    # ----------------------------------------------------------------- settlement

    def _deferred(self, delivery: Delivery, call: Callable[[], None]) -> bool:
        """Hold a settlement back while the delivery's lease is being renewed.

        It must apply to the tag the renewal ends with.
        """
        if delivery.renewing:
            delivery.deferred.append(call)
            return True
        delivery.settling = True  # no renewal from now on: the settlement owns the tag
        return False

    def _ack(self, delivery: Delivery) -> None:
        if self._deferred(delivery, lambda: self._ack(delivery)):
            return
        if delivery.generation != self.generation or self._consume_channel is None:
            log.debug("dropping ack of stale delivery %s", delivery.tag)
            return
        self._live.pop(id(delivery), None)
        self._ack_tag(delivery)

    def _ack_tag(self, delivery: Delivery) -> None:
        if delivery.leased:
            if self._lease_channel is not None and self._lease_channel.is_open:
                self._lease_channel.basic_ack(delivery.tag)
            if not self._in_drain and self._mode == "poll":
                self._poll_next()
            return
        self._done.add(delivery.tag)
        if not self._in_drain:  # e.g. from a publish confirm: nothing else will flush
            self._flush_acks()
            if self._mode == "poll":  # nor ask for the next job / end the pass
                self._poll_next()

    def _nack(self, delivery: Delivery) -> None:
        if self._deferred(delivery, lambda: self._nack(delivery)):
            return
        channel = self._lease_channel if delivery.leased else self._consume_channel
        if delivery.generation != self.generation or channel is None or not channel.is_open:
            return
        self._live.pop(id(delivery), None)
        if delivery.leased:
            # Requeued, a held copy would sit out its TTL in the holding queue; rejected,
            # it is dead-lettered straight back to the work queue.
            channel.basic_nack(delivery.tag, multiple=False, requeue=False)
            return
        channel.basic_nack(delivery.tag, multiple=False, requeue=True)
        self._settled.add(delivery.tag)

    def _flush_acks(self) -> None:
        channel = self._consume_channel
        if not self._done or channel is None or not channel.is_open:
            return
        outstanding, done, settled = self._outstanding, self._done, self._settled
        last = 0  # the highest *unsettled* tag of the finished run: RabbitMQ refuses a
        # multiple ack whose own tag was already settled
        while outstanding and (outstanding[0] in done or outstanding[0] in settled):
            tag = outstanding.popleft()
            if tag in done:
                done.remove(tag)
                last = tag
            else:
                settled.remove(tag)
        if last:
            channel.basic_ack(last, multiple=True)
        for tag in done:  # finished behind a job still running
            channel.basic_ack(tag, multiple=False)
            settled.add(tag)
        done.clear()

    def _publish_then_ack(self, delivery: Delivery, publish: Publish,
                          on_done: ConfirmCallback | None) -> None:
        if self._deferred(delivery, lambda: self._publish_then_ack(delivery, publish, on_done)):
            return
        if delivery.generation != self.generation:
            return  # the broker redelivers the original; publishing a copy would duplicate

        def confirmed(ok: bool) -> None:
            if ok:
                self._ack(delivery)
            else:
                self._nack(delivery)
            if on_done is not None:
                on_done(ok)

        self._publish(publish, confirmed)

    def _publish(self, message: Publish, on_confirm: ConfirmCallback | None) -> None:
        channel = self._publish_channel
        if channel is None or not channel.is_open or not self._ready.is_set():
            if self._stopping:
                _confirm(on_confirm, False)
            else:
                self._held_publishes.append((message, on_confirm))
            return
        if message.declare is not None and message.declare.name not in self._declared:
            self._declare_queue(message.declare, lambda: self._publish(message, on_confirm))
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
            channel.basic_publish(message.exchange, message.routing_key, message.body,
                                  spec.BasicProperties(**props))
        except (pika.exceptions.AMQPError, ValueError, TypeError) as exc:
            log.error("cannot publish to exchange %r key %r: %s",
                      message.exchange, message.routing_key, exc)
            _confirm(on_confirm, False)
            return
        self._publish_seq += 1
        self._unconfirmed[self._publish_seq] = on_confirm

    def _release_held_publishes(self) -> None:
        held, self._held_publishes = self._held_publishes, []
        for message, on_confirm in held:
            self._publish(message, on_confirm)

    def _on_confirm(self, frame) -> None:
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
                _confirm(unconfirmed.pop(tag), ok)
        else:
            _confirm(self._unconfirmed.pop(method.delivery_tag, None), ok)

    # -------------------------------------------------------------- lease renewal

    def _lease_tick(self, generation: int) -> None:
        if generation != self.generation or self._stopping:
            return  # a newer connection runs its own tick
        now = self._clock()
        for delivery in list(self._live.values()):
            if (not delivery.renewing and not delivery.settling
                    and now - delivery.received >= self.lease_renewal):
                delivery.renewing = True
                self._renewals.append(delivery)
        self._renew_next()
        self._ioloop.call_later(self._lease_period, lambda: self._lease_tick(generation))

    def _renew_next(self) -> None:
        """Renew one held delivery at a time.

        Its copy is then the head of the holding queue, so the ``basic_get`` that
        follows takes that very copy back.
        """
        while self._renewing is None and self._renewals:
            delivery = self._renewals.popleft()
            wanted = not delivery.deferred  # else it is being settled: no need
            if wanted and delivery.generation == self.generation and id(delivery) in self._live:
                self._renewing = delivery
                self._park_copy(delivery)
            else:
                self._end_renewal(delivery)

    def _park_copy(self, delivery: Delivery) -> None:
        hold_id = uuid.uuid4().hex
        headers = dict(delivery.message.headers)
        headers[HELD_BY_HEADER] = self.holder
        headers[HOLD_ID_HEADER] = hold_id
        hold = hold_queue(delivery.message.queue, self.holder)
        copy = Publish("", hold.name, delivery.message.body, headers=headers,
                       properties=delivery.properties, declare=hold)
        log.debug("job %s: renewing its lease through %s", delivery.message.job_id, hold.name)
        self._publish(copy, lambda ok: self._on_copy_parked(delivery, hold.name, hold_id, ok))

    def _on_copy_parked(self, delivery: Delivery, queue: str, hold_id: str, ok: bool) -> None:
        if not ok or delivery.generation != self.generation:
            if ok:  # confirmed, but the original is back in its queue too
                log.warning("job %s: connection lost while renewing its lease; it may run "
                            "twice", delivery.message.job_id)
            self._end_renewal(delivery)  # a nacked copy: the next tick tries again
            return
        # The copy is safe in the holding queue: the original can go.
        self._ack_tag(delivery)
        self._take_copy(delivery, queue, hold_id, tries=3)

    def _take_copy(self, delivery: Delivery, queue: str, hold_id: str, tries: int) -> None:
        channel = self._lease_channel

        def on_get(_channel, method, props, _body) -> None:
            if _text((props.headers or {}).get(HOLD_ID_HEADER)) != hold_id:
                # Someone else's copy (a stale renewal): send it back to the work queue.
                channel.basic_nack(method.delivery_tag, requeue=False)
                if tries > 1:
                    self._take_copy(delivery, queue, hold_id, tries - 1)
                else:
                    self._lose_lease(delivery)
                return
            delivery.tag = method.delivery_tag
            delivery.leased = True
            delivery.received = self._clock()
            self._end_renewal(delivery)

        channel.basic_get(queue, on_get)

    def _on_lease_empty(self, _frame) -> None:
        if self._renewing is not None:
            self._lose_lease(self._renewing)

    def _lose_lease(self, delivery: Delivery) -> None:
        # The copy expired before it could be taken back (the I/O loop was stalled for
        # longer than the hold TTL): it is back in the work queue and will run again.
        log.warning("job %s: its held copy went back to the work queue before it could be "
                    "taken; it will run again", delivery.message.job_id)
        delivery.generation = -1  # its settlement now means nothing
        self._live.pop(id(delivery), None)
        self._end_renewal(delivery)

    def _abandon_renewals(self) -> None:
        """The connection is gone: every renewal ends.

        The settlements that waited for one find their delivery stale.
        """
        pending = [self._renewing, *self._renewals]
        self._renewing = None
        self._renewals.clear()
        for delivery in pending:
            if delivery is not None:
                delivery.renewing = False
                deferred, delivery.deferred = delivery.deferred, []
                for call in deferred:
                    call()

    def _end_renewal(self, delivery: Delivery) -> None:
        if self._renewing is delivery:
            self._renewing = None
        delivery.renewing = False
        deferred, delivery.deferred = delivery.deferred, []
        for call in deferred:
            call()
        self._renew_next()

    # ---------------------------------------------------------------------- poll

    def _poll_next(self) -> None:
        channel = self._consume_channel
        if self._get_pending or channel is None or not channel.is_open or self._stopping:
            return
        for consumer in self._consumers.values():
            if consumer.queue not in self._empty_queues and consumer.capacity() > 0:
                self._get_pending = True
                self._get_queue = consumer
                channel.basic_get(consumer.queue, self._on_get_ok)
                return
        if (len(self._empty_queues) == len(self._consumers) and not self._outstanding
                and not self._live):
            self._finish_poll_pass()

    def _on_get_ok(self, channel, method, props, body) -> None:
        self._get_pending = False
        self._make_on_message(self._get_queue)(channel, method, props, body)
        self._poll_next()

    def _on_get_empty(self, _frame) -> None:
        self._get_pending = False
        self._empty_queues.add(self._get_queue.queue)
        self._poll_next()

    def _finish_poll_pass(self) -> None:
        log.debug("queues drained; next pass in %.1f s", self._poll_time)
        self._closing_for_poll = True
        self._connection.close()

    # ------------------------------------------------------------- closing, errors

    def _cancel_consumers(self) -> None:
        channel = self._consume_channel
        if self._mode == "poll":
            self._empty_queues = set(self._consumers)
        if channel is None or not channel.is_open:
            return
        for tag in self._consumer_tags.values():
            channel.basic_cancel(tag)
        self._consumer_tags.clear()

    def _on_cancelled(self, _frame) -> None:
        log.warning("the broker cancelled a consumer (queue deleted?); reconnecting")
        self._close_connection()

    def _on_channel_closed(self, channel, reason) -> None:
        if not self._stopping and not self._closing_for_poll:
            log.warning("channel %s closed: %s", channel.channel_number, reason)
        self._close_connection()

    def _close_connection(self) -> None:
        conn = self._connection
        if conn is not None and not (conn.is_closing or conn.is_closed):
            conn.close()

    def _on_closed(self, _connection, reason) -> None:
        self._connection = None
        self._ready.clear()
        self.generation += 1
        for on_confirm in self._unconfirmed.values():
            _confirm(on_confirm, False)
        self._abandon_renewals()
        held = self._held_publishes
        poll_pause = self._closing_for_poll
        self._reset_connection_state()
        self._held_publishes = held
        if self._stopping:
            for _message, on_confirm in held:
                _confirm(on_confirm, False)
            self._ioloop.stop()
        elif poll_pause:
            self._ioloop.call_later(self._poll_time, self._connect)
        else:
            log.warning("connection lost: %s", reason)
            self._schedule_reconnect(str(reason))

    def _shutdown(self) -> None:
        self._stopping = True
        self._apply_acks()
        if self._connection is None:
            self._ioloop.stop()
            return
        self._close_connection()


class _Connection(pika.SelectConnection):
    """pika's ``SelectConnection``, sending a frame at once when nothing waits before it.

    pika buffers every outgoing frame and watches the socket for writability: each
    ack cost a pass of the loop and two ``epoll_ctl`` calls before it left. With one
    job at a time the broker sends the next job only once the ack arrived, so that
    pass was a share of every short job. Whatever the socket does not take at once
    (or any error) goes pika's way. Plain TCP only; TLS keeps pika's own course.
    """

    def _adapter_emit_data(self, data: bytes) -> None:
        transport = self._transport
        if (
            transport.__class__ is _AsyncPlaintextTransport
            and transport._state == transport._STATE_ACTIVE  # noqa: SLF001
            and not transport.get_write_buffer_size()
        ):
            try:
                sent = transport._sock.send(data)  # noqa: SLF001 -- non-blocking socket
            except OSError:  # EAGAIN, or a fault pika's own write will meet and report
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        super()._adapter_emit_data(data)


class _PikaFdLoop:
    """:class:`~rbit.fdloop.FdLoop` on pika's I/O loop.

    The watched fds go into an epoll of their own, which pika watches as a single fd:
    a job's fds then cost one system call each to add and remove, instead of a pass
    through pika's handler bookkeeping (it showed in the profile of short jobs).
    """

    def __init__(self, ioloop: IOLoop) -> None:
        self._ioloop = ioloop
        self._epoll: select.epoll | None = None
        self._handlers: dict[int, Callable[[], None]] = {}

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        if self._epoll is None:
            self._epoll = select.epoll()
            self._ioloop.add_handler(self._epoll.fileno(), self._dispatch, IOLoop.READ)
        self._epoll.register(fd, select.EPOLLIN)
        self._handlers[fd] = callback

    def unwatch(self, fd: int) -> None:
        if self._epoll is not None:
            self._epoll.unregister(fd)
        del self._handlers[fd]

    def _dispatch(self, _fd: int, _events: int) -> None:
        handlers = self._handlers
        for fd, _ in self._epoll.poll(0) if self._epoll is not None else ():
            handler = handlers.get(fd)  # None: unwatched by an earlier handler
            if handler is not None:
                handler()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return _PikaTimer(self._ioloop, self._ioloop.call_later(delay, callback))


class _PikaTimer:
    def __init__(self, ioloop: IOLoop, handle: object) -> None:
        self._ioloop, self._handle = ioloop, handle

    def cancel(self) -> None:
        self._ioloop.remove_timeout(self._handle)


class _AsyncioLoop:
    """The few I/O loop calls the broker makes, served by an asyncio event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, broker: Broker) -> None:
        self._loop, self._broker = loop, broker
        self._thread: int | None = None

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self._thread

    def add_callback_threadsafe(self, callback: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = threading.get_ident()  # start() runs on the loop's thread
        if threading.get_ident() == self._thread:
            self._loop.call_soon(callback)  # no self-pipe write on the loop's own thread
        else:
            self._loop.call_soon_threadsafe(callback)

    def call_later(self, delay: float, callback: Callable[[], None]):
        return self._loop.call_later(delay, callback)

    def stop(self) -> None:
        self._broker._stopped.set()  # the loop belongs to the caller: it keeps running


def _ack_batch(consumers: Sequence[ConsumerSpec]) -> int:
    # Send acks at once when half the smallest prefetch window waits for them, so a
    # consumer never starves for want of an ack stuck in the batch.
    return max(1, min((c.prefetch for c in consumers), default=1) // 2)


def _text(value: object) -> str | None:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _confirm(on_confirm: ConfirmCallback | None, ok: bool) -> None:
    if on_confirm is not None:
        try:
            on_confirm(ok)
        except Exception:
            log.exception("error in a publish confirm callback")


class AdminSession:
    """A short synchronous session for command-line verbs (dead letters, sending).

    Not for the worker: it blocks the calling thread on every call.

    Raises:
        BrokerUnreachable: From the constructor, when no host accepts a connection.
    """

    def __init__(self, amqp: AmqpSettings, name: str = "rbit admin") -> None:
        errors = []
        for index in range(len(amqp.hosts)):
            try:
                params = _parameters(amqp, index, name, amqp.heartbeat)
                self._connection = pika.BlockingConnection(params)
                break
            except pika.exceptions.AMQPError as exc:
                errors.append(f"{amqp.hosts[index].host}:{amqp.hosts[index].port}: {exc!r}")
        else:
            raise BrokerUnreachable("; ".join(errors))
        self._channel = self._connection.channel()
        self._channel.confirm_delivery()

    def __enter__(self) -> AdminSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close; deliveries not acked go back to their queues."""
        if self._connection.is_open:
            self._connection.close()

    def count(self, queue: str) -> int:
        """Ready messages in an existing queue (BrokerError if there is none)."""
        try:
            return self._channel.queue_declare(queue, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker as exc:
            raise BrokerError(f"queue {queue!r}: {exc.reply_text}") from exc

    def get(self, queue: str) -> Delivery | None:
        """Take one message without acking it (None when the queue is empty)."""
        method, props, body = self._channel.basic_get(queue, auto_ack=False)
        if method is None:
            return None
        message = Message(body, queue, props.headers or {}, method.redelivered,
                          props.message_id, props.content_type)
        return Delivery(message, method.delivery_tag, 0, props)

    def ack(self, delivery: Delivery) -> None:
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

    def purge(self, queue: str) -> int:
        """Delete every ready message of a queue; returns how many."""
        return self._channel.queue_purge(queue).method.message_count
