"""``rbit broadcast``'s AMQP session: one copy of a job to each worker, answers gathered.

Blocking, for the command line and :func:`rbit.broadcast.broadcast`. Like ``rbit ctl``
(:mod:`rbit.amqp.fleet`) it reads who was seen lately from ``rbit.fleet.seen``, and
takes the answers through RabbitMQ's direct reply-to: nothing is declared for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from rbit.amqp.broadcast import BROADCAST_EXCHANGE
from rbit.amqp.fleet import FleetSession


class BroadcastSession(FleetSession):
    """A :class:`~rbit.amqp.fleet.FleetSession` that also publishes broadcasts.

    Raises:
        BrokerUnreachable: No host accepts a connection.
    """

    def broadcast(self, queue: str, body: bytes, *, message_id: str,
                  headers: Mapping[str, Any], content_type: str | None, timeout: float,
                  enough: Callable[[list[bytes]], bool]) -> list[bytes]:
        """Publish one broadcast for ``queue``; gather answers until ``timeout`` or ``enough``.

        The copy expires (per-message TTL) at the timeout: a worker that would only get
        to it later never runs it.

        Raises:
            BrokerError: The broker refused the publish or the session failed.
        """
        def properties(_correlation: str) -> dict[str, Any]:
            return {"message_id": message_id, "headers": dict(headers),
                    "content_type": content_type, "timestamp": int(time.time()),
                    "expiration": str(max(1, int(timeout * 1000)))}

        return self._request(BROADCAST_EXCHANGE, queue, body, properties, timeout, enough,
                             "broadcast")
