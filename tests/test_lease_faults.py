"""Long-job leases at their edges: a renewal cut by a dropped connection, a worker
stalled past the hold TTL, a holding queue that expires, quorum delivery counts.

A renewal (rbit/amqp/leases.py) publishes a copy of the held job to the worker's
holding queue, acks the delivery once the copy is confirmed, and takes the copy back
with ``basic_get``. The test node's ``consumer_timeout`` is 10 s (tests/rabbit.py) and
its channels tick every second, so a delivery held too long really closes its channel.
Every job id is counted in a record file (tests/fault_runners.py): ``start`` and
``end`` per run.
"""

from __future__ import annotations

import json
import os
import re
import signal
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
from rabbit import CONSUMER_TIMEOUT_MS
from tcp_proxy import Proxy

pytestmark = [pytest.mark.fault, pytest.mark.slow]
CONSUMER_TIMEOUT = CONSUMER_TIMEOUT_MS / 1000
# A long heartbeat: the tests hold the broker's bytes back for seconds, which must not
# look like a dead broker to the worker.
QUIET = {"heartbeat": 30}
RENEWING = re.compile(r"renewing its lease through (\S+)")


def _worker(tmp_path, amqp: dict, runner: dict, name: str = "worker", *,
            rbit: dict | None = None) -> WorkerProcess:
    config = write_config(
        tmp_path / f"{name}.ini", amqp,
        {"runner": "python!fault_runners:long_job", "record": tmp_path / "record", **runner},
        rbit={"consumer_timeout": CONSUMER_TIMEOUT, "polling_time": 30, **(rbit or {})})
    return WorkerProcess(config, tmp_path / f"{name}.log", "--debug").start().wait_consuming()


def _held(rabbit, vhost) -> dict[str, tuple[int, int]]:
    return {name: counts for name, counts in queue_totals(rabbit, vhost).items()
            if ".held." in name}


def _renewed(rabbit, vhost) -> str | None:
    """The holding queue once it holds the job's copy and the original is acked."""
    totals = queue_totals(rabbit, vhost)
    held = [name for name, counts in totals.items() if ".held." in name and counts == (0, 1)]
    return held[0] if held and totals[QUEUE] == (0, 0) else None


def _ready(publisher: Publisher, queue: str) -> int:
    """Messages ready in ``queue`` (a passive declare: quicker than rabbitmqctl)."""
    return publisher.channel.queue_declare(queue, passive=True).method.message_count


def _every_run_ended(records: Records) -> bool:
    return bool(records.count("end")) and records.count("end") == records.count("start")


def test_connection_dropped_mid_renewal_runs_the_job_again_and_loses_nothing(
        tmp_path, rabbit, vhost):
    proxy = Proxy((rabbit.host, rabbit.port))
    amqp = {"host": f"127.0.0.1:{proxy.port}", "virtual_host": vhost, **QUIET}
    worker = _worker(tmp_path, amqp, {"sleep": 1.3 * CONSUMER_TIMEOUT, "concurrency": 3,
                                      "prefetch": 3})
    publisher = Publisher(rabbit.url(vhost))
    records = Records(tmp_path / "record")
    try:
        publisher.jobs(["long-1"])
        hold = wait_until(lambda: _renewed(rabbit, vhost), CONSUMER_TIMEOUT + 20,
                          "the first renewal")
        # The next renewal's copy reaches the holding queue; its confirm never comes
        # back, and the connection breaks between the copy and the ack.
        proxy.hold_from_broker()
        wait_until(lambda: _ready(publisher, hold) == 1, CONSUMER_TIMEOUT, "the new copy")
        proxy.sever()
        # Both copies come back to the work queue and run again; nothing is lost.
        wait_until(lambda: len(records.events("start")) >= 2 and _every_run_ended(records)
                   and all_empty(rabbit, vhost), 3 * CONSUMER_TIMEOUT + 20, "every run ended")
        assert worker.alive
    finally:
        worker.stop()
        publisher.close()
        proxy.close()
    starts = records.events("start")
    assert 2 <= len(starts) <= 3, starts  # the first run and one rerun per copy at most
    assert all(fields[3] == "1" for fields in starts[1:])  # the reruns know
    text = worker.text()
    assert "connection lost" in text
    assert "PRECONDITION_FAILED" not in text


def _holding_queue(worker: WorkerProcess) -> str | None:
    """The holding queue, once a second renewal began (the first one declared it)."""
    names = RENEWING.findall(worker.text())
    return names[0] if len(names) >= 2 else None


