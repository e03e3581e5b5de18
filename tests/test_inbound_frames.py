"""Whole deliveries decoded in one step hand consumers what pika's frame path hands them.

The same bytes, cut at every kind of place, go through pika's own frame path and
through :class:`~rbit.amqp.inbound.FastDeliveries`; the consumer must see the same
deliveries, in the same order, and the connection the same byte and frame counts.
"""

from __future__ import annotations

import random
import struct

import pika
import pytest
from pika import exceptions, frame, spec
from pika.callback import CallbackManager
from pika.channel import Channel, ContentFrameAssembler

from rbit.amqp import inbound
from rbit.amqp.frames import SafeFrames
from rbit.amqp.inbound import FastDeliveries
from rbit.message import UNDECODABLE_HEADER


class PikaPath(SafeFrames, pika.SelectConnection):
    """pika's frame path (with rbit's substitution of undecodable headers)."""


class FastPath(FastDeliveries, SafeFrames, pika.SelectConnection):
    """The one-step path, as rbit's connections have it."""


def _connection(cls: type, seen: list) -> pika.SelectConnection:
    """A connection object with one open channel per number (1 and 2), no socket."""
    connection = object.__new__(cls)
    connection._frame_buffer = b""
    connection.bytes_received = connection.frames_received = 0
    connection.callbacks = CallbackManager()
    connection._heartbeat_checker = None
    connection._channels = {}
    for number in (1, 2):
        channel = object.__new__(Channel)
        channel.channel_number = number
        channel._cancelled = set()
        channel._consumers_with_noack = set()
        channel._content_assembler = ContentFrameAssembler()
        channel._consumers = {
            f"ctag{number}": lambda _ch, method, props, body, n=number: seen.append(
                (n, method.consumer_tag, method.delivery_tag, method.redelivered,
                 method.exchange, method.routing_key, dict(vars(props)), body))}
        connection._channels[number] = channel
    return connection


def _delivery(tag: int, body: bytes, *, channel: int = 1, frame_max: int = 0,
              props: spec.BasicProperties | None = None, routing_key: str | bytes = "q",
              redelivered: bool = False) -> list[bytes]:
    """The frames of one delivery, the body cut into frames of ``frame_max`` bytes."""
    props = props or spec.BasicProperties(delivery_mode=2, content_type="application/json",
                                          message_id=f"job-{tag}",
                                          headers={"x-rbit-attempts": tag % 3, "k": "v"})
    frames = [frame.Method(channel, spec.Basic.Deliver(f"ctag{channel}", tag, redelivered,
                                                       "", routing_key)).marshal(),
              frame.Header(channel, len(body), props).marshal()]
    step = frame_max or max(len(body), 1)
    frames += [frame.Body(channel, body[i:i + step]).marshal()
               for i in range(0, len(body), step)]
    return frames


def _feed(cls: type, chunks: list[bytes]) -> tuple[list, int, int]:
    seen: list = []
    connection = _connection(cls, seen)
    for chunk in chunks:
        connection._on_data_available(chunk)
    return seen, connection.bytes_received, connection.frames_received


def _cut(data: bytes, rng: random.Random, largest: int) -> list[bytes]:
    chunks, at = [], 0
    while at < len(data):
        step = rng.randint(1, largest)
        chunks.append(data[at:at + step])
        at += step
    return chunks


def _same_as_pika(chunks: list[bytes]) -> list:
    fast = _feed(FastPath, chunks)
    assert fast == _feed(PikaPath, chunks)
    return fast[0]


def _stream(count: int = 40) -> bytes:
    frames = []
    for tag in range(1, count + 1):
        body = (b"%d:" % tag) * (tag * 7 % 90)  # some empty, some long
        frames += _delivery(tag, body, frame_max=50 if tag % 5 == 0 else 0,
                            redelivered=tag % 4 == 0,
                            routing_key=b"\xff\xfe" if tag % 9 == 0 else "q")
    return b"".join(frames)


