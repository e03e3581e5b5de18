"""Confirm before ack: a retry or dead-letter copy must be confirmed before its original
is acked, whatever happens while the confirm is outstanding.

Two ways keep a confirm from coming: a memory alarm (the broker blocks the worker's
connection, so the copy waits) and a policy that makes the copy's queue refuse it (the
broker nacks it). In both the worker is SIGKILLed with copies unconfirmed; a new worker
finishes every job.
"""

from __future__ import annotations

import json

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
# ``retry``: the first try fails and a copy goes to a delay queue; ``dead``: every try is
# rejected and a copy goes to the dead letters.
PATHS = ["retry", "dead"]


def _config(tmp_path, rabbit, vhost, path: str, queue_type: str, concurrency: int = 3):
    return write_config(
        tmp_path / "worker.ini", amqp_keys(rabbit, vhost),
        {"runner": "python!fault_runners:gated", "gate": tmp_path / "gate",
         "first_try": "reject" if path == "dead" else "fail", "record": tmp_path / "record",
         "concurrency": concurrency, "prefetch": concurrency, "retry_delay": 0.2,
         "retry_jitter": 0},
        rbit={"queue_type": queue_type})


def _start(tmp_path, config, name: str) -> WorkerProcess:
    worker = WorkerProcess(config, tmp_path / f"{name}.log").start()
    wait_until(lambda: "consuming" in worker.text(), 30, f"{name} consuming")
    return worker


def _dead_ids(publisher: Publisher) -> set[str]:
    ids = set()
    while (got := publisher.get(f"{QUEUE}.dead")) is not None:
        ids.add(got[1].message_id)
    return ids


class Settled:
    """Which jobs are done (retry path) or in the dead letters (dead path)."""

    def __init__(self, path: str, records: Records, publisher: Publisher, ids: list[str]):
        self.path, self.records, self.publisher, self.ids = path, records, publisher, ids
        self.dead: set[str] = set()

    def ids_settled(self) -> set[str]:
        if self.path == "retry":
            return set(self.records.count())
        self.dead |= _dead_ids(self.publisher)
        return self.dead

    def __call__(self) -> bool:
        return self.ids_settled() >= set(self.ids)


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
@pytest.mark.parametrize("path", PATHS)
def test_worker_killed_while_copies_wait_for_confirms_in_a_memory_alarm(
        tmp_path, rabbit, vhost, path, queue_type):
    config = _config(tmp_path, rabbit, vhost, path, queue_type)
    worker = _start(tmp_path, config, "worker-1")
    records = Records(tmp_path / "record")
    ids = [f"job-{n}" for n in range(3)]
    publisher = Publisher(rabbit.url(vhost))
    settled = Settled(path, records, publisher, ids)
    try:
        publisher.jobs(ids)
        wait_until(lambda: len(records.events("start")) == 3, 30, "three jobs started")
        rabbit.set_memory_alarm(True)
        (tmp_path / "gate").touch()
        wait_until(lambda: len(records.events("failed")) == 3, 30, "the tries to end")
        wait_until(lambda: "broker blocked this connection" in worker.text(), 30,
                   "the worker to see the block")
        # The copies cannot be confirmed, so no original may have been acked. (A quorum
        # queue's counts lag by a few seconds, hence a wait rather than one look.)
        wait_until(lambda: queue_totals(rabbit, vhost)[QUEUE] == (0, 3), 20,
                   "the originals unacked during the alarm")
        worker.kill()
        rabbit.set_memory_alarm(False)
        worker = _start(tmp_path, config, "worker-2")
        wait_until(settled, 60, "every job settled")
        wait_until(lambda: queue_totals(rabbit, vhost)[QUEUE] == (0, 0), 30, "empty queue")
        assert settled.ids_settled() == set(ids)  # none lost
    finally:
        rabbit.set_memory_alarm(False)
        worker.stop()
        publisher.close()


@pytest.mark.parametrize("path", PATHS)
def test_a_nacked_copy_leaves_its_original_unacked(tmp_path, rabbit, vhost, path):
    # The copy's queue refuses it, so the broker nacks the publish: the original must be
    # given back and run again, never acked.
    target = f"^{QUEUE}\\.(retry|dead)"
    rabbit.ctl("set_policy", "-p", vhost, "--apply-to", "queues", "refuse-copies", target,
               json.dumps({"max-length": 0, "overflow": "reject-publish"}))
    config = _config(tmp_path, rabbit, vhost, path, "classic", concurrency=2)
    (tmp_path / "gate").touch()
    records = Records(tmp_path / "record")
    # As many jobs as slots: a requeued job goes back to the head of the queue.
    ids = [f"job-{n}" for n in range(2)]
    publisher = Publisher(rabbit.url(vhost))
    settled = Settled(path, records, publisher, ids)
    worker = _start(tmp_path, config, "worker-1")
    try:
        publisher.jobs(ids)
        # A nacked copy sends its original back: each job is tried again and again.
        wait_until(lambda: all(n >= 2 for n in records.count("failed").values())
                   and set(records.count("failed")) == set(ids)
                   or all_empty(rabbit, vhost), 30, "the jobs to be tried twice")
        tried = records.count("failed")
        assert all(tried[job] >= 2 for job in ids), f"acked despite a nacked copy: {tried}"
        worker.kill()  # with copies in flight
        rabbit.ctl("clear_policy", "-p", vhost, "refuse-copies")
        worker = _start(tmp_path, config, "worker-2")
        wait_until(settled, 60, "every job settled")
        wait_until(lambda: queue_totals(rabbit, vhost)[QUEUE] == (0, 0), 30, "empty queue")
        assert settled.ids_settled() == set(ids)  # none lost
    finally:
        worker.stop()
        publisher.close()
