"""Confirm before ack: a retry or dead-letter copy must be confirmed before its original
is acked, whatever happens while the confirm is outstanding.

Two ways keep a confirm from coming: a memory alarm (the broker blocks the worker's
connection, so the copy waits) and a policy that makes the copy's queue refuse it (the
broker nacks it). In both the worker is SIGKILLed with copies unconfirmed; a new worker
finishes every job. A third, the lost confirm: the copy is stored but its confirm never
reaches the worker (a proxy holds what the broker sends, then the connection breaks).
"""

from __future__ import annotations

import collections
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
from tcp_proxy import Proxy

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
    return WorkerProcess(config, tmp_path / f"{name}.log").start().wait_consuming()


def _dead_ids(publisher: Publisher) -> list[str]:
    ids = []
    while (got := publisher.get(f"{QUEUE}.dead")) is not None:
        ids.append(got[1].message_id)
    return ids


class Settled:
    """Which jobs are done (retry path) or in the dead letters (dead path)."""

    def __init__(self, path: str, records: Records, publisher: Publisher, ids: list[str]):
        self.path, self.records, self.publisher, self.ids = path, records, publisher, ids
        self.dead_seen: list[str] = []  # every dead-letter copy taken, in order

    def ids_settled(self) -> set[str]:
        if self.path == "retry":
            return set(self.records.count())
        self.dead_seen += _dead_ids(self.publisher)
        return set(self.dead_seen)

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


def _messages(rabbit, vhost) -> int:
    """Messages in every queue of the test, ready or unacked."""
    return sum(ready + unacked for ready, unacked in queue_totals(rabbit, vhost).values())


def _copies(rabbit, vhost, path: str) -> int:
    """Messages ready in the delay queues (retry) or the dead letters (dead)."""
    kind = f"{QUEUE}.retry." if path == "retry" else f"{QUEUE}.dead"
    return sum(ready for name, (ready, _) in queue_totals(rabbit, vhost).items()
               if name.startswith(kind))


@pytest.mark.parametrize("path", PATHS)
def test_a_lost_confirm_gives_a_duplicate_never_a_loss(tmp_path, rabbit, vhost, path):
    proxy = Proxy((rabbit.host, rabbit.port))
    gates = tmp_path / "gates"
    gates.mkdir()
    config = write_config(
        tmp_path / "worker.ini", {"host": f"127.0.0.1:{proxy.port}", "virtual_host": vhost},
        {"runner": "python!fault_runners:gated_each", "gate": gates,
         "first_try": "reject" if path == "dead" else "fail", "record": tmp_path / "record",
         "concurrency": 2, "prefetch": 2, "retry_delay": 3, "retry_jitter": 0})
    records = Records(tmp_path / "record")
    publisher = Publisher(rabbit.url(vhost))
    settled = Settled(path, records, publisher, ["warm", "lost"])
    worker = _start(tmp_path, config, "worker")
    try:
        # A first job declares the copy's queue on this connection: once the broker's
        # replies are held, a declare would never finish and no copy would go out.
        (gates / "warm").touch()
        publisher.jobs(["warm"])
        wait_until(lambda: records.count()["warm"] == 1 if path == "retry"
                   else _copies(rabbit, vhost, path) == 1, 30, "the first job settled")
        publisher.jobs(["lost"])
        wait_until(lambda: records.count("start")["lost"] == 1, 30, "the job to start")
        proxy.hold_from_broker()
        (gates / "lost").touch()
        # The copy is stored (the worker's publish got through) while its confirm is
        # held, so the original must still be unacked: the job is there twice (the
        # copy may be back in the work queue already). Acked early, it would be once.
        wait_until(lambda: _messages(rabbit, vhost) == (3 if path == "dead" else 2), 30,
                   "the copy stored and the original still unacked")
        proxy.sever()  # the confirm is lost with the connection
        wait_until(lambda: ["lost", "1", "1"] in [e[1:4] for e in records.events("start")],
                   30, "the original redelivered")
        wait_until(lambda: records.count("failed")["lost"] == 2, 30, "its try to end")
        wait_until(settled, 60, "every job settled")
        wait_until(lambda: queue_totals(rabbit, vhost)[QUEUE] == (0, 0)
                   and (path == "dead" or all_empty(rabbit, vhost)), 30, "empty queues")
        assert worker.alive
        settled.ids_settled()
    finally:
        worker.stop()
        publisher.close()
        proxy.close()
    done = records.count() if path == "retry" else collections.Counter(settled.dead_seen)
    # Nothing lost; the lost confirm's copy and the original's new one: two at most.
    assert done["warm"] == 1
    assert 1 <= done["lost"] <= 2, done
