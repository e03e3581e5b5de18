"""The Dramatiq contender: a noop actor on the benchmark's queue.

Worker: ``dramatiq bench.dramatiq_app --processes 1 --threads T`` with ``BENCH_URL``,
``BENCH_QUEUE`` and ``dramatiq_queue_prefetch`` set. ``python -m bench.dramatiq_app
publish N BODY`` sends N jobs with ``actor.send`` (Dramatiq's message format), before
the worker starts.
"""

from __future__ import annotations

import json
import os
import sys

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from bench.bench_runners import tick

broker = RabbitmqBroker(url=os.environ.get("BENCH_URL", "amqp://guest:guest@localhost//"))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=os.environ.get("BENCH_QUEUE", "bench"), max_retries=0)
def noop(job) -> None:
    tick()


def publish(count: int, body: bytes) -> None:
    job = json.loads(body)
    for _ in range(count):
        noop.send(job)
    broker.close()


if __name__ == "__main__":
    publish(int(sys.argv[2]), sys.argv[3].encode())
