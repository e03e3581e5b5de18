"""Settling deliveries: batched acks, and nacks.

Acks are batched. A job thread's ack waits in a queue; the loop is woken for it at
most once per :data:`ACK_DELAY` (5 ms), or at once when half the smallest prefetch
window is waiting (so with ``prefetch = 1`` every ack goes out at once). Each flush
acks the longest finished run of delivery tags with one ``multiple=True`` ack, and
finished tags stuck behind a still-running job one by one (so a long job never holds
back the prefetch window of the others). Shutdown flushes what is left. A delivery is
still acked only after its job's outcome was handled: batching delays acks, it never
sends one early.

A delivery whose lease is being renewed is settled once the renewal ended, against
the tag it ended with (:func:`rbit.amqp.leases.held_back`); one of an older
connection (generation) is dropped: the broker has put it back in its queue already.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rbit.amqp.leases import held_back
from rbit.amqp.records import ConsumerSpec, Delivery

if TYPE_CHECKING:
    from rbit.amqp.broker import Broker

log = logging.getLogger(__name__)

#: The longest an ack waits to be sent together with later ones, in seconds.
ACK_DELAY = 0.005


def ack_batch(consumers: Sequence[ConsumerSpec]) -> int:
    """How many waiting acks make a flush at once: half the smallest job prefetch window.

    So a job consumer never starves for want of an ack stuck in the batch. A command
    queue's acks wait at most :data:`ACK_DELAY` (its commands are rare, and handled at
    once): sized by its small window, every job's ack would be a flush of its own.
    """
    windows = [c.prefetch for c in consumers if not c.commands]
    return max(1, min(windows, default=1) // 2)


class Acks:
    """The acks the job threads hand over, and the delivery tags still to settle.

    Args:
        broker: The hub (channels, generation, hand-over to the I/O thread).
        consumers: Their prefetch windows size the batches.
    """

    def __init__(self, broker: Broker, consumers: Sequence[ConsumerSpec]) -> None:
        self._broker = broker
        self._poll = broker.mode == "poll"
        self._batch = ack_batch(consumers)
        self._pending: collections.deque[Delivery] = collections.deque()
        self._lock = threading.Lock()
        self._timer_armed = False
        self._apply_queued = False
        #: True while the I/O thread runs handed-over calls: an :meth:`apply` follows.
        self.in_drain = False

    def set_batch(self, consumers: Sequence[ConsumerSpec]) -> None:
        self._batch = ack_batch(consumers)

    def reset(self) -> None:
        """A new connection: its delivery tags start afresh."""
        self.outstanding: collections.deque[int] = collections.deque()  # tags, in order
        self._done: set[int] = set()  # finished, not yet acked
        self._settled: set[int] = set()  # acked or nacked one by one, still outstanding

    # ----------------------------------------------------------------- any thread

    def submit(self, delivery: Delivery) -> None:
        """Queue the ack of a delivery (any thread); see :meth:`Broker.ack`."""
        pending = self._pending
        pending.append(delivery)
        broker = self._broker
        if len(pending) >= self._batch:
            if broker.on_io_thread():
                if not self.in_drain:  # else the running drain sends it
                    self.apply()
                return
            with self._lock:
                # One apply queued serves every ack that comes before it runs.
                if self._apply_queued:
                    return
                self._apply_queued = True
            broker.call_soon(self.apply)
            return
        if self._timer_armed:  # read without the lock: set below under it, and
            return  # cleared by apply before it takes what is pending
        with self._lock:
            arm = not self._timer_armed
            self._timer_armed = True
        if arm:
            if broker.on_io_thread():
                self._arm_timer()
            else:
                broker.call_soon(self._arm_timer)

    # -------------------------------------------------------------- the I/O thread

    def batch_full(self) -> bool:
        """Whether a batch of acks waits (queued during a drain, which sends it)."""
        return len(self._pending) >= self._batch

    def _arm_timer(self) -> None:
        self._broker.ioloop.call_later(ACK_DELAY, self.apply)

    def apply(self) -> None:
        """Carry out the acks the job threads queued, then send them."""
        with self._lock:
            self._timer_armed = False
            self._apply_queued = False
        self.in_drain = True
        pending, broker, done = self._pending, self._broker, self._done
        live, generation = broker.live, broker.generation
        current = broker.consume_channel is not None
        while pending:
            delivery = pending.popleft()
            try:
                if (current and delivery.generation == generation and not delivery.renewing
                        and not delivery.leased):
                    # :meth:`ack` of nearly every job, inlined: a current delivery of the
                    # consume channel, no renewal in the way.
                    delivery.settling = True
                    live.pop(id(delivery), None)
                    done.add(delivery.tag)
                else:
                    self.ack(delivery)
            except Exception:
                log.exception("internal error in the AMQP I/O thread")
        self.in_drain = False
        self.flush()
        if self._poll:
            self._broker.poller.next()

    def ack(self, delivery: Delivery) -> None:
        if held_back(delivery, self.ack):
            return
        broker = self._broker
        if delivery.generation != broker.generation or broker.consume_channel is None:
            log.debug("dropping ack of stale delivery %s", delivery.tag)
            return
        broker.live.pop(id(delivery), None)
        self.ack_tag(delivery)

    def ack_tag(self, delivery: Delivery) -> None:
        """Ack the delivery's current tag (a lease renewal acks the tag it replaces)."""
        if delivery.leased:
            channel = self._broker.lease_channel
            if channel is not None and channel.is_open:
                channel.basic_ack(delivery.tag)
            if not self.in_drain and self._poll:
                self._broker.poller.next()
            return
        self._done.add(delivery.tag)
        if not self.in_drain:  # e.g. from a publish confirm: nothing else will flush
            self.flush()
            if self._poll:  # nor ask for the next job / end the pass
                self._broker.poller.next()

    def nack(self, delivery: Delivery) -> None:
        """Give a delivery back to its queue at once."""
        if held_back(delivery, self.nack):
            return
        broker = self._broker
        channel = broker.lease_channel if delivery.leased else broker.consume_channel
        if delivery.generation != broker.generation or channel is None or not channel.is_open:
            return
        broker.live.pop(id(delivery), None)
        if delivery.leased:
            # Requeued, a held copy would sit out its TTL in the holding queue; rejected,
            # it is dead-lettered straight back to the work queue.
            channel.basic_nack(delivery.tag, multiple=False, requeue=False)
            return
        channel.basic_nack(delivery.tag, multiple=False, requeue=True)
        self._settled.add(delivery.tag)

    def flush(self) -> None:
        """Send the finished tags: one multiple ack for the leading run, then the rest."""
        channel = self._broker.consume_channel
        if not self._done or channel is None or not channel.is_open:
            return
        outstanding, done, settled = self.outstanding, self._done, self._settled
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
