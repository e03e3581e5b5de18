"""Jobs run in worker threads while the I/O thread keeps the connection alive."""

from __future__ import annotations

import json

from worker_helpers import (
    consumer_prefetch,
    run_long_job_on_one_connection,
    running_worker,
    wait_until,
    write_config,
)

QUEUE = "threads"


def test_heartbeats_flow_while_a_long_job_runs_and_it_is_acked_once(
        tmp_path, rabbit, vhost, amqp, out):
    # Heartbeat 2 s: the broker drops a silent connection after about 4 s. The job runs
    # 10 s, as long as the node's consumer_timeout, which the worker is told about so
    # that it renews the delivery's lease in time (see test_long_jobs.py).
    runner = {"runner": "python!worker_runners:count_and_sleep", "seconds": 10,
              "outdir": out}
    config = write_config(tmp_path, rabbit.url(vhost), {QUEUE: runner},
                          rbit={"consumer_timeout": 10}, amqp={"heartbeat": 2})
    run_long_job_on_one_connection(config, rabbit, vhost, amqp, QUEUE, out / "runs", 25)
    assert (out / "runs").read_text().split() == ["long"]


def test_concurrency_runs_jobs_at_once_and_prefetch_follows_it(
        tmp_path, rabbit, vhost, amqp, out):
    runner = {"runner": "python!worker_runners:record_times", "seconds": 2,
              "concurrency": 3, "outdir": out}
    config = write_config(tmp_path, rabbit.url(vhost), {QUEUE: runner})
    with running_worker(config):
        assert consumer_prefetch(rabbit, vhost, QUEUE) == [3]
        amqp.publish_jobs(["a", "b", "c"], exchange="", routing_key=QUEUE)
        wait_until(lambda: len(list(out.glob("*.times"))) == 3, 15, "three jobs")
    times = [json.loads(p.read_text()) for p in out.glob("*.times")]
    assert max(t["start"] for t in times) < min(t["end"] for t in times), times


def test_explicit_prefetch_is_the_consumer_window(tmp_path, rabbit, vhost, out):
    runner = {"runner": "python!worker_runners:succeed", "concurrency": 2, "prefetch": 7,
              "outdir": out}
    config = write_config(tmp_path, rabbit.url(vhost), {QUEUE: runner})
    with running_worker(config):
        assert consumer_prefetch(rabbit, vhost, QUEUE) == [7]
