"""The records that cross the AMQP boundary: deliveries in, publishes out.

Job pools, the fate of a job and the dead-letters verb speak in these records; only
the rest of :mod:`rbit.amqp` turns them into pika calls. This module imports no pika,
so ``import rbit.fate`` works without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rbit.message import Message
from rbit.topology import QueueDecl

#: ``on_confirm(ok)``: the broker confirmed a publish (True), or nacked it or the
#: connection was lost first (False).
ConfirmCallback = Callable[[bool], None]

#: Why a publish failed, as told to a :class:`Publish`'s ``on_failure``:
#: never written to the broker, and never will be (``fail_fast`` with no connection).
NOT_SENT = "not sent"
#: Written, then nacked or the connection was lost before the confirm: the message
#: may or may not be in its queue.
NOT_CONFIRMED = "not confirmed"
#: ``mandatory`` and no queue took it (a ``basic.return`` came before the confirm).
RETURNED = "returned"

#: Header on a held copy: the worker (name and instance) that holds the job.
HELD_BY_HEADER = "x-rbit-held-by"
#: Header on a held copy: which renewal made it (to tell copies apart).
HOLD_ID_HEADER = "x-rbit-hold-id"

#: The AMQP basic properties kept when a job is republished (retry, dead letter, hold).
PROPERTY_NAMES = ("content_type", "content_encoding", "headers", "message_id",
                  "correlation_id", "reply_to", "priority", "timestamp", "type", "app_id")


class Delivery:
    """A message taken from a queue and not yet settled.

    ``properties`` are the AMQP properties worth keeping when the job is republished
    (retry, dead letter), as a plain mapping. The consumer passes the client library's
    properties object as it came (anything with the AMQP property names as
    attributes); it is read only when asked for, since most jobs are simply acked.
    """

    __slots__ = ("message", "tag", "generation", "_properties", "received", "leased",
                 "renewing", "settling", "deferred")

    def __init__(self, message: Message, tag: int, generation: int,
                 properties: Mapping[str, Any] | object | None = None,
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
        elif not isinstance(props, Mapping):
            self._properties = props = plain_properties(props)
        return props

    def __repr__(self) -> str:
        return f"Delivery({self.message!r}, tag={self.tag}, generation={self.generation})"


def plain_properties(props: object) -> dict[str, Any]:
    """The set :data:`PROPERTY_NAMES` of a properties object, as a plain dict."""
    values = ((name, getattr(props, name, None)) for name in PROPERTY_NAMES)
    return {name: value for name, value in values if value is not None}


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
    # The credit front door's needs: an answer at once, and an honest one.
    #: No queue took it (a ``basic.return``): the confirm fails with :data:`RETURNED`,
    #: and ``declare`` (if given) is declared again before the next publish. Matched
    #: by ``message_id``, which a mandatory publish must carry.
    mandatory: bool = False
    #: Refuse at once (:data:`NOT_SENT`) while there is no connection or the broker
    #: blocks publishing, instead of holding the message for the next connection.
    fail_fast: bool = False
    #: Called with the reason instead of ``on_confirm(False)`` when the publish fails.
    on_failure: Callable[[str], None] | None = None
    #: For a copy of a delivery (retry, dead letter, hold): rbit's own headers, published
    #: instead of ``headers`` when the whole copy cannot be (see rbit.amqp.confirms).
    trimmed_headers: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ConsumerSpec:
    """A queue to take jobs from.

    Attributes:
        queue: The queue name.
        prefetch: Unacked deliveries the broker may push (consume mode).
        on_delivery: Called on the I/O thread for every delivery; must not block.
        capacity: Poll mode only: how many more deliveries the caller takes now.
        allowed_classes: Passed on to every :class:`Message` of this queue.
        commands: A queue of commands, not jobs (PyBit's): its prefetch does not size
            the ack batches (:func:`rbit.amqp.acks.ack_batch`), so a small command window
            does not make every job's ack a flush of its own.
    """

    queue: str
    prefetch: int
    on_delivery: Callable[[Delivery], None]
    capacity: Callable[[], int] = lambda: 1
    allowed_classes: frozenset[str] = frozenset()
    commands: bool = False
