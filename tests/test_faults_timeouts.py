"""Hard timeouts of python! runners, through a real worker."""

from __future__ import annotations

import pytest
from fault_helpers import (
    QUEUE,
    Publisher,
    Records,
    WorkerProcess,
    all_empty,
    amqp_keys,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.fault


def test_job_past_its_timeout_is_killed_and_dead_lettered(tmp_path, rabbit, vhost):
    config = write_config(tmp_path / "worker.ini", amqp_keys(rabbit, vhost), {
        "runner": "python!fault_runners:sleep_long", "record": tmp_path / "record",
        "timeout": 1, "max_retries": 1, "retry_delay": 0.2})
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    publisher = Publisher(rabbit.url(vhost))
    records = Records(tmp_path / "record")
    try:
        wait_until(lambda: QUEUE in rabbit.list_queues(vhost), 30, "the worker's queue")
        publisher.jobs(["slow-1"])
        dead = wait_until(lambda: publisher.get(f"{QUEUE}.dead"), 30, "the dead letter")
        wait_until(lambda: all_empty(rabbit, vhost), 10, "empty queues")
        assert worker.alive
    finally:
        worker.stop()
        publisher.close()
    assert len(records.events("start")) == 2  # tried, timed out, retried once, timed out
    assert "timed out after 1 s" in dead[1].headers["x-rbit-dead-reason"]
    assert "after 2 tries" in dead[1].headers["x-rbit-dead-reason"]


def test_worker_warns_that_a_batch_runner_cannot_be_timed_out(tmp_path, rabbit, vhost):
    config = write_config(tmp_path / "worker.ini", amqp_keys(rabbit, vhost), {
        "runner": "python!runners_for_tests:batch_function", "timeout": 5})
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    try:
        worker.wait_consuming()
        assert "timeout is not enforced for a batch runner" in worker.text()
    finally:
        worker.stop()
