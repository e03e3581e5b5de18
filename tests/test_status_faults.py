"""Status sinks across real outages: the broker for the ``amqp`` sink, the PyBit
front-end for the ``http`` sink.

Statuses reported while their destination is down wait in the sink and go out once it
is back, each job's in the order they were reported, none lost within ``max_pending``.
Jobs are held at a gate per job (tests/fault_runners.py) so that they end while the
destination is down.
"""

from __future__ import annotations

import contextlib
import json
import urllib.parse

import pika
import pytest
from fault_helpers import (
    QUEUE,
    Records,
    WorkerProcess,
    all_empty,
    amqp_keys,
    wait_until,
    write_config,
)
from worker_helpers import Amqp

pytestmark = [pytest.mark.fault, pytest.mark.slow]
IDS = [f"job-{n}" for n in range(4)]


def _worker(tmp_path, rabbit, vhost, status: dict) -> WorkerProcess:
    gates = tmp_path / "gates"
    gates.mkdir()
    config = write_config(
        tmp_path / "worker.ini", amqp_keys(rabbit, vhost),
        {"runner": "python!fault_runners:gated_each", "gate": gates, "first_try": "pass",
         "record": tmp_path / "record", "concurrency": len(IDS), "prefetch": len(IDS)},
        status={"retry_max_delay": 1, **status})
    return WorkerProcess(config, tmp_path / "worker.log").start().wait_consuming()


def _open_gates(tmp_path) -> None:
    for job_id in IDS:
        (tmp_path / "gates" / job_id).touch()


class Watcher:
    """A durable queue bound to the status exchange, read with ``basic_get``; it
    reconnects after the broker was away."""

    def __init__(self, url: str, exchange: str = "rbit.status") -> None:
        self.url = url
        self.client = Amqp(url)
        self.client.channel.exchange_declare(exchange, "topic", durable=True)
        self.client.channel.queue_declare("watch", durable=True)
        self.client.channel.queue_bind("watch", exchange, "#")
        self.events: list[dict] = []

    def drain(self) -> list[dict]:
        try:
            while (got := self.client.channel.basic_get("watch", auto_ack=True))[0]:
                self.events.append(json.loads(got[2]))
        except pika.exceptions.AMQPError:
            self.client = Amqp(self.url)  # the broker was away
        return self.events

    def statuses(self, job_id: str) -> list[str]:
        return [event["status"] for event in self.events if event["job_id"] == job_id]

    def close(self) -> None:
        with contextlib.suppress(pika.exceptions.AMQPError):
            self.client.close()


def test_amqp_statuses_reported_while_the_broker_is_down_arrive_in_order(
        tmp_path, rabbit, vhost):
    watcher = Watcher(rabbit.url(vhost))
    worker = _worker(tmp_path, rabbit, vhost, {"sinks": "log, amqp"})
    records = Records(tmp_path / "record")
    try:
        watcher.client.publish_jobs(IDS, exchange="", routing_key=QUEUE)
        wait_until(lambda: all(watcher.drain() and watcher.statuses(job) == ["Building"]
                               for job in IDS), 30, "every job building")
        watcher.close()
        rabbit.stop_app()
        try:
            _open_gates(tmp_path)  # the jobs end, their Done waits in the sink
            wait_until(lambda: len(records.events("done")) == len(IDS), 30, "the runs' end")
            wait_until(lambda: "status sink: delivery failed" in worker.text(), 30,
                       "the sink to retry")
        finally:
            rabbit.start_app()
        # The broker redelivers the jobs (their acks were lost): each runs again.
        wait_until(lambda: all_empty(rabbit, vhost), 60, "every job acked")
        runs = records.count()

        def all_arrived() -> bool:
            watcher.drain()
            return all(watcher.statuses(job).count("Done") >= runs[job] for job in IDS)

        wait_until(all_arrived, 30, "every Done")
        assert worker.alive
    finally:
        worker.stop()
        watcher.close()
    assert all(n >= 1 for n in runs.values())
    for job in IDS:
        statuses = watcher.statuses(job)
        # The Done reported during the outage comes before the next run's Building.
        assert statuses[:2] == ["Building", "Done"], (job, statuses)
        assert _collapsed(statuses) == ["Building", "Done"] * runs[job], (job, statuses)


def test_http_statuses_reported_while_the_front_end_is_down_arrive_in_order(
        tmp_path, rabbit, vhost, amqp, http_server):
    worker = _worker(tmp_path, rabbit, vhost, {"sinks": "log, http",
                                               "http_url": http_server.url,
                                               "http_timeout": 1})
    records = Records(tmp_path / "record")

    def statuses(job: str) -> list[str]:
        return [urllib.parse.parse_qs(request.body.decode())["status"][0]
                for request in http_server.requests if request.path == f"/job/{job}"]

    try:
        amqp.publish_jobs(IDS, exchange="", routing_key=QUEUE)
        wait_until(lambda: all(statuses(job) == ["Building"] for job in IDS), 30,
                   "every job building")
        http_server.stop()
        _open_gates(tmp_path)
        wait_until(lambda: len(records.events("done")) == len(IDS), 30, "the runs' end")
        wait_until(lambda: "status sink: delivery failed" in worker.text(), 30,
                   "the sink to retry")
        http_server.start()
        wait_until(lambda: all("Done" in statuses(job) for job in IDS), 30, "every Done")
        wait_until(lambda: all_empty(rabbit, vhost), 30, "every job acked")
        assert worker.alive
    finally:
        worker.stop()
    assert records.count() == dict.fromkeys(IDS, 1)
    for job in IDS:
        # PUT is idempotent: a re-sent status is harmless, an overtaking one is not.
        assert _collapsed(statuses(job)) == ["Building", "Done"], (job, statuses(job))


def _collapsed(statuses: list[str]) -> list[str]:
    """The statuses without immediate repeats (re-sends after a failure)."""
    return [status for n, status in enumerate(statuses) if n == 0 or statuses[n - 1] != status]