def _stays(predicate, seconds: float, *, until: bool = False) -> bool:
    """Whether ``predicate`` holds throughout ``seconds`` (polled); with ``until``,
    whether it comes true within them."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if bool(predicate()) is until:
            return until
        time.sleep(0.05)  # polling over a span that is the point (bounded)
    return bool(predicate())


def _rbit_lines(worker: WorkerProcess) -> str:
    return "\n".join(line for line in worker.text().splitlines() if " pika." not in line)


def _freeze_with_a_confirm_held(proxy: Proxy, publisher: Publisher, hold: str,
                                pid: int) -> None:
    """SIGSTOP the worker while a renewal's copy waits in ``hold`` for its confirm.

    The hold may start while a renewal is already past its confirm (its copy is taken
    back within milliseconds) or waiting for its ``basic_get`` (no copy comes): then
    the worker is let go and the next renewal is tried.
    """
    for _ in range(5):
        proxy.hold_from_broker()
        if _stays(lambda: _ready(publisher, hold) == 1, 3, until=True):
            os.kill(pid, signal.SIGSTOP)
            # Stopped: a copy still there after a while is one the worker cannot take.
            if _stays(lambda: _ready(publisher, hold) == 1, 0.5):
                return
            os.kill(pid, signal.SIGCONT)
        proxy.release()
    raise AssertionError("no renewal was caught waiting for its confirm")


def test_worker_stalled_past_the_hold_ttl_runs_the_job_again_and_loses_nothing(
        tmp_path, rabbit, vhost):
    # Renewals every second (the worker's consumer_timeout is 2 s), so that the broker's
    # 10 s timeout is far off while the worker stalls past the 5 s hold TTL. The first
    # run lasts until the gate opens; the rerun finds it open.
    proxy = Proxy((rabbit.host, rabbit.port))
    amqp = {"host": f"127.0.0.1:{proxy.port}", "virtual_host": vhost, **QUIET}
    gate = tmp_path / "gate"
    worker = _worker(tmp_path, amqp, {"gate": gate}, rbit={"consumer_timeout": 2})
    publisher = Publisher(rabbit.url(vhost))
    records = Records(tmp_path / "record")
    try:
        publisher.jobs(["long-1"])
        hold = wait_until(lambda: _holding_queue(worker), 30, "a second renewal")
        # Freeze the worker between the copy and the ack: its confirm is held, the
        # worker stopped, then the confirm let through to a worker that cannot read it.
        _freeze_with_a_confirm_held(proxy, publisher, hold, worker.proc.pid)
        try:
            proxy.release()
            wait_until(lambda: _ready(publisher, hold) == 0, 15, "the copy to expire")
        finally:
            os.kill(worker.proc.pid, signal.SIGCONT)
        try:
            wait_until(lambda: "it will run again" in worker.text(), 20, "the worker to notice")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the worker logged:\n{_rbit_lines(worker)}") from None
        gate.touch()
        wait_until(lambda: len(records.events("start")) == 2 and _every_run_ended(records)
                   and all_empty(rabbit, vhost), 40, "the rerun to end")
        assert worker.alive
    finally:
        worker.stop()
        publisher.close()
        proxy.close()
    starts = records.events("start")
    assert [fields[1] for fields in starts] == ["long-1", "long-1"]
    assert starts[1][3] == "1"  # the rerun knows it may have run before
    assert "PRECONDITION_FAILED" not in worker.text()


def test_a_dead_workers_holding_queue_expires_after_its_copy_went_back(
        tmp_path, rabbit, vhost):
    # Holding queues delete themselves an hour after their worker is gone; a policy
    # makes it 8 s here (the lower of policy and argument wins). It must still outlive
    # the 5 s hold TTL, so that the copy is back in the work queue first.
    rabbit.ctl("set_policy", "-p", vhost, "--apply-to", "queues", "short-hold",
               f"^{QUEUE}\\.held\\.", json.dumps({"expires": 8000}))
    amqp = amqp_keys(rabbit, vhost)
    first = _worker(tmp_path, amqp, {"sleep": 1.5 * CONSUMER_TIMEOUT}, "first")
    publisher = Publisher(rabbit.url(vhost))
    records = Records(tmp_path / "record")
    second = None
    try:
        publisher.jobs(["long-1"])
        hold = wait_until(lambda: _renewed(rabbit, vhost), CONSUMER_TIMEOUT + 20,
                          "a held copy")
        first.kill()
        wait_until(lambda: hold not in queue_totals(rabbit, vhost), 30,
                   "the dead worker's holding queue to expire")
        assert queue_totals(rabbit, vhost)[QUEUE] == (1, 0)  # the copy is back, not lost
        second = _worker(tmp_path, amqp, {"sleep": 1.5 * CONSUMER_TIMEOUT}, "second")
        wait_until(lambda: records.count("end") and all_empty(rabbit, vhost),
                   2 * CONSUMER_TIMEOUT + 20, "the rerun to end")
    finally:
        first.kill()
        if second is not None:
            second.stop()
        publisher.close()
    starts = records.events("start")
    assert [fields[1] for fields in starts] == ["long-1", "long-1"]
    assert starts[1][3] == "1"
    assert records.count("end") == {"long-1": 1}
    # The live worker's holding queue, used at each renewal, did not expire under it.
    assert second.text().count("renewing its lease") >= 2
    assert "it will run again" not in second.text()
    assert "PRECONDITION_FAILED" not in second.text()


def test_a_held_job_burns_no_quorum_deliveries(tmp_path, rabbit, vhost):
    # Renewed three times on a quorum queue that dead-letters after two redeliveries:
    # the renewals ack and take a copy from the holding queue, so none counts. A lease
    # is renewed once held consumer_timeout / 2, and the leases are looked at every
    # consumer_timeout / 10: each renewal comes 0.5 to 0.6 consumer_timeout after the
    # one before, the third as late as 1.8 consumer_timeout. The job runs 2.5.
    worker = _worker(tmp_path, amqp_keys(rabbit, vhost),
                     {"sleep": 2.5 * CONSUMER_TIMEOUT, "delivery_limit": 2},
                     rbit={"queue_type": "quorum"})
    publisher = Publisher(rabbit.url(vhost))
    records = Records(tmp_path / "record")
    try:
        publisher.jobs(["long-1"])
        wait_until(lambda: records.count("end") and all_empty(rabbit, vhost),
                   2 * CONSUMER_TIMEOUT + 30, "the job's end")
        assert publisher.get(f"{QUEUE}.dead") is None
        assert worker.alive
    finally:
        worker.stop()
        publisher.close()
    assert records.count("start") == {"long-1": 1}
    assert records.count("end") == {"long-1": 1}
    assert worker.text().count("renewing its lease") >= 3


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_memory_alarm_longer_than_consumer_timeout_loses_no_job(tmp_path, rabbit, vhost,
                                                                queue_type):
    # Long jobs under a memory alarm: their renewals cannot publish the copy (the broker
    # blocks the connection), so the broker's delivery-ack timeout ends the hold and the
    # broker requeues them. The copy that waited in the worker may still be stored once
    # the alarm clears: one more run, never a loss.
    ids = ["long-1", "long-2", "long-3"]
    worker = _worker(tmp_path, amqp_keys(rabbit, vhost),
                     {"sleep": 1.2 * CONSUMER_TIMEOUT, "concurrency": 3, "prefetch": 3},
                     rbit={"queue_type": queue_type})
    publisher = Publisher(rabbit.url(vhost))
    records = Records(tmp_path / "record")
    try:
        publisher.jobs(ids)
        wait_until(lambda: len(records.events("start")) == 3, 30, "the jobs running")
        rabbit.set_memory_alarm(True)
        try:
            wait_until(lambda: "acknowledgement on channel" in worker.text(),
                       2 * CONSUMER_TIMEOUT + 10, "the broker's delivery-ack timeout")
            # The first runs end during the alarm; their acks belong to a channel the
            # broker closed, so every job is still in its queue (a classic queue has
            # them ready again, a quorum queue once the blocked connection ends).
            wait_until(lambda: len(records.events("end")) == 3, 2 * CONSUMER_TIMEOUT,
                       "the first runs to end")
            assert sum(queue_totals(rabbit, vhost)[QUEUE]) == 3
        finally:
            rabbit.set_memory_alarm(False)
        wait_until(lambda: set(records.count("end")) == set(ids) and _every_run_ended(records)
                   and all_empty(rabbit, vhost), 5 * CONSUMER_TIMEOUT, "every job done")
        assert worker.alive
    finally:
        rabbit.set_memory_alarm(False)
        worker.stop()
        publisher.close()
    runs = records.count("start")
    assert set(runs) == set(ids)
    # The first run, the requeued delivery, the renewal copy stored late: three at most.
    assert all(n <= 3 for n in runs.values()), runs
