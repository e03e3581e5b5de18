"""Declaring the topology: exchanges, then queues with their bindings.

Declared on every connection before consuming, one step after the other on the
publish channel. Queues that only some publishes need (delay queues, holding queues)
are declared on their first use in each connection.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from rbit.topology import QueueDecl, Topology

if TYPE_CHECKING:
    from rbit.amqp.broker import Broker


class Declarer:
    """Declares a :class:`~rbit.topology.Topology` and remembers what was declared.

    Args:
        broker: The hub (its publish channel).
        topology: Declared in full by :meth:`declare_all`.
    """

    def __init__(self, broker: Broker, topology: Topology) -> None:
        self._broker = broker
        self._topology = topology

    def reset(self) -> None:
        """A new connection: declare again."""
        self._declared: set[str] = set()

    def is_declared(self, queue: str) -> bool:
        return queue in self._declared

    def forget(self, queue: str) -> None:
        """Declare ``queue`` again before the next publish to it (it was deleted)."""
        self._declared.discard(queue)

    def declare_all(self, then: Callable[[], None], step: int = 0) -> None:
        """Declare exchanges, then queues and their bindings; then call ``then``."""
        exchanges, queues = self._topology.exchanges, self._topology.queues
        channel = self._broker.publish_channel
        if step < len(exchanges):
            ex = exchanges[step]
            channel.exchange_declare(ex.name, ex.type, durable=ex.durable,
                                     callback=lambda _f: self.declare_all(then, step + 1))
            return
        index = step - len(exchanges)
        if index < len(queues):
            self.declare_queue(queues[index], lambda: self.declare_all(then, step + 1))
            return
        then()

    def declare_queue(self, queue: QueueDecl, then: Callable[[], None]) -> None:
        """Declare one queue and its bindings; then call ``then``."""
        channel = self._broker.publish_channel

        def bind(index: int) -> None:
            if index == len(queue.bindings):
                self._declared.add(queue.name)
                then()
                return
            exchange, key = queue.bindings[index]
            channel.queue_bind(queue.name, exchange, key, callback=lambda _f: bind(index + 1))

        channel.queue_declare(queue.name, durable=queue.durable, exclusive=queue.exclusive,
                              auto_delete=queue.auto_delete,
                              arguments=dict(queue.arguments), callback=lambda _f: bind(0))
