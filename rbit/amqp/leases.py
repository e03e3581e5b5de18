"""Long jobs: renewing the lease of a delivery held too long.

RabbitMQ closes a channel when one of its deliveries stays unacked longer than
``consumer_timeout`` (30 min by default, server-wide in 3.10), requeueing every
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
keeps the same :class:`~rbit.amqp.records.Delivery` object throughout; the broker
swaps its tag, so the outcome is settled against the current copy. A settlement that
arrives mid-renewal waits for the renewal to end (:func:`held_back`). If the worker
dies, its unacked copy returns to the holding queue, already older than the TTL,
expires and is dead-lettered to the work queue: redelivered (the message then says
``redelivered``), not lost. The same happens when the connection drops; the running
job's settlement is then stale and the job may run twice. If the I/O loop stalls past
the hold TTL between steps 1 and 3, the copy is back in the work queue before it can be
taken: the running job's settlement is dropped and the job runs again (logged).
"""

from __future__ import annotations

import collections
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from rbit.amqp.records import HELD_BY_HEADER, HOLD_ID_HEADER, Delivery, Publish
from rbit.message import ATTEMPTS_HEADER
from rbit.topology import HOLD_TTL_MS, hold_queue

if TYPE_CHECKING:
    from rbit.amqp.broker import Broker

log = logging.getLogger(__name__)

#: RabbitMQ's default delivery-ack timeout (``consumer_timeout``), in seconds.
DEFAULT_CONSUMER_TIMEOUT = 1800.0


def held_back(delivery: Delivery, settle: Callable[[Delivery], None]) -> bool:
    """Hold a settlement back while the delivery's lease is being renewed.

    It must apply to the tag the renewal ends with. Returns True when
    ``settle(delivery)`` was kept for later; else the settlement owns the tag from now
    on (no more renewals). (A bound method and the delivery, not a closure: nearly
    every settlement goes through here, and nearly none is held back.)
    """
    if delivery.renewing:
        delivery.deferred.append(lambda: settle(delivery))
        return True
    delivery.settling = True
    return False


