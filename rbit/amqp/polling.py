"""``mode = poll``: passes of ``basic_get`` instead of pushed deliveries.

A pass connects, takes messages with ``basic_get`` from each queue while its job pool
has room (``ConsumerSpec.capacity``), until every queue answered empty and every job
taken was settled; then it closes the connection and the next pass connects again
after the poll time.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from rbit.amqp.records import ConsumerSpec

if TYPE_CHECKING:
    from rbit.amqp.broker import Broker

log = logging.getLogger(__name__)


class Poller:
    """Runs the passes (I/O thread only).

    Args:
        broker: The hub (consume channel, consumers, live deliveries, acks).
        poll_time: The pause between two passes, in seconds.
    """

    def __init__(self, broker: Broker, poll_time: float) -> None:
        self._broker = broker
        self.poll_time = poll_time

    def reset(self) -> None:
        self._get_pending = False
        self._get_queue: ConsumerSpec | None = None
        self._empty_queues: set[str] = set()
        #: True once the pass ended: the connection closes on purpose.
        self.closing = False

    def start_pass(self) -> None:
        self._empty_queues = set(self._broker.consumers.paused)  # paused: skipped
        self.next()

    def skip(self, queue: str) -> None:
        """Take nothing more from ``queue`` in this pass (it was paused)."""
        self._empty_queues.add(queue)

    def end_pass(self) -> None:
        """Take nothing more in this pass (the consumers are being cancelled)."""
        self._empty_queues = set(self._broker.consumers.queues())

    def next(self) -> None:
        """Ask for the next job, or end the pass when all is drained and settled."""
        broker = self._broker
        channel = broker.consume_channel
        if self._get_pending or channel is None or not channel.is_open or broker.stopping:
            return
        consumers = broker.consumers.specs()
        for consumer in consumers:
            if consumer.queue not in self._empty_queues and consumer.capacity() > 0:
                self._get_pending = True
                self._get_queue = consumer
                channel.basic_get(consumer.queue, self._on_get_ok)
                return
        if (all(c.queue in self._empty_queues for c in consumers) and not broker.acks.outstanding
                and not broker.live):
            self._finish_pass()

    def _on_get_ok(self, channel, method, props, body) -> None:
        self._get_pending = False
        self._broker.consumers.on_message(self._get_queue)(channel, method, props, body)
        self.next()

    def on_get_empty(self, _frame) -> None:
        """The consume channel's ``basic_get`` found its queue empty."""
        self._get_pending = False
        self._empty_queues.add(self._get_queue.queue)
        self.next()

    def _finish_pass(self) -> None:
        log.debug("queues drained; next pass in %.1f s", self.poll_time)
        self.closing = True
        self._broker.connection.close()
