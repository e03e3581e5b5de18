"""The Celery contender: a noop task on the benchmark's queue.

Worker: ``celery -A bench.celery_app worker --pool solo ...`` with ``BENCH_URL`` and
``BENCH_QUEUE`` set. ``python -m bench.celery_app publish N`` sends N jobs with the
app's own ``send_task`` (Celery's message format), before the worker starts.
"""

from __future__ import annotations

import json
import os
import sys

from celery import Celery

from bench.bench_runners import tick

QUEUE = os.environ.get("BENCH_QUEUE", "bench")

app = Celery("bench", broker=os.environ.get("BENCH_URL", "amqp://guest:guest@localhost//"))
app.conf.update(
    task_default_queue=QUEUE,
    task_acks_late=True,
    task_ignore_result=True,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH", "100")),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.noop")
def noop(job) -> None:
    tick()


def publish(count: int, body: bytes) -> None:
    job = json.loads(body)
    with app.producer_or_acquire() as producer:
        for _ in range(count):
            app.send_task("bench.noop", args=[job], queue=QUEUE, producer=producer)


if __name__ == "__main__":
    publish(int(sys.argv[2]), sys.argv[3].encode())
