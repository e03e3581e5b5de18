"""Connection-level failures: a broker that dies, one that hangs, a dropped connection.

Each test runs a real worker process against the session's node and counts every job's
effect in a record file (tests/fault_runners.py).
"""

from __future__ import annotations

import pytest
from fault_helpers import (
    QUEUE,
    Publisher,
    Records,
    WorkerProcess,
    all_empty,
    amqp_keys,
    queue_totals,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.fault, pytest.mark.slow]

QUEUE_TYPES = ["classic", "quorum"]


def _worker(tmp_path, rabbit, vhost, runner: dict, *extra: str, amqp: dict | None = None,
            queue_type: str = "classic", name: str = "worker") -> WorkerProcess:
    config = write_config(tmp_path / f"{name}.ini", {**amqp_keys(rabbit, vhost), **(amqp or {})},
                          {"record": tmp_path / "record", **runner},
                          rbit={"queue_type": queue_type})
    return WorkerProcess(config, tmp_path / f"{name}.log", *extra).start().wait_consuming()


def _publish(rabbit, vhost, ids: list[str]) -> None:
    publisher = Publisher(rabbit.url(vhost))
    try:
        publisher.jobs(ids)
    finally:
        publisher.close()


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
def test_broker_killed_with_sigkill_and_restarted_loses_no_job(tmp_path, rabbit, vhost,
                                                               queue_type):
    worker = _worker(tmp_path, rabbit, vhost, {
        "runner": "python!fault_runners:record", "sleep": 0.01, "concurrency": 2,
        "prefetch": 4}, queue_type=queue_type)
    records = Records(tmp_path / "record")
    ids = [f"job-{n:04d}" for n in range(400)]
    _publish(rabbit, vhost, ids)
    try:
        wait_until(lambda: len(records.lines()) >= 50, 60, "a run under way")
        rabbit.kill_vm()  # no goodbye to anyone: sockets reset, nothing flushed
        wait_until(lambda: "connection lost" in worker.text(), 30, "the worker to notice")
        assert worker.alive
        rabbit.restart()
        wait_until(lambda: set(records.count()) >= set(ids), 120, "every job done")
        wait_until(lambda: all_empty(rabbit, vhost), 30, "empty queues")
        assert "connected to" in worker.text().split("connection lost", 1)[1]
        assert worker.alive
    finally:
        worker.stop()
    assert set(records.count()) == set(ids)


def test_frozen_broker_is_noticed_within_the_poll_time(tmp_path, rabbit, vhost):
    # The config asks for a 60 s heartbeat; --poll-time 2 must cap it, so the worker sees
    # the frozen broker long before a 60 s heartbeat would.
    worker = _worker(tmp_path, rabbit, vhost, {
        "runner": "python!fault_runners:record", "sleep": 0.01, "concurrency": 2,
        "prefetch": 4}, "--poll-time", "2", amqp={"heartbeat": 60})
    records = Records(tmp_path / "record")
    ids = [f"job-{n:04d}" for n in range(300)]
    _publish(rabbit, vhost, ids)
    pid = None
    try:
        wait_until(lambda: len(records.lines()) >= 30, 60, "a run under way")
        pid = rabbit.freeze()
        wait_until(lambda: "connection lost" in worker.text(), 20,
                   "the worker to notice the frozen broker")
        rabbit.thaw(pid)
        wait_until(lambda: set(records.count()) >= set(ids), 120, "every job done")
        wait_until(lambda: all_empty(rabbit, vhost), 30, "empty queues")
        assert worker.alive
    finally:
        if pid is not None:
            rabbit.thaw(pid)
        worker.stop()
    assert set(records.count()) == set(ids)


def test_connection_closed_while_a_job_runs_drops_the_stale_ack(tmp_path, rabbit, vhost):
    # The first run outlives its connection; its ack belongs to a channel that is gone.
    # The broker delivers the job again at once (the second run sleeps longer), and the
    # first run's ack must not settle that second delivery while it still runs.
    worker = _worker(tmp_path, rabbit, vhost, {
        "runner": "python!fault_runners:slow_when_redelivered", "sleep": 3,
        "sleep_redelivered": 6, "concurrency": 2, "prefetch": 2})
    records = Records(tmp_path / "record")
    try:
        _publish(rabbit, vhost, ["job-1"])
        wait_until(lambda: records.events("start"), 30, "the first run")
        rabbit.close_connections(vhost)
        wait_until(lambda: len(records.events("start")) == 2, 30, "the redelivery to run")
        assert records.events("start")[1][3] == "1"  # redelivered
        wait_until(lambda: records.events("end"), 30, "the first run to end")
        assert len(records.events("end")) == 1
        # The second run is still going: its delivery must still be unacked.
        assert queue_totals(rabbit, vhost)[QUEUE] == (0, 1), "the stale ack settled it"
        wait_until(lambda: len(records.events("end")) == 2, 30, "the second run to end")
        wait_until(lambda: queue_totals(rabbit, vhost)[QUEUE] == (0, 0), 30, "the ack")
        assert worker.alive
    finally:
        worker.stop()
    assert records.count("start") == {"job-1": 2}  # ran twice at most
    assert records.count("end") == {"job-1": 2}
    assert worker.text().count("connected to") == 2  # one drop, one reconnect
