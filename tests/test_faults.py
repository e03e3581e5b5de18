"""Nothing lost: workers killed, broker stopped, poison jobs, resource alarms.

Every test runs real worker processes against the real node; each job's effect is one
line in a record file (tests/fault_runners.py), so "lost" and "duplicated" are counted,
not guessed.
"""

from __future__ import annotations

import json
import random
import time

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
from rabbit import free_port

pytestmark = pytest.mark.fault

QUEUE_TYPES = ["classic", "quorum"]


def _config(tmp_path, rabbit, vhost, runner: dict, queue_type="classic", **kwargs):
    return write_config(tmp_path / "worker.ini", amqp_keys(rabbit, vhost),
                        {"record": tmp_path / "record", **runner},
                        rbit={"queue_type": queue_type, **kwargs.pop("rbit", {})}, **kwargs)


def _start(tmp_path, config, rabbit, vhost, name="worker") -> WorkerProcess:
    worker = WorkerProcess(config, tmp_path / f"{name}.log").start()
    wait_until(lambda: QUEUE in rabbit.list_queues(vhost), 30, "the worker's queue")
    return worker


def _ids(prefix: str, count: int) -> list[str]:
    return [f"{prefix}-{n:05d}" for n in range(count)]


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
def test_worker_killed_five_times_loses_no_job(tmp_path, rabbit, vhost, queue_type):
    prefetch, kills = 10, 5
    config = _config(tmp_path, rabbit, vhost, {
        "runner": "python!fault_runners:record", "sleep": 0.02,
        "concurrency": 4, "prefetch": prefetch}, queue_type)
    worker = _start(tmp_path, config, rabbit, vhost, "worker-0")
    records = Records(tmp_path / "record")
    ids = _ids("job", 2000)
    publisher = Publisher(rabbit.url(vhost))
    publisher.jobs(ids)
    # Kill moments spread over the first three quarters of the run, so that work is left
    # for every worker however fast the previous ones went.
    rng = random.Random(7)  # noqa: S311 - kill moments, not secrets
    moments = sorted(rng.sample(range(200, 1500), kills))
    try:
        for n, moment in enumerate(moments, 1):
            # Each worker gets going before it dies: some runs of its own, past its moment.
            worker.wait_consuming()
            until = max(moment, len(records.lines()) + 20)
            wait_until(lambda m=until: len(records.lines()) >= m, 60, f"{until} runs")
            worker.kill()
            worker = WorkerProcess(config, tmp_path / f"worker-{n}.log").start()
        wait_until(lambda: set(records.count()) >= set(ids), 120, "every job done")
        wait_until(lambda: all_empty(rabbit, vhost), 30, "empty queues")
    finally:
        worker.stop()
        publisher.close()
    done = records.count()
    assert set(done) == set(ids)  # lost = 0
    duplicates = sum(n - 1 for n in done.values())
    assert duplicates <= prefetch * kills


