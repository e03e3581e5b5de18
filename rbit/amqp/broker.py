"""The worker's AMQP connection: public API and the hand-over between threads.

A :class:`Broker` owns one AMQP connection and the thread that runs its I/O loop
(pika's ``SelectConnection``). Everything that touches the connection runs on that
thread; other threads hand work over with :meth:`Broker.ack`, :meth:`Broker.publish`
and friends, which queue a call and wake the loop through
``add_callback_threadsafe``. Heartbeats therefore keep flowing however long a job runs;
the heartbeat is at most the poll time, so a dead peer is noticed within it. Jobs that
are child processes (``shell!``) are supervised on the I/O thread itself, through
:meth:`Broker.fd_loop`; their acks need no wake-up.

Three channels per connection: one consumes (and acks), one publishes in confirm mode,
one holds the copies of long jobs. The Broker is the hub; each concern is a small
object it owns, on the I/O thread only:

* :class:`~rbit.amqp.connection.Connector`: connecting, host rotation, reconnecting;
* :class:`~rbit.amqp.declare.Declarer`: the topology, declared on every connection;
* :class:`~rbit.amqp.consuming.Consumers`: consumers and the delivery callback;
* :class:`~rbit.amqp.acks.Acks`: batched acks and nacks;
* :class:`~rbit.amqp.confirms.Publisher`: publishing with pipelined confirms;
* :class:`~rbit.amqp.leases.Leases`: keeping long jobs' deliveries alive;
* :class:`~rbit.amqp.polling.Poller`: ``mode = poll``'s ``basic_get`` passes.

They share the connection-scoped state kept here (the pika connection and channels,
the generation, the unsettled deliveries), which :meth:`Broker.reset` renews when a
connection ends.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pika.adapters.select_connection import IOLoop

from rbit.amqp.acks import Acks
from rbit.amqp.broadcast import BroadcastChannel, Routes
from rbit.amqp.confirms import Publisher, confirm
from rbit.amqp.connection import Connector
from rbit.amqp.consuming import Consumers
from rbit.amqp.control import ControlChannel, Handler
from rbit.amqp.declare import Declarer
from rbit.amqp.leases import Leases
from rbit.amqp.loops import AsyncioLoop, EagerConnection, PikaFdLoop, SafeAsyncioConnection
from rbit.amqp.polling import Poller
from rbit.amqp.records import ConfirmCallback, ConsumerSpec, Delivery, Publish
from rbit.config import AmqpSettings
from rbit.fdloop import FdLoop
from rbit.topology import Topology

log = logging.getLogger(__name__)


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
            default, 30 min). A delivery held for half of it is renewed
            (see :mod:`rbit.amqp.leases`).
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
        self.mode = mode
        self.clock = clock
        self.worker_name = worker_name  # recorded on the jobs the consumers refuse
        self._ready = threading.Event()
        self._stopped = threading.Event()
        self.stopping = False
        self.start_error: str | None = None  # why the first connection round failed
        #: Set when the start failed on an exclusive queue held by another connection.
        self.locked: str | None = None
        self.generation = 0
        #: Connections lost while running (read by the metrics at scrape time).
        self.connections_lost = 0
        self._asyncio = loop is not None
        self.ioloop: Any = IOLoop() if loop is None else AsyncioLoop(loop, self._stopped.set)
        self._fd_loop = PikaFdLoop(self.ioloop) if loop is None else None
        self._thread = threading.Thread(target=self._run, name=f"{name}-io", daemon=True)
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        heartbeat = max(1, min(amqp.heartbeat, int(poll_time))) if amqp.heartbeat else 0
        self.connector = Connector(
            self, amqp, name=name, heartbeat=heartbeat, rng=rng,
            connection_class=EagerConnection if loop is None else SafeAsyncioConnection,
            pika_loop=self.ioloop if loop is None else loop)
        self.consumers = Consumers(self, consumers)
        self.acks = Acks(self, consumers)
        self.publisher = Publisher(self)
        self.declarer = Declarer(self, topology or Topology())
        self.leases = Leases(self, consumer_timeout, worker_name)
        self.poller = Poller(self, poll_time)
        #: The half of the delivery-ack timeout after which a delivery is renewed.
        self.lease_renewal = self.leases.renewal
        #: Names this worker process in holding queues: name and a per-run instance id.
        self.holder = self.leases.holder
        # The hot path: a job's ack goes straight to the ack queue, no hop through here.
        self.ack = self.acks.submit
        #: The worker's control queue (:meth:`set_control`), if it has one.
        self.control: ControlChannel | None = None
        #: The worker's broadcast queue (:meth:`set_broadcast`), if it has one.
        self.broadcast: BroadcastChannel | None = None
        self.reset()

    def reset(self) -> None:
        """Forget the state of the connection that ended (I/O thread)."""
        self.connection: Any = None
        self.consume_channel: Any = None
        self.publish_channel: Any = None
        self.lease_channel: Any = None
        #: The broker blocks this connection's publishes (a resource alarm).
        self.blocked = False
        #: id() -> unsettled delivery of this connection.
        self.live: dict[int, Delivery] = {}
        for part in (self.consumers, self.acks, self.publisher, self.declarer,
                     self.leases, self.poller):
            part.reset()
        if self.control is not None:
            self.control.reset()
        if self.broadcast is not None:
            self.broadcast.reset()

    # ----------------------------------------------------------- public, any thread

    def set_consumers(self, consumers: Sequence[ConsumerSpec]) -> None:
        """Set the queues to consume (before :meth:`start`)."""
        self.consumers.set(consumers)
        self.acks.set_batch(consumers)

    def set_control(self, handle: Handler, announce: Callable[[], dict[str, Any]],
                    quorum: bool = False) -> None:
        """Serve ``rbit ctl`` commands (before :meth:`start`); see :mod:`rbit.amqp.control`.

        Args:
            handle: Runs on the I/O thread for each command: ``handle(body, user_id)``
                returns the reply document (or None).
            announce: The worker's announce document, published on each connection.
            quorum: The fleet's queue is a quorum queue (``[rbit] queue_type``).
        """
        self.control = ControlChannel(self, self.worker_name, handle, announce, quorum)

    def set_broadcast(self, routes: Routes) -> None:
        """Take broadcast copies (before :meth:`start`; consume mode only).

        See :mod:`rbit.amqp.broadcast`; ``routes`` maps each queue served to what takes
        its copies.
        """
        if self.mode == "consume" and routes:
            self.broadcast = BroadcastChannel(self, self.worker_name, routes)

    def set_paused(self, queues: Sequence[str]) -> None:
        """Start with these queues paused (before :meth:`start`)."""
        self.consumers.paused.update(queues)

    def pause(self, queue: str) -> None:
        """Take no more jobs from ``queue``, on this connection and the next ones.

        Running jobs and deliveries already received go on (thread-safe).
        """
        self.call_soon(lambda: self.consumers.pause(queue))

    def resume(self, queue: str) -> None:
        """Take jobs from ``queue`` again (thread-safe)."""
        self.call_soon(lambda: self.consumers.resume(queue))

    def paused(self) -> frozenset[str]:
        """The queues paused now (any thread)."""
        return frozenset(self.consumers.paused)

    def consuming(self) -> frozenset[str]:
        """The queues taking jobs now: consumed, or polled (any thread)."""
        return self.consumers.active()

    def start(self) -> None:
        """Start the I/O thread, or the connection on an asyncio loop.

        It connects and keeps reconnecting until stopped.
        """
        if self._asyncio:
            self.ioloop.add_callback_threadsafe(self.connector.connect)
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
        self.call_soon(self._shutdown)
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

        Acks wait up to :data:`rbit.amqp.acks.ACK_DELAY` to be sent together with later
        ones, unless half a prefetch window is already waiting: one wake-up of the I/O
        thread and one ``multiple=True`` ack then serve many jobs. (Each broker binds
        this name to :meth:`Acks.submit <rbit.amqp.acks.Acks.submit>` directly.)
        """
        self.acks.submit(delivery)

    def requeue(self, delivery: Delivery) -> None:
        """Give a delivery back to its queue at once (nack with requeue)."""
        self.call_soon(lambda: self.acks.nack(delivery))

    def publish_then_ack(self, delivery: Delivery, publish: Publish,
                         on_done: ConfirmCallback | None = None) -> None:
        """Publish a message derived from a delivery, then ack the delivery.

        The ack follows the broker's confirm. A nacked publish requeues the delivery
        instead; a lost connection leaves it to the broker's redelivery. ``on_done(ok)``
        follows.
        """
        self.call_soon(lambda: self.publisher.publish_then_ack(delivery, publish, on_done))

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
        self.call_soon(lambda: self.publisher.publish(message, on_confirm))

    def send_many(self, messages: Sequence[tuple[Publish, ConfirmCallback | None]]) -> None:
        """Publish several messages with one wake-up of the I/O thread (thread-safe)."""
        def publish_all() -> None:
            for message, on_confirm in messages:
                self.publisher.publish(message, on_confirm)

        if self._asyncio and self.ioloop.on_loop_thread():
            publish_all()  # already on the connection's thread: no need to wait a pass
        else:
            self.call_soon(publish_all)

    def stop_consuming(self) -> None:
        """Cancel the consumers: no new deliveries; unacked ones stay ours to settle."""
        self.call_soon(self.consumers.cancel)

    def stop(self, timeout: float = 10.0) -> None:
        """Flush acks, close the connection and end the I/O thread."""
        self.call_soon(self._shutdown)
        self._stopped.wait(timeout)
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------ cross-thread wake

    def on_io_thread(self) -> bool:
        """True on the thread that runs the connection's loop."""
        if self._asyncio:
            return self.ioloop.on_loop_thread()
        return threading.current_thread() is self._thread

    def call_soon(self, call: Callable[[], None]) -> None:
        """Run ``call`` on the I/O thread (from any thread): one wake-up serves many."""
        self._calls.append(call)
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        try:
            self.ioloop.add_callback_threadsafe(self._drain)
        except Exception:  # the loop is already closed: nothing will run it
            log.debug("I/O loop closed; call dropped")

    def _drain(self) -> None:
        with self._wake_lock:
            self._wake_pending = False
        self.acks.in_drain = True  # acks settled by these calls wait for the flush below
        calls = self._calls
        while calls:
            call = calls.popleft()
            try:
                call()
            except Exception:
                log.exception("internal error in the AMQP I/O thread")
        acks = self.acks
        if self.mode == "poll" or acks.batch_full():
            acks.apply()  # in poll mode, also asks for the next job or ends the pass
        else:
            # Only what these calls settled goes out now; acks the job threads queued
            # wait for their timer or a full batch (applying them here, on the drain
            # that only arms the timer, sent one ack frame per job).
            acks.in_drain = False
            acks.flush()

    # ------------------------------------------------------------ the I/O thread

    def _run(self) -> None:
        self.ioloop.add_callback_threadsafe(self.connector.connect)
        try:
            self.ioloop.start()
        finally:
            self.ioloop.close()  # its wake-up socket pair would leak otherwise
            self._stopped.set()

    def on_connected(self) -> None:
        """The connector opened every channel and the topology is declared."""
        broadcast = self.broadcast
        if broadcast is not None and not broadcast.tried:
            # First, so that a worker that answers (a ping, its hello) has its broadcast
            # queue bound already.
            broadcast.open(self.on_connected)
            return
        control = self.control
        if control is not None and control.channel is None:
            if not control.was_open:
                control.open(self.on_connected)  # a duplicate name fails the start first
                return
            # A reconnect: jobs do not wait for the control queue, which the broker may
            # still hold for the dropped connection (see rbit.amqp.control).
            control.open(lambda: None)
        self._ready.set()
        self.publisher.release_held()
        self.leases.start(self.generation)
        if self.mode == "consume":
            self.consumers.start(list(self.consumers.specs()))
        else:
            self.poller.start_pass()

    def on_closed(self, reason: object) -> None:
        """The connection ended (I/O thread): settle what it leaves, then go on."""
        self.connection = None
        self._ready.clear()
        self.generation += 1
        self.publisher.connection_lost()
        self.leases.abandon()
        poll_pause = self.poller.closing
        self.reset()  # publishes held for the next connection stay
        if self.stopping:
            for _message, on_confirm in self.publisher.held:
                confirm(on_confirm, False)
            self.ioloop.stop()
        elif poll_pause:
            self.ioloop.call_later(self.poller.poll_time, self.connector.connect)
        else:
            log.warning("connection lost: %s", reason)
            self.connections_lost += 1
            self.connector.schedule_reconnect(str(reason))

    def fail_start(self, reason: str) -> None:
        """A first round of connection attempts failed: give up."""
        self.start_error = reason
        self._ready.set()
        if self.connection is not None:  # refused once connected: close, then stop
            self.stopping = True
            self.connector.close()
        else:
            self.ioloop.stop()

    def is_ready(self) -> bool:
        return self._ready.is_set()

    def _shutdown(self) -> None:
        self.stopping = True
        self.acks.apply()
        if self.connection is None:
            self.ioloop.stop()
            return
        self.connector.close()
