"""The credit event as it travels through RabbitMQ.

The front door (``rbit-credit``) publishes one persistent message per accepted line;
the credit runner (:mod:`rbitext.creditpiggy`) consumes them. The body is JSON::

    {"id": "<32 hex>", "command": "claim", "args": {"slot": "job42", "machine": "m1"},
     "time": 1700000000.0}

``command`` is one of :data:`COMMANDS` (lower case). ``args`` holds the line's
arguments: integers for ``credits``, ``min``, ``max``, ``expire`` and every counter of
``counters`` (except ``slot``), strings otherwise. The AMQP ``message_id`` is ``id``;
the credit runner remembers accepted ids so that a redelivered event is never counted
twice.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from rbit.errors import DecodeError

#: The commands, in the order the CreditPiggy server applies them within one bulk.
COMMANDS = ("alloc", "counters", "meta", "discard", "claim")


@dataclass(frozen=True)
class CreditEvent:
    """One credit event (one protocol line)."""

    command: str
    args: Mapping[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    time: float = field(default_factory=time.time)

    def to_json(self) -> bytes:
        """The message body."""
        doc = {"id": self.id, "command": self.command, "args": dict(self.args), "time": self.time}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, body: bytes) -> "CreditEvent":
        """Parse a message body; :class:`rbit.errors.DecodeError` if it is not an event."""
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError(f"credit event is not JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise DecodeError("credit event is not a JSON object")
        command, args, event_id = doc.get("command"), doc.get("args"), doc.get("id")
        if command not in COMMANDS:
            raise DecodeError(f"unknown credit command {command!r}")
        if not isinstance(args, dict) or not isinstance(args.get("slot"), str):
            raise DecodeError("credit event has no slot")
        if not isinstance(event_id, str) or not event_id:
            raise DecodeError("credit event has no id")
        when = doc.get("time")
        return cls(command, args, event_id, float(when) if isinstance(when, (int, float)) else 0.0)