@pytest.mark.parametrize("largest", [1, 7, 64, 300, 4096, 1 << 20])
def test_any_cut_of_the_stream_gives_the_same_deliveries(largest):
    data = _stream()
    seen = _same_as_pika(_cut(data, random.Random(largest), largest))  # noqa: S311
    assert [d[2] for d in seen] == list(range(1, 41))
    assert seen[8][5] == b"\xff\xfe"  # a routing key that is not UTF-8 stays bytes


def test_frames_of_another_channel_between_a_deliverys_frames():
    one = _delivery(1, b"first", channel=1)
    two = _delivery(2, b"second", channel=2)
    heartbeat = frame.Heartbeat().marshal()
    data = b"".join([one[0], two[0], one[1], heartbeat, two[1], one[2], two[2]])
    data += b"".join(_delivery(3, b"third"))
    seen = _same_as_pika([data])
    assert [(d[0], d[2], d[7]) for d in seen] == [(1, 1, b"first"), (2, 2, b"second"),
                                                   (1, 3, b"third")]


def test_headers_pika_cannot_decode_are_substituted_as_on_pikas_path():
    props = spec.BasicProperties(message_id="bad", headers={"t": 1})
    header = bytearray(frame.Header(1, 4, props).marshal())
    # The table's one value becomes a field type pika does not know.
    at = header.index(b"t") + 1
    header[at] = ord("Z")
    frames = _delivery(1, b"body", props=props)
    data = b"".join([frames[0], bytes(header), frames[2]]) + b"".join(_delivery(2, b"next"))
    seen = _same_as_pika([data])
    assert UNDECODABLE_HEADER in seen[0][6]["headers"]
    assert [d[7] for d in seen] == [b"body", b"next"]


def test_a_delivery_for_an_unknown_consumer_reaches_no_consumer():
    frames = _delivery(1, b"lost")
    frames[0] = frame.Method(1, spec.Basic.Deliver("nobody", 1, False, "", "q")).marshal()
    data = b"".join(frames + _delivery(2, b"kept"))
    assert [d[7] for d in _same_as_pika([data])] == [b"kept"]


def test_a_body_longer_than_announced_fails_as_on_pikas_path():
    frames = _delivery(1, b"body")
    frames[1] = frame.Header(1, 2, spec.BasicProperties()).marshal()
    for cls in (PikaPath, FastPath):
        with pytest.raises(exceptions.BodyTooLongError):
            _feed(cls, [b"".join(frames)])


def test_a_bad_frame_end_fails_as_on_pikas_path():
    data = bytearray(b"".join(_delivery(1, b"body")))
    data[-1] = 0
    for cls in (PikaPath, FastPath):
        with pytest.raises(exceptions.InvalidFrameError):
            _feed(cls, [bytes(data)])


def test_a_large_delivery_goes_frame_by_frame_once_the_buffer_is_large():
    body = bytes(range(256)) * 2000  # 512 kB, in 4 kB frames as a broker sends them
    data = b"".join(_delivery(1, body, frame_max=4088) + _delivery(2, b"small"))
    seen = _same_as_pika(_cut(data, random.Random(1), 4096))  # noqa: S311
    assert [len(d[7]) for d in seen] == [len(body), 5]
    assert seen[0][7] == body


def test_a_method_id_is_read_where_pika_reads_it():
    # Basic.Deliver's id with another frame type is no delivery.
    assert struct.unpack(">I", frame.Method(
        1, spec.Basic.Deliver("c", 1, False, "", "q")).marshal()[7:11])[0] == (
        spec.Basic.Deliver.INDEX)


def test_a_whole_delivery_takes_the_one_step_path():
    seen: list = []
    connection = _connection(FastPath, seen)
    connection._frame_buffer = b"".join(_delivery(1, b"body") + _delivery(2, b"more")[:2])
    assert connection._deliver_whole() is inbound._DELIVERED
    # The second one's body is yet to come: it waits, pika would only set frames aside.
    assert connection._deliver_whole() is inbound._WAIT
    assert [d[7] for d in seen] == [b"body"]
