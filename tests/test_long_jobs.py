"""Jobs that run longer than the broker's delivery-ack timeout (``consumer_timeout``).

The test node's ``consumer_timeout`` is 10 s (tests/rabbit.py). RabbitMQ checks it on
every channel tick, once a minute by default; the test node (tests/rabbit.py) makes
the tick one second, so a delivery held past 10 s really closes its channel.
"""

from __future__ import annotations

import time

import pika
import pytest
from fault_helpers import (
    QUEUE,
    Publisher,
    Records,
    WorkerProcess,
    amqp_keys,
    queue_totals,
    wait_until,
    write_config,
)
from rabbit import CONSUMER_TIMEOUT_MS

pytestmark = [pytest.mark.slow, pytest.mark.fault]
CONSUMER_TIMEOUT = CONSUMER_TIMEOUT_MS / 1000


@pytest.fixture
def precise_consumer_timeout(rabbit):
    """The test node ticks channels every second (tests/rabbit.py), so the consumer
    timeout fires when due rather than up to a minute later."""
    assert "1000" in rabbit.ctl("eval", "application:get_env(rabbit, channel_tick_interval).")


def _config(tmp_path, rabbit, vhost, sleep: float):
    return write_config(
        tmp_path / "worker.ini", amqp_keys(rabbit, vhost),
        {"runner": "python!fault_runners:long_job", "record": tmp_path / "record",
         "sleep": sleep},
        rbit={"consumer_timeout": CONSUMER_TIMEOUT})


def _start(tmp_path, config, rabbit, vhost, name="worker.log") -> WorkerProcess:
    worker = WorkerProcess(config, tmp_path / name, "--debug").start()
    wait_until(lambda: QUEUE in rabbit.list_queues(vhost), 30, "the worker's queue")
    return worker


def test_node_closes_the_channel_of_a_delivery_held_past_consumer_timeout(
        rabbit, vhost, precise_consumer_timeout):
    connection = pika.BlockingConnection(pika.URLParameters(rabbit.url(vhost)))
    channel = connection.channel()
    channel.queue_declare("held")
    channel.basic_publish("", "held", b"x")
    assert channel.basic_get("held")[0] is not None
    started = time.monotonic()
    while channel.is_open and time.monotonic() - started < CONSUMER_TIMEOUT + 15:
        connection.process_data_events(0.5)
    held_for = time.monotonic() - started
    assert not channel.is_open
    assert CONSUMER_TIMEOUT - 1 <= held_for <= CONSUMER_TIMEOUT + 5
    connection.close()


def test_job_longer_than_consumer_timeout_runs_once_and_is_acked(
        tmp_path, rabbit, vhost, precise_consumer_timeout):
    config = _config(tmp_path, rabbit, vhost, sleep=2.5 * CONSUMER_TIMEOUT)
    worker = _start(tmp_path, config, rabbit, vhost)
    publisher = Publisher(rabbit.url(vhost))
    try:
        publisher.jobs(["long-1"])
        records = Records(tmp_path / "record")
        wait_until(lambda: records.count("end"), 3.5 * CONSUMER_TIMEOUT + 20, "the job's end")
        wait_until(lambda: all(c == (0, 0) for c in queue_totals(rabbit, vhost).values()),
                   15, "empty queues")
        assert records.count("start") == {"long-1": 1}
        assert records.count("end") == {"long-1": 1}
        assert any(".held." in name for name in queue_totals(rabbit, vhost))
        log = worker.text()
        assert "renewing its lease" in log
        assert "PRECONDITION_FAILED" not in log
        assert "connection lost" not in log
        assert worker.alive
    finally:
        publisher.close()
        worker.stop()


def test_long_job_of_a_killed_worker_comes_back_and_runs_again(
        tmp_path, rabbit, vhost, precise_consumer_timeout):
    config = _config(tmp_path, rabbit, vhost, sleep=1.2 * CONSUMER_TIMEOUT)
    first = _start(tmp_path, config, rabbit, vhost, "first.log")
    publisher = Publisher(rabbit.url(vhost))
    records = Records(tmp_path / "record")
    try:
        publisher.jobs(["long-2"])

        def held() -> bool:
            return any(".held." in name and counts == (0, 1)
                       for name, counts in queue_totals(rabbit, vhost).items())

        wait_until(held, CONSUMER_TIMEOUT + 10, "a held copy of the job")
        first.kill()
        assert not records.count("end")
        second = _start(tmp_path, config, rabbit, vhost, "second.log")
        try:
            wait_until(lambda: records.count("end"), 3 * CONSUMER_TIMEOUT + 20, "the rerun")
            starts = records.events("start")
            assert [fields[1] for fields in starts] == ["long-2", "long-2"]
            assert starts[1][3] == "1"  # the rerun knows it may have run before
            assert records.count("end") == {"long-2": 1}
            wait_until(lambda: all(c == (0, 0) for c in queue_totals(rabbit, vhost).values()),
                       15, "empty queues")
            assert "PRECONDITION_FAILED" not in second.text()
        finally:
            second.stop()
    finally:
        publisher.close()
        first.kill()


def test_several_long_jobs_and_prefetched_ones_each_run_once(
        tmp_path, rabbit, vhost, precise_consumer_timeout):
    config = write_config(
        tmp_path / "worker.ini", amqp_keys(rabbit, vhost),
        {"runner": "python!fault_runners:long_job", "record": tmp_path / "record",
         "sleep": 0.7 * CONSUMER_TIMEOUT, "concurrency": 3, "prefetch": 6},
        rbit={"consumer_timeout": CONSUMER_TIMEOUT})
    worker = _start(tmp_path, config, rabbit, vhost)
    publisher = Publisher(rabbit.url(vhost))
    ids = [f"long-{n}" for n in range(6)]
    records = Records(tmp_path / "record")
    try:
        # Three run at once; three wait in the prefetch window past the timeout.
        publisher.jobs(ids)
        wait_until(lambda: set(records.count("end")) == set(ids), 4 * CONSUMER_TIMEOUT,
                   "every job's end")
        wait_until(lambda: all(c == (0, 0) for c in queue_totals(rabbit, vhost).values()),
                   15, "empty queues")
        assert records.count("start") == dict.fromkeys(ids, 1)
        assert records.count("end") == dict.fromkeys(ids, 1)
        log = worker.text()
        assert "PRECONDITION_FAILED" not in log
        assert "connection lost" not in log
        assert "it will run again" not in log
    finally:
        publisher.close()
        worker.stop()