@pytest.mark.slow
@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
def test_broker_outage_mid_run_loses_no_job(tmp_path, rabbit, vhost, queue_type):
    config = _config(tmp_path, rabbit, vhost, {
        "runner": "python!fault_runners:record", "sleep": 0.01,
        "concurrency": 2, "prefetch": 4}, queue_type)
    worker = _start(tmp_path, config, rabbit, vhost)
    records = Records(tmp_path / "record")
    ids = _ids("job", 600)
    publisher = Publisher(rabbit.url(vhost))
    publisher.jobs(ids)
    publisher.close()
    try:
        wait_until(lambda: len(records.lines()) >= 100, 60, "a run under way")
        rabbit.stop_app()
        wait_until(lambda: "connection lost" in worker.text(), 20, "the worker to notice")
        # The outage lasts 10 s; the worker keeps trying to reconnect meanwhile.
        time.sleep(10)  # the outage's length, not a wait for something to happen
        assert worker.alive
        rabbit.start_app()
        wait_until(lambda: set(records.count()) >= set(ids), 120, "every job done")
        wait_until(lambda: all_empty(rabbit, vhost), 30, "empty queues")
        assert "connected to" in worker.text().split("connection lost", 1)[1]
        assert worker.alive
    finally:
        worker.stop()
    assert set(records.count()) == set(ids)


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
def test_poison_job_is_tried_max_retries_plus_one_then_dead(tmp_path, rabbit, vhost,
                                                            queue_type):
    config = _config(tmp_path, rabbit, vhost, {
        "runner": "python!fault_runners:poison", "sleep": 0.03,
        "max_retries": 2, "retry_delay": 0.3, "retry_backoff": 2, "retry_jitter": 0.1},
        queue_type)
    worker = _start(tmp_path, config, rabbit, vhost)
    records = Records(tmp_path / "record")
    publisher = Publisher(rabbit.url(vhost))
    try:
        publisher.jobs(["poison-1"] + _ids("job", 60))
        wait_until(lambda: publisher.channel.queue_declare(f"{QUEUE}.dead", passive=True)
                   .method.message_count == 1, 60, "the poison job in the dead letters")
        wait_until(lambda: len(records.count()) == 60, 60, "the other jobs")
        method, props, _body = publisher.get(f"{QUEUE}.dead")
    finally:
        worker.stop()
        publisher.close()
    tries = records.events("poisoned")
    assert [fields[2] for fields in tries] == ["1", "2", "3"]  # attempt numbers
    assert "cannot digest poison-1" in tries[2][4]  # the last error, seen by the runner
    headers = props.headers
    assert "cannot digest poison-1" in headers["x-rbit-dead-reason"]
    assert "after 3 tries" in headers["x-rbit-dead-reason"]
    assert headers["x-rbit-attempts"] == 3
    assert headers["x-rbit-dead-worker"] == "fault-worker"
    assert headers["x-rbit-dead-time"]
    # Other jobs kept flowing while the poison job waited for its retries.
    order = [fields[1] for fields in records.lines()]
    first, last = order.index("poison-1"), len(order) - 1 - order[::-1].index("poison-1")
    assert any(job.startswith("job-") for job in order[first:last])
    assert set(records.count()) == set(_ids("job", 60))


@pytest.mark.slow
@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
def test_memory_alarm_pauses_publishing_without_deadlock(tmp_path, rabbit, vhost, queue_type):
    gate = tmp_path / "gate"
    config = _config(tmp_path, rabbit, vhost, {
        "runner": "python!fault_runners:gated", "gate": gate, "concurrency": 3,
        "prefetch": 3, "retry_delay": 0.2, "retry_jitter": 0}, queue_type,
        status={"sinks": "amqp, log"})
    worker = _start(tmp_path, config, rabbit, vhost)
    records = Records(tmp_path / "record")
    publisher = Publisher(rabbit.url(vhost))
    watch = publisher.channel.queue_declare("", exclusive=True).method.queue
    publisher.channel.exchange_declare("rbit.status", "topic", durable=True)
    publisher.channel.queue_bind(watch, "rbit.status", "#")
    ids = _ids("job", 3)
    try:
        publisher.jobs(ids)
        wait_until(lambda: len(records.events("start")) == 3, 30, "three jobs started")
        _drain(publisher, watch)
        rabbit.set_memory_alarm(True)
        gate.touch()
        # Every running job ends although neither its status nor its retry can go out.
        wait_until(lambda: len(records.events("failed")) == 3, 30, "the tries to end")
        wait_until(lambda: "broker blocked this connection" in worker.text(), 30,
                   "the worker to see the block")
        assert not records.events("done")
        assert worker.alive
        rabbit.set_memory_alarm(False)
        wait_until(lambda: set(records.count()) == set(ids), 60, "the retries to run")
        wait_until(lambda: all_empty(rabbit, vhost), 30, "empty queues")
        statuses = _drain(publisher, watch)
        for job_id in ids:
            seen = [s for j, s in statuses if j == job_id]
            assert "Waiting" in seen, (job_id, seen)
            assert "Done" in seen, (job_id, seen)
        assert "unblocked" in worker.text()
    finally:
        rabbit.set_memory_alarm(False)
        worker.stop()
        publisher.close()


