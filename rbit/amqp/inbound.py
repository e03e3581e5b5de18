"""Deliveries off the wire: a ``Basic.Deliver`` and its content decoded in one step.

pika turns every frame it reads into an object, then walks it through its connection,
its callback registry, the channel and the channel's content assembler: for a
delivery (a method frame, a content header, a body frame) that is some forty Python
calls before the consumer's callback runs -- as much as all of rbit's own work on a
short job. :class:`FastDeliveries` takes a delivery whose frames are all in the read
buffer, back to back on one channel, decodes it at once (the properties with pika's
own decoder) and calls the consumer's callback just as pika's channel would.

A delivery whose last frames are yet to come waits in the buffer for the next read
(while the buffer is under 128 kB: a larger one goes frame by frame, so a big body is
not copied at every read). Anything else goes pika's way, one frame at a time: another
method, content of several channels interleaved, a frame pika must refuse (a bad
frame end, a body longer than announced), properties pika cannot decode (which
:class:`~rbit.amqp.frames.SafeFrames` then substitutes). pika's own accounting is kept:
bytes and frames received (the heartbeat checker watches the former).

Private pika API: ``Connection._on_data_available``, ``_frame_buffer``, ``_channels``,
``Channel._consumers``, ``_cancelled`` and ``_content_assembler`` (see setup.py's bound
on pika).
"""

from __future__ import annotations

import struct

from pika import frame, spec

_HEAD = struct.Struct(">BHL")  # frame type, channel, payload size
_DELIVER_HEAD = struct.Struct(">BHLI")  # ... and the method id
_CONTENT_HEAD = struct.Struct(">BHLHHQ")  # ... and class, weight, body size
_TAG_BITS = struct.Struct(">QB")  # delivery tag, redelivered bit
_METHOD, _HEADER, _BODY = spec.FRAME_METHOD, spec.FRAME_HEADER, spec.FRAME_BODY
_END = spec.FRAME_END
_DELIVER = spec.Basic.Deliver.INDEX
_BASIC = spec.Basic.INDEX
_Deliver = spec.Basic.Deliver
_Properties = spec.BasicProperties
#: A delivery not yet whole waits for the rest while the buffer is smaller than this;
#: a larger one goes pika's way, frame by frame (its body is not copied at each read).
_WAIT_LIMIT = 128 * 1024
_DELIVERED, _WAIT, _PIKA = object(), object(), object()


def _short_string(data: bytes, offset: int) -> tuple[str | bytes, int]:
    """A short string as pika decodes it: text when it is UTF-8, else the bytes."""
    end = offset + 1 + data[offset]
    value = data[offset + 1:end]
    try:
        return value.decode("utf8"), end
    except UnicodeDecodeError:
        return value, end


class FastDeliveries:
    """Mixin for a pika connection class: whole deliveries decoded in one step.

    Put it before the pika class (and before
    :class:`~rbit.amqp.frames.SafeFrames`, which serves the frames it leaves to pika).
    """

    _frame_buffer: bytes
    _channels: dict
    bytes_received: int
    frames_received: int

    def _on_data_available(self, data_in: bytes) -> None:
        self._frame_buffer += data_in
        while self._frame_buffer:
            taken = self._deliver_whole()
            if taken is _DELIVERED:
                continue
            if taken is _WAIT:
                return
            consumed, value = self._read_frame()
            if not value:
                return
            self._trim_frame_buffer(consumed)
            self._process_frame(value)

    def _deliver_whole(self) -> object:
        """Deliver the delivery at the head of the buffer, if it is whole.

        Returns:
            :data:`_DELIVERED`; :data:`_WAIT` when the rest of a small delivery is yet
            to come (pika would only have kept its first frames aside); or
            :data:`_PIKA`: pika's way for the head frame.
        """
        data = self._frame_buffer
        size = len(data)
        if size < 11:
            return _PIKA  # which waits for the rest of the frame
        kind, channel_number, length, method_id = _DELIVER_HEAD.unpack_from(data, 0)
        if kind != _METHOD or method_id != _DELIVER:
            return _PIKA
        wait = _WAIT if size < _WAIT_LIMIT else _PIKA
        header_at = 8 + length
        if size < header_at + 19:
            return wait
        kind, number, length, class_id, _weight, body_size = _CONTENT_HEAD.unpack_from(
            data, header_at)
        body_at = header_at + 8 + length
        if (kind != _HEADER or number != channel_number or class_id != _BASIC
                or length < 14 or data[header_at - 1] != _END):
            return _PIKA
        if size < body_at:
            return wait
        if data[body_at - 1] != _END:
            return _PIKA
        end, body, frames = _body(data, body_at, channel_number, body_size)
        if body is None:
            return wait if frames else _PIKA
        # No callback is looked for: neither pika nor rbit registers one for
        # Basic.Deliver (pika's channel hands deliveries to its consumers).
        channel = self._channels.get(channel_number)
        if channel is None or channel._content_assembler._method_frame is not None:  # noqa: SLF001
            return _PIKA  # unknown channel, or content of its own half assembled
        try:
            consumer_tag, offset = _short_string(data, 11)
            delivery_tag, bits = _TAG_BITS.unpack_from(data, offset)
            exchange, offset = _short_string(data, offset + 9)
            routing_key, offset = _short_string(data, offset)
            properties = _Properties()
            properties.decode(data[header_at + 19:body_at - 1])
        except Exception:  # noqa: BLE001 -- pika's way, where SafeFrames handles it
            return _PIKA
        if offset != header_at - 1:  # the arguments overran their frame
            return _PIKA
        method = _Deliver(consumer_tag, delivery_tag, bool(bits & 1), exchange, routing_key)
        self._frame_buffer = data[end:]
        self.bytes_received += end
        self.frames_received += frames
        callback = channel._consumers.get(consumer_tag)  # noqa: SLF001
        if callback is None or consumer_tag in channel._cancelled:  # noqa: SLF001
            # Cancelled meanwhile, or unknown: pika's channel knows what to do.
            channel._on_deliver(frame.Method(channel_number, method),  # noqa: SLF001
                                frame.Header(channel_number, body_size, properties), body)
        else:
            callback(channel, method, properties, body)
        return _DELIVERED


def _body(data: bytes, at: int, channel_number: int, body_size: int
          ) -> tuple[int, bytes | None, int]:
    """``(end, body, frames)`` of the body frames at ``at``.

    ``body`` is None when they are not all there: ``frames`` is then 1 if the ones
    there are sound (the rest is to come), 0 if not (pika's way, which refuses them).
    """
    if not body_size:
        return at, b"", 2
    fragments = []
    size = len(data)
    remaining = body_size
    while remaining > 0:
        if size < at + 7:
            return at, None, 1
        kind, number, length = _HEAD.unpack_from(data, at)
        end = at + 8 + length
        if kind != _BODY or number != channel_number or length > remaining:
            return at, None, 0
        if size < end:
            return at, None, 1
        if data[end - 1] != _END:
            return at, None, 0
        fragments.append(data[at + 7:end - 1])
        remaining -= length
        at = end
    frames = 2 + len(fragments)
    return at, fragments[0] if frames == 3 else b"".join(fragments), frames
