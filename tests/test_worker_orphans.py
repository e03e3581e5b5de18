"""No job outlives its worker: SIGHUP, SIGKILL and restarts, with real processes.

A worker killed with SIGKILL cannot stop its jobs; the next worker to start on the
machine must stop them before it takes a job, so that the redelivered job never runs
beside its earlier copy, and must remove the body files the dead worker left.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from worker_helpers import WorkerProcess, pid_alive, wait_until, write_config

from rbit import jobguard

QUEUE = "orphans"
COUNTER = Path(__file__).resolve().parent / "data" / "copy_counter.py"


@pytest.fixture
def processes():
    started: list[WorkerProcess] = []
    yield started
    for proc in started:
        proc.kill()


def _config(tmp_path, rabbit, vhost, out, *, seconds=600, grace=30, name="worker.ini",
            worker="test-worker"):
    runner = {"runner": "shell!{pyexe} {counter} {outdir} {seconds}", "pyexe": sys.executable,
              "counter": COUNTER, "outdir": out, "seconds": seconds, "kill_grace": 1}
    return write_config(tmp_path, rabbit.url(vhost), {QUEUE: runner}, name=name,
                        rbit={"shutdown_grace": grace, "name": worker})


def _start(processes, config) -> WorkerProcess:
    proc = WorkerProcess(config)
    processes.append(proc)
    return proc


def _copies(out: Path) -> list[tuple[int, int]]:
    pids = out / "pids"
    lines = pids.read_text().splitlines() if pids.exists() else []
    return [tuple(map(int, line.split())) for line in lines if len(line.split()) == 2]


def _wait_for_copies(out: Path, count: int, worker: WorkerProcess) -> list[tuple[int, int]]:
    def started():
        assert worker.proc.poll() is None, f"the worker exited:\n{worker.output}"
        return len(_copies(out)) >= count and _copies(out)
    return wait_until(started, 30, f"{count} start(s) of the job")


def _body_dirs(out: Path) -> list[Path]:
    return [Path(line).parent for line in (out / "bodies").read_text().split()]


def test_sighup_stops_the_worker_gracefully_and_the_job_finishes(
        tmp_path, rabbit, vhost, amqp, out, processes):
    worker = _start(processes, _config(tmp_path, rabbit, vhost, out, seconds=2))
    wait_until(lambda: QUEUE in rabbit.list_queues(vhost), 20, "the queue")
    amqp.publish(b"{}", exchange="", routing_key=QUEUE, message_id="hup-1")
    (leader, grandchild), = _wait_for_copies(out, 1, worker)

    worker.signal(signal.SIGHUP)
    code = worker.wait(timeout=30)

    assert code == 0, worker.output
    assert "received SIGHUP" in worker.output
    assert rabbit.list_queues(vhost)[QUEUE] == (0, 0)  # the job ran to its end: acked
    assert not pid_alive(leader)
    assert not pid_alive(grandchild)
    assert not any(path.exists() for path in _body_dirs(out))


def test_sighup_whose_grace_runs_out_stops_the_job_and_exits_3(
        tmp_path, rabbit, vhost, amqp, out, processes):
    worker = _start(processes, _config(tmp_path, rabbit, vhost, out, grace=1))
    wait_until(lambda: QUEUE in rabbit.list_queues(vhost), 20, "the queue")
    amqp.publish(b"{}", exchange="", routing_key=QUEUE, message_id="hup-2")
    (leader, grandchild), = _wait_for_copies(out, 1, worker)

    worker.signal(signal.SIGHUP)
    code = worker.wait(timeout=30)

    assert code == 3, worker.output
    assert not pid_alive(leader)
    assert not pid_alive(grandchild)
    assert rabbit.list_queues(vhost)[QUEUE] == (1, 0)  # left for redelivery
    assert not any(path.exists() for path in _body_dirs(out))


def test_after_sigkill_the_next_start_stops_the_old_copy_before_running_the_job_again(
        tmp_path, rabbit, vhost, amqp, out, processes):
    config = _config(tmp_path, rabbit, vhost, out, grace=1)
    first = _start(processes, config)
    wait_until(lambda: QUEUE in rabbit.list_queues(vhost), 20, "the queue")
    amqp.publish(b"{}", exchange="", routing_key=QUEUE, message_id="twice")
    (old_leader, old_grandchild), = _wait_for_copies(out, 1, first)

    first.proc.kill()  # SIGKILL to the worker alone: its job runs on, orphaned
    first.wait(timeout=10)
    assert pid_alive(old_leader)
    assert pid_alive(old_grandchild)
    old_dirs = _body_dirs(out)
    assert all(path.exists() for path in old_dirs)

    second = _start(processes, config)
    copies = _wait_for_copies(out, 2, second)

    seen = [json.loads(line) for line in (out / "seen").read_text().splitlines()]
    assert seen[1] == [], f"copies of the job still running at the restart: {seen[1]}"
    assert not pid_alive(old_leader)
    assert not pid_alive(old_grandchild)
    assert not any(path.exists() for path in old_dirs)
    assert "left 1 job process group(s) running" in second.output

    second.signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 3, second.output  # the grace (1 s) ran out
    new_leader, new_grandchild = copies[1]
    assert not pid_alive(new_leader)
    assert not pid_alive(new_grandchild)
    assert not any(path.exists() for path in _body_dirs(out))
    assert not _records_of({first.proc.pid, second.proc.pid})


def test_a_restart_leaves_the_jobs_of_a_live_worker_alone(
        tmp_path, rabbit, vhost, amqp, out, processes):
    config = _config(tmp_path, rabbit, vhost, out, grace=1)
    first = _start(processes, config)
    wait_until(lambda: QUEUE in rabbit.list_queues(vhost), 20, "the queue")
    amqp.publish(b"{}", exchange="", routing_key=QUEUE, message_id="busy")
    (leader, _), = _wait_for_copies(out, 1, first)

    # Another worker of the machine (another name: one name is one worker on a broker).
    other = _start(processes, _config(tmp_path, rabbit, vhost, tmp_path, name="other.ini",
                                      worker="other-worker"))
    wait_until(lambda: "consuming" in other.output, 20, "the second worker to start")

    assert pid_alive(leader)
    assert first.proc.poll() is None
    other.signal(signal.SIGTERM)
    assert other.wait(timeout=30) == 0, other.output


def _records_of(pids: set[int]) -> list[str]:
    try:
        names = os.listdir(jobguard.record_dir())
    except FileNotFoundError:
        return []
    return [name for name in names if int(name.split("-", 1)[0]) in pids]
