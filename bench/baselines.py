"""The hand-written pika loops rbit is measured against.

``python -m bench.baselines consume URL QUEUE``: a BlockingConnection consumer with
prefetch 100 that acks every 10th delivery with ``multiple=True`` (and the last one),
doing no work but :func:`bench.bench_runners.tick`.

``python -m bench.baselines spawn URL QUEUE``: takes one message at a time (prefetch
1, like rbit's default for a concurrency-1 section), runs ``/bin/true`` with
``subprocess.run`` and acks it.

Both run until killed.
"""

from __future__ import annotations

import subprocess
import sys

import pika

from bench.bench_runners import tick

PREFETCH = 100
ACK_EVERY = 10


def consume(url: str, queue: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=PREFETCH)
    pending = 0

    def on_message(ch, method, _props, _body) -> None:
        nonlocal pending
        last = tick()
        pending += 1
        if pending >= ACK_EVERY or last:
            ch.basic_ack(method.delivery_tag, multiple=True)
            pending = 0

    channel.basic_consume(queue, on_message)
    channel.start_consuming()


def spawn(url: str, queue: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=1)

    def on_message(ch, method, _props, _body) -> None:
        subprocess.run(["/bin/true"], check=False)
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume(queue, on_message)
    channel.start_consuming()


if __name__ == "__main__":
    mode, url, queue = sys.argv[1:4]
    {"consume": consume, "spawn": spawn}[mode](url, queue)
