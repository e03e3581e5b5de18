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
import math
import os
import time
from collections.abc import Mapping
from json.encoder import encode_basestring_ascii as _quote
from typing import Any

from rbit.errors import DecodeError

#: The commands, in the order the CreditPiggy server applies them within one bulk.
COMMANDS = ("alloc", "counters", "meta", "discard", "claim")

# The default encoder only serves json.dumps() with default arguments; compact
# separators would build a new encoder for every event.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def new_event_id() -> str:
    """A fresh event id: 32 random hex digits (the format of ``uuid4().hex``)."""
    return os.urandom(16).hex()


class CreditEvent:
    """One credit event (one protocol line); treat it as immutable.

    Args:
        command: One of :data:`COMMANDS`.
        args: The line's arguments (see the module docstring).
        id: The event id; a fresh one (:func:`new_event_id`) if omitted.
        time: Seconds since the epoch; now if omitted.
    """

    # A plain slotted class: the front door builds one per line, and a frozen
    # dataclass with default factories costs several times as much to construct.
    __slots__ = ("command", "args", "id", "time")

    def __init__(self, command: str, args: Mapping[str, Any], id: str | None = None,  # noqa: A002
                 time: float | None = None) -> None:  # noqa: A002
        self.command = command
        self.args = args
        self.id = new_event_id() if id is None else id
        self.time = _now() if time is None else time

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CreditEvent):
            return NotImplemented
        return (self.command, self.args, self.id, self.time) == (
            other.command, other.args, other.id, other.time)

    __hash__ = None  # type: ignore[assignment]  # args is a mapping: not hashable

    def __repr__(self) -> str:
        return (f"CreditEvent(command={self.command!r}, args={self.args!r}, "
                f"id={self.id!r}, time={self.time!r})")

    def to_json(self) -> bytes:
        """The message body."""
        args = _args_json(self.args)
        if args is None or type(self.time) is not float or not math.isfinite(self.time):
            doc = {"id": self.id, "command": self.command, "args": dict(self.args),
                   "time": self.time}
            return _ENCODER.encode(doc).encode()
        return (f'{{"id":{_quote(self.id)},"command":{_quote(self.command)},'
                f'"args":{args},"time":{self.time!r}}}').encode()

    @classmethod
    def from_json(cls, body: bytes) -> CreditEvent:
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


_now = time.time


def _args_json(args: Mapping[str, Any]) -> str | None:
    """``args`` as compact JSON when it holds only str keys and str or int values.

    Protocol lines only ever give such arguments; anything else (``None`` when it
    is met) goes through the json module.
    """
    parts = []
    for key, value in args.items():
        kind = type(value)
        if type(key) is not str or (kind is not str and kind is not int):
            return None
        parts.append(f"{_quote(key)}:{_quote(value) if kind is str else int.__repr__(value)}")
    return "{" + ",".join(parts) + "}"
