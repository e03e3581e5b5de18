"""CPU time of taking deliveries off the wire: pika's frame path against rbit's one step.

``python bench/frames_micro.py [--n 20000] [--rounds 3]`` feeds the same bytes (N
deliveries shaped like the throughput benchmark's jobs, cut in 4 kB reads as pika's
transport reads them) to a connection with pika's frame path (and rbit's substitution
of undecodable headers) and to one with :class:`rbit.amqp.inbound.FastDeliveries`, up
to a consumer callback that keeps what it got, and checks both handed over the same
deliveries. Prints the best CPU microseconds per delivery (``time.process_time``) of
interleaved rounds: the machine is shared, the minimum is the least disturbed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pika  # noqa: E402
from pika import frame, spec  # noqa: E402
from pika.callback import CallbackManager  # noqa: E402
from pika.channel import Channel, ContentFrameAssembler  # noqa: E402

from bench.throughput import job_body  # noqa: E402
from rbit.amqp.frames import SafeFrames  # noqa: E402
from rbit.amqp.inbound import FastDeliveries  # noqa: E402


class PikaPath(SafeFrames, pika.SelectConnection):
    """pika's frame path, as rbit's connections had it."""


class FastPath(FastDeliveries, SafeFrames, pika.SelectConnection):
    """The one-step path."""


def _connection(cls: type, seen: list) -> pika.SelectConnection:
    connection = object.__new__(cls)  # no socket: fed by hand
    connection._frame_buffer = b""
    connection.bytes_received = connection.frames_received = 0
    connection.callbacks = CallbackManager()
    connection._heartbeat_checker = None
    channel = object.__new__(Channel)
    channel.channel_number = 1
    channel._cancelled = set()
    channel._consumers_with_noack = set()
    channel._content_assembler = ContentFrameAssembler()
    channel._consumers = {"ctag": lambda _ch, method, props, body: seen.append(
        (method.delivery_tag, method.redelivered, props.message_id, body))}
    connection._channels = {1: channel}
    return connection


def _wire(n: int) -> list[bytes]:
    frames = []
    for tag in range(1, n + 1):
        props = spec.BasicProperties(delivery_mode=2, content_type="application/json",
                                     message_id="job-%d" % tag)
        body = job_body(tag)
        frames += [frame.Method(1, spec.Basic.Deliver("ctag", tag, False, "", "q")).marshal(),
                   frame.Header(1, len(body), props).marshal(), frame.Body(1, body).marshal()]
    data = b"".join(frames)
    return [data[i:i + 4096] for i in range(0, len(data), 4096)]


def _run(cls: type, chunks: list[bytes]) -> tuple[float, list]:
    seen: list = []
    connection = _connection(cls, seen)
    start = time.process_time()
    for chunk in chunks:
        connection._on_data_available(chunk)
    return time.process_time() - start, seen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    chunks = _wire(args.n)
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        (pika_s, pika_seen), (fast_s, fast_seen) = _run(PikaPath, chunks), _run(FastPath, chunks)
        if pika_seen != fast_seen or len(fast_seen) != args.n:
            print("the two paths handed over different deliveries", file=sys.stderr)
            return 1
        best["pika"] = min(best.get("pika", pika_s), pika_s)
        best["fast"] = min(best.get("fast", fast_s), fast_s)
    print("CPU us per delivery (best of %d rounds of %d deliveries, 4 kB reads)"
          % (args.rounds, args.n))
    print("  pika's frame path:          %6.2f" % (best["pika"] / args.n * 1e6))
    print("  rbit.amqp.inbound, one step: %6.2f" % (best["fast"] / args.n * 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
