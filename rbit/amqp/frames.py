"""Content headers on the wire: decoding a publisher's, fitting rbit's copies in a frame.

Whatever a publisher puts in a message's properties reaches pika's frame decoder
first. A header table pika cannot decode (nested thousands of tables deep, a double
that is NaN, a timestamp out of range, a truncated field...) raised inside pika's
read loop: the connection failed, the broker redelivered the message, and the cycle
began again, stopping every queue of the worker. :class:`SafeFrames` catches the
failure for content-header frames only and substitutes the properties decoded
without the header table, with :data:`~rbit.message.UNDECODABLE_HEADER` as the only
header, set to the reason. The delivery then reaches rbit, which sends it to the dead
letters with that reason and the body kept. A frame that is broken beyond that (a bad
frame end, an unknown frame type) is a protocol error and still ends the connection.

Going out, a copy of a delivery (retry, dead letter, held copy) carries the original's
headers plus rbit's, which may no longer fit the negotiated ``frame_max`` (the broker
would close the connection) or hold a value pika cannot encode. :func:`fit` checks the
copy first; when it cannot go out whole, the copy is *trimmed*: same body and
properties, but only rbit's own headers and :data:`TRIMMED_HEADER` with the reason;
if that does not fit either, the same headers with no other property than the
delivery mode; and as the last resort (always small enough: it holds only bounded
text of rbit's) the body with the delivery mode and :data:`TRIMMED_HEADER` alone. So
every copy is published and its delivery settled, never refused in a loop.

Private pika API: ``Connection._read_frame`` and ``_frame_buffer`` (see setup.py's
bound on pika).
"""

from __future__ import annotations

import dataclasses
import logging
import struct
from typing import Any

from pika import frame, spec

from rbit.amqp.records import Publish
from rbit.message import UNDECODABLE_HEADER
from rbit.safetext import escape

log = logging.getLogger(__name__)

#: Header on a copy published without the original's headers, set to the reason.
TRIMMED_HEADER = "x-rbit-trimmed"
_MAX_REASON = 300
_HEADER_OVERHEAD = spec.FRAME_HEADER_SIZE + spec.FRAME_END_SIZE + 12  # class, weight, size


class SafeFrames:
    """Mixin for a pika connection class: undecodable content headers are substituted.

    Put it before the pika class: ``class C(SafeFrames, pika.SelectConnection)``.
    """

    _frame_buffer: bytes

    def _read_frame(self) -> tuple[int, Any]:
        try:
            return frame.decode_frame(self._frame_buffer)
        except Exception as exc:  # noqa: BLE001 -- any failure of a publisher's properties
            substitute = _header_without_table(self._frame_buffer, exc)
            if substitute is None:
                raise
            return substitute


def _header_without_table(data: bytes, exc: BaseException) -> tuple[int, frame.Header] | None:
    """The content-header frame at the start of ``data``, decoded without its headers."""
    try:
        frame_type, channel, size = struct.unpack_from(">BHL", data, 0)
        end = spec.FRAME_HEADER_SIZE + size + spec.FRAME_END_SIZE
        if frame_type != spec.FRAME_HEADER or data[end - 1:end] != bytes((spec.FRAME_END,)):
            return None
        payload = data[spec.FRAME_HEADER_SIZE:end - 1]
        class_id, _weight, body_size = struct.unpack_from(">HHQ", payload, 0)
        if class_id != spec.Basic.INDEX:
            return None
    except (struct.error, IndexError):
        return None
    reason = escape(f"headers cannot be decoded: {type(exc).__name__}: {exc}", _MAX_REASON)
    properties = _properties_without_table(payload[12:])
    properties.headers = {UNDECODABLE_HEADER: reason}
    log.warning("channel %d: a message's %s; delivered without them", channel, reason)
    return end, frame.Header(channel, body_size, properties)


def _properties_without_table(encoded: bytes) -> spec.BasicProperties:
    """Basic properties decoded with the header table skipped (or none, if need be)."""
    properties = spec.BasicProperties()
    try:
        flags, = struct.unpack_from(">H", encoded, 0)
        if flags & 1:  # a second flag word: none is defined for Basic
            return properties
        offset = 2
        for flag in (spec.BasicProperties.FLAG_CONTENT_TYPE,
                     spec.BasicProperties.FLAG_CONTENT_ENCODING):
            if flags & flag:
                offset += 1 + encoded[offset]
        if flags & spec.BasicProperties.FLAG_HEADERS:
            table_size, = struct.unpack_from(">I", encoded, offset)
            rest = encoded[offset + 4 + table_size:]
            flags &= ~spec.BasicProperties.FLAG_HEADERS
            encoded = struct.pack(">H", flags) + encoded[2:offset] + rest
        properties.decode(encoded)
    except Exception:  # noqa: BLE001 -- the other properties are broken too: drop them
        properties = spec.BasicProperties()
    return properties


def unfit(properties: spec.BasicProperties, frame_max: int) -> str | None:
    """Why a message with these properties cannot be published, or None if it can."""
    try:
        size = sum(len(piece) for piece in properties.encode()) + _HEADER_OVERHEAD
    except Exception as exc:  # noqa: BLE001 -- whatever pika's encoder refuses
        return escape(f"headers cannot be encoded: {type(exc).__name__}: {exc}", _MAX_REASON)
    if size > frame_max:
        return f"headers take {size} bytes, more than a frame ({frame_max})"
    return None


def fit(message: Publish, properties: dict[str, Any], frame_max: int
        ) -> tuple[Publish, spec.BasicProperties]:
    """The copy to publish and its properties, trimmed if it cannot go out whole.

    Args:
        message: A copy of a delivery (its ``trimmed_headers`` set).
        properties: Its AMQP properties, headers included.
        frame_max: The connection's negotiated frame size.

    Returns:
        ``(message, properties)`` as they will be published.
    """
    props = spec.BasicProperties(**properties)
    reason = unfit(props, frame_max)
    if reason is None:
        return message, props
    log.warning("copy for %s: %s; published with rbit's headers only",
                escape(message.routing_key), reason)
    headers = {**(message.trimmed_headers or {}), TRIMMED_HEADER: reason}
    mode = properties.get("delivery_mode")
    for candidate in ({**properties, "headers": headers},
                      {"headers": headers, "delivery_mode": mode}):
        props = spec.BasicProperties(**candidate)
        if unfit(props, frame_max) is None:
            return dataclasses.replace(message, headers=headers), props
    headers = {TRIMMED_HEADER: reason}
    props = spec.BasicProperties(headers=headers, delivery_mode=mode)
    return dataclasses.replace(message, headers=headers, properties={}), props