def _text(value: object) -> str | None:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class Leases:
    """Renews the leases of the deliveries held longest (I/O thread only).

    Args:
        broker: The hub (live deliveries, lease channel, publisher, acks, clock).
        consumer_timeout: The broker's delivery-ack timeout in seconds (None: the
            default of RabbitMQ).
        worker_name: Names this worker in its holding queues and held copies.
    """

    def __init__(self, broker: Broker, consumer_timeout: float | None,
                 worker_name: str) -> None:
        self._broker = broker
        #: A delivery held this long (seconds) is renewed.
        self.renewal = (consumer_timeout or DEFAULT_CONSUMER_TIMEOUT) / 2
        self._period = min(max(self.renewal / 5, 0.2), 30.0)
        #: Names this worker process in holding queues: name and a per-run instance id.
        self.holder = f"{worker_name}.{uuid.uuid4().hex[:8]}"
        #: Leases renewed so far (read by the metrics at scrape time).
        self.renewed = 0
        #: ``sealer(delivery, copy, valid_for) -> copy``: counter-signs the held copy of
        #: a signed job (rbit.security.gate), when set; ``valid_for`` bounds how long the
        #: copy may take to come back to the work queue.
        self.sealer: Callable[[Delivery, Publish, float], Publish] | None = None

    def reset(self) -> None:
        self._renewals: collections.deque[Delivery] = collections.deque()
        self._renewing: Delivery | None = None

    def start(self, generation: int) -> None:
        """Look for deliveries to renew every period while this connection lives."""
        self._broker.ioloop.call_later(self._period, lambda: self._tick(generation))

    def _tick(self, generation: int) -> None:
        broker = self._broker
        if generation != broker.generation or broker.stopping:
            return  # a newer connection runs its own tick
        now = broker.clock()
        for delivery in list(broker.live.values()):
            if (not delivery.renewing and not delivery.settling
                    and now - delivery.received >= self.renewal):
                delivery.renewing = True
                self._renewals.append(delivery)
        self._renew_next()
        self.start(generation)

    def _renew_next(self) -> None:
        """Renew one held delivery at a time.

        Its copy is then the head of the holding queue, so the ``basic_get`` that
        follows takes that very copy back.
        """
        broker = self._broker
        while self._renewing is None and self._renewals:
            delivery = self._renewals.popleft()
            wanted = not delivery.deferred  # else it is being settled: no need
            if (wanted and delivery.generation == broker.generation
                    and id(delivery) in broker.live):
                self._renewing = delivery
                self._park_copy(delivery)
            else:
                self._end(delivery)

    def _park_copy(self, delivery: Delivery) -> None:
        hold_id = uuid.uuid4().hex
        own = {HELD_BY_HEADER: self.holder, HOLD_ID_HEADER: hold_id}
        headers = {**delivery.message.headers, **own}
        hold = hold_queue(delivery.message.queue, self.holder)
        # Trimmed (too large to copy whole), the copy keeps at least the try count.
        trimmed = {**own, ATTEMPTS_HEADER: delivery.message.attempt - 1}
        copy = Publish("", hold.name, delivery.message.body, headers=headers,
                       properties=delivery.properties, declare=hold, trimmed_headers=trimmed)
        if self.sealer is not None:
            # Held unacked until the next renewal, then expiring after the hold TTL.
            copy = self.sealer(delivery, copy, 2 * self.renewal + HOLD_TTL_MS / 1000)
        log.debug("job %s: renewing its lease through %s", delivery.message.job_id, hold.name)
        self._broker.publisher.publish(
            copy, lambda ok: self._on_copy_parked(delivery, hold.name, hold_id, ok))

    def _on_copy_parked(self, delivery: Delivery, queue: str, hold_id: str, ok: bool) -> None:
        if not ok or delivery.generation != self._broker.generation:
            if ok:  # confirmed, but the original is back in its queue too
                log.warning("job %s: connection lost while renewing its lease; it may run "
                            "twice", delivery.message.job_id)
            self._end(delivery)  # a nacked copy: the next tick tries again
            return
        # The copy is safe in the holding queue: the original can go.
        self._broker.acks.ack_tag(delivery)
        self._take_copy(delivery, queue, hold_id, tries=3)

    def _take_copy(self, delivery: Delivery, queue: str, hold_id: str, tries: int) -> None:
        channel = self._broker.lease_channel

        def on_get(_channel, method, props, _body) -> None:
            if _text((props.headers or {}).get(HOLD_ID_HEADER)) != hold_id:
                # Someone else's copy (a stale renewal): send it back to the work queue.
                channel.basic_nack(method.delivery_tag, requeue=False)
                if tries > 1:
                    self._take_copy(delivery, queue, hold_id, tries - 1)
                else:
                    self._lose(delivery)
                return
            delivery.tag = method.delivery_tag
            delivery.leased = True
            delivery.received = self._broker.clock()
            self.renewed += 1
            self._end(delivery)

        channel.basic_get(queue, on_get)

    def on_empty(self, _frame) -> None:
        """The lease channel's ``basic_get`` found the holding queue empty."""
        if self._renewing is not None:
            self._lose(self._renewing)

    def _lose(self, delivery: Delivery) -> None:
        # The copy expired before it could be taken back (the I/O loop was stalled for
        # longer than the hold TTL): it is back in the work queue and will run again.
        log.warning("job %s: its held copy went back to the work queue before it could be "
                    "taken; it will run again", delivery.message.job_id)
        delivery.generation = -1  # its settlement now means nothing
        self._broker.live.pop(id(delivery), None)
        self._end(delivery)

    def abandon(self) -> None:
        """The connection is gone: every renewal ends.

        The settlements that waited for one find their delivery stale.
        """
        pending = [self._renewing, *self._renewals]
        self._renewing = None
        self._renewals.clear()
        for delivery in pending:
            if delivery is not None:
                delivery.renewing = False
                _run_deferred(delivery)

    def _end(self, delivery: Delivery) -> None:
        if self._renewing is delivery:
            self._renewing = None
        delivery.renewing = False
        _run_deferred(delivery)
        self._renew_next()


def _run_deferred(delivery: Delivery) -> None:
    deferred, delivery.deferred = delivery.deferred, []
    for call in deferred:
        call()