def _drain(publisher: Publisher, queue: str) -> list[tuple[str, str]]:
    events = []
    while (got := publisher.get(queue)) is not None:
        event = json.loads(got[2])
        events.append((event["job_id"], event["status"]))
    return events


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
def test_other_worker_finishes_everything_when_one_is_killed_mid_job(tmp_path, rabbit, vhost,
                                                                    queue_type):
    config = _config(tmp_path, rabbit, vhost, {
        "runner": "python!fault_runners:long_job", "sleep": 0.3, "prefetch": 2}, queue_type)
    first = _start(tmp_path, config, rabbit, vhost, "first")
    # Two workers of one fleet need two names (a name is held by one worker at a time).
    other = tmp_path / "second.ini"
    other.write_text(config.read_text().replace("name = fault-worker", "name = second", 1))
    second = WorkerProcess(other, tmp_path / "second.log").start()
    records = Records(tmp_path / "record")
    ids = _ids("job", 40)
    publisher = Publisher(rabbit.url(vhost))
    try:
        second.wait_consuming()
        publisher.jobs(ids)
        wait_until(lambda: len(records.events("start")) >= 6, 30, "jobs under way")
        first.kill()
        wait_until(lambda: set(records.count("end")) == set(ids), 60, "every job done")
        wait_until(lambda: all_empty(rabbit, vhost), 30, "empty queues")
        assert second.alive
    finally:
        first.kill()
        second.stop()
        publisher.close()
    started = records.count("start")
    assert max(started.values()) <= 2
    assert sum(started.values()) - len(ids) <= 2  # at most the killed worker's prefetch


def test_failover_skips_a_dead_host(tmp_path, rabbit, vhost):
    config = write_config(
        tmp_path / "failover.ini",
        {"host": f"127.0.0.1:{free_port()}, {rabbit.host}:{rabbit.port}",
         "virtual_host": vhost},
        {"runner": "python!fault_runners:record", "record": tmp_path / "record"})
    worker = _start(tmp_path, config, rabbit, vhost)
    publisher = Publisher(rabbit.url(vhost))
    try:
        publisher.jobs(["job-1", "job-2"])
        records = Records(tmp_path / "record")
        wait_until(lambda: set(records.count()) == {"job-1", "job-2"}, 30, "both jobs")
        assert "cannot connect to 127.0.0.1" in worker.text()
    finally:
        worker.stop()
        publisher.close()


def test_delivery_limit_sends_a_worker_killing_job_to_the_dead_letters(tmp_path, rabbit,
                                                                        vhost):
    limit = 2
    config = _config(tmp_path, rabbit, vhost, {
        "runner": "python!fault_runners:kill_worker", "kill_id": "killer",
        "delivery_limit": limit}, "quorum")
    records = Records(tmp_path / "record")
    worker = _start(tmp_path, config, rabbit, vhost, "worker-0")
    publisher = Publisher(rabbit.url(vhost))
    ids = _ids("job", 5)
    try:
        publisher.jobs(["killer"] + ids)
        restarts = 0
        while set(records.count()) != set(ids):
            wait_until(lambda w=worker: not w.alive or set(records.count()) == set(ids), 30,
                       "the worker to die or finish")
            if not worker.alive:
                restarts += 1
                assert restarts <= limit + 1, "the delivery limit did not stop the job"
                worker = WorkerProcess(config, tmp_path / f"worker-{restarts}.log").start()
        dead = wait_until(lambda: publisher.get(f"{QUEUE}.dead"), 30, "the dead job")
    finally:
        worker.stop()
        publisher.close()
    assert len(records.events("killing")) == limit + 1
    assert dead[1].message_id == "killer"
    assert dead[1].headers["x-first-death-reason"] == "delivery_limit"
    assert queue_totals(rabbit, vhost)[QUEUE] == (0, 0)
