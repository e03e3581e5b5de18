"""python! jobs in warm child processes, through a real worker and a real node."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from fault_helpers import (
    QUEUE,
    Publisher,
    WorkerProcess,
    all_empty,
    amqp_keys,
    wait_until,
    write_config,
)

from rbit.cli import ExitCode

pytestmark = pytest.mark.fault


class Run:
    """A worker process serving ``warm_runners:job``, with a publisher and its record."""

    def __init__(self, tmp_path: Path, rabbit, vhost: str, **keys) -> None:
        self.record = tmp_path / "record"
        runner = {"runner": "python!warm_runners:job", "record": self.record,
                  "timeout": 3600, "max_retries": 0, **keys}
        config = write_config(tmp_path / "worker.ini", amqp_keys(rabbit, vhost), runner)
        self.rabbit, self.vhost = rabbit, vhost
        self.worker = WorkerProcess(config, tmp_path / "worker.log").start()
        self.publisher = Publisher(rabbit.url(vhost))
        wait_until(lambda: QUEUE in rabbit.list_queues(vhost), 30, "the worker's queue")

    def publish(self, job_id: str, action: str = "record", **fields) -> None:
        self.publisher.jobs([job_id], body=json.dumps({"action": action, **fields}).encode())

    def lines(self) -> list[dict]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def started(self, job_id: str, timeout: float = 30) -> dict:
        def seen():
            return next((line for line in self.lines()
                         if line["job"] == job_id and "pid" in line), None)
        return wait_until(seen, timeout, f"job {job_id} to start")

    def dead_letter(self, timeout: float = 30):
        return wait_until(lambda: self.publisher.get(f"{QUEUE}.dead"), timeout, "a dead letter")

    def settled(self, timeout: float = 60) -> None:
        wait_until(lambda: all_empty(self.rabbit, self.vhost), timeout, "empty queues")

    def children(self) -> list[int]:
        return children_of(self.worker.proc.pid)

    def close(self) -> None:
        self.worker.stop()
        self.publisher.close()


@pytest.fixture
def run(tmp_path, rabbit, vhost):
    runs: list[Run] = []

    def start(**keys) -> Run:
        runs.append(Run(tmp_path, rabbit, vhost, **keys))
        return runs[-1]

    yield start
    for each in runs:
        each.close()


def children_of(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --------------------------------------------------------------------------- tests


def test_children_are_started_with_the_worker_one_per_slot(run):
    worker = run(concurrency=2)
    wait_until(lambda: len(worker.children()) == 2, 30, "two warm children")
    warm = set(worker.children())
    worker.publish("a")
    worker.publish("b")
    worker.settled()
    assert {line["pid"] for line in worker.lines()} <= warm


def test_timeout_kills_a_hung_job_and_the_next_job_runs_in_a_fresh_child(run):
    worker = run(timeout=1, kill_grace=0.5)
    worker.publish("hung", "hang")
    worker.publish("next")
    hung = worker.started("hung")
    following = worker.started("next")
    method, props, _ = worker.dead_letter()
    assert props.message_id == "hung"
    assert "timed out after 1 s" in props.headers["x-rbit-dead-reason"]
    assert following["pid"] != hung["pid"]
    assert following["jobs"] == 1  # a fresh interpreter
    assert not alive(hung["pid"])
    # SIGTERM ends the hung job at its timeout; its successor starts within a second
    # (bounded widely: the machine is shared).
    assert following["at"] - (hung["at"] + 1) < 2.0


def test_a_child_killed_mid_job_fails_that_job_only(run):
    worker = run(concurrency=2)
    worker.publish("victim", "hang")
    worker.publish("bystander", "sleep", seconds=1.5)
    victim = worker.started("victim")
    worker.started("bystander")
    os.kill(victim["pid"], signal.SIGKILL)
    _, props, _ = worker.dead_letter()
    assert props.message_id == "victim"
    assert "killed by signal SIGKILL" in props.headers["x-rbit-dead-reason"]
    wait_until(lambda: any(line.get("finished") for line in worker.lines()), 30, "bystander")
    worker.publish("after")
    after = worker.started("after")
    assert after["pid"] != victim["pid"]
    worker.settled()
    assert worker.worker.alive
    assert worker.publisher.get(f"{QUEUE}.dead") is None  # the victim only


def test_a_child_exiting_mid_job_fails_that_job_and_is_replaced(run):
    worker = run()
    worker.publish("quitter", "exit")
    worker.publish("next")
    quitter = worker.started("quitter")
    following = worker.started("next")
    _, props, _ = worker.dead_letter()
    assert "exited with code 4" in props.headers["x-rbit-dead-reason"]
    assert following["pid"] != quitter["pid"]


def test_max_jobs_per_child_recycles_and_globals_live_only_as_long_as_the_child(run):
    worker = run(max_jobs_per_child=3)
    worker.publish("j1", "set", mark="left by j1")
    for n in range(2, 8):
        worker.publish(f"j{n}")
    worker.started("j7")
    worker.settled()
    lines = worker.lines()
    pids = [line["pid"] for line in lines]
    assert [line["jobs"] for line in lines] == [1, 2, 3, 1, 2, 3, 1]
    assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4] == pids[5] != pids[6]
    assert [line["mark"] for line in lines[:3]] == ["left by j1"] * 3
    assert [line["mark"] for line in lines[3:]] == [None] * 4


def test_max_memory_per_child_retires_a_child_that_grew(run):
    worker = run(max_memory_per_child="150M")
    worker.publish("small")
    worker.publish("still-small")
    worker.publish("grow", "grow", bytes=200 * 1024 * 1024)
    worker.publish("after")
    worker.settled()
    pids = {line["job"]: line["pid"] for line in worker.lines()}
    assert pids["small"] == pids["still-small"] == pids["grow"]
    assert pids["after"] != pids["grow"]


def test_a_thousand_jobs_leave_the_worker_fd_count_unchanged(run):
    worker = run(concurrency=2, max_jobs_per_child=100)
    for n in range(10):
        worker.publish(f"warm-{n}")
    worker.settled()
    before = fd_count(worker.worker.proc.pid)
    for n in range(1000):
        worker.publish(f"job-{n}")
    worker.settled(timeout=300)
    assert len(worker.lines()) == 1010
    assert len({line["pid"] for line in worker.lines()}) >= 10  # recycled along the way
    assert fd_count(worker.worker.proc.pid) == before


def test_graceful_shutdown_lets_the_running_job_finish_and_stops_the_children(run):
    worker = run(concurrency=2)
    worker.publish("long", "sleep", seconds=2)
    worker.started("long")
    children = worker.children()
    assert len(children) == 2
    worker.worker.proc.send_signal(signal.SIGTERM)
    assert worker.worker.proc.wait(30) == ExitCode.OK
    assert any(line.get("finished") for line in worker.lines())
    wait_until(lambda: not any(alive(pid) for pid in children), 10, "the children to exit")
    assert all_empty(worker.rabbit, worker.vhost)


def test_a_second_signal_kills_the_children_and_the_job_is_redelivered(run):
    worker = run()
    worker.publish("stuck", "hang")
    stuck = worker.started("stuck")
    worker.worker.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "stopping" in worker.worker.text(), 10, "the first signal handled")
    worker.worker.proc.send_signal(signal.SIGTERM)
    assert worker.worker.proc.wait(30) == ExitCode.FORCED
    wait_until(lambda: not alive(stuck["pid"]), 10, "the child to die")
    assert worker.publisher.get(QUEUE) is not None  # back in its queue


def test_children_do_not_survive_a_sigkilled_worker(run):
    worker = run(concurrency=3)
    wait_until(lambda: len(worker.children()) == 3, 30, "three warm children")
    worker.publish("busy", "hang")
    busy = worker.started("busy")
    children = worker.children()
    assert busy["pid"] in children
    worker.worker.kill()
    wait_until(lambda: not any(alive(pid) for pid in children), 5, "the children to exit")
