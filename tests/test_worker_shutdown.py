"""``python -m rbit CONFIG`` as a real process: signals, exit codes, no job lost."""

from __future__ import annotations

import signal
import socket
import time

import pytest
from worker_helpers import WorkerProcess, pid_alive, wait_until, write_config

QUEUE = "shutdown"


@pytest.fixture
def processes():
    started: list[WorkerProcess] = []
    yield started
    for proc in started:
        proc.kill()


def _start(processes, config, *args) -> WorkerProcess:
    proc = WorkerProcess(config, *args)
    processes.append(proc)
    return proc


def _run_long_shell_job(tmp_path, rabbit, vhost, amqp, out, processes, grace):
    """A worker running the SCRIPT job; returns it and the job's (child, grandchild)."""
    script = tmp_path / "long.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    runner = {"runner": f"shell!{script} {{outdir}}", "kill_grace": 2, "outdir": out}
    config = write_config(tmp_path, rabbit.url(vhost), {QUEUE: runner},
                          rbit={"shutdown_grace": grace})
    worker = _start(processes, config)
    _wait_for_queue(rabbit, vhost, worker)
    amqp.publish_jobs(["long"], exchange="", routing_key=QUEUE)
    pids = wait_until(lambda: (out / "pids").exists() and (out / "pids").read_text().split(),
                      10, "the job's processes")
    return worker, tuple(int(pid) for pid in pids)


def _wait_for_grace(worker: WorkerProcess) -> None:
    """Wait until the worker, stopping, waits for its running jobs (the grace period)."""
    wait_until(lambda: "stopping: no new jobs" in worker.output, 30,
               "the worker to begin its grace period")


def _wait_for_queue(rabbit, vhost, proc):
    def declared():
        assert proc.proc.poll() is None, f"the worker exited early:\n{proc.output}"
        return QUEUE in rabbit.list_queues(vhost)
    wait_until(declared, 20, "the worker to declare its queue")


def test_sigterm_finishes_the_running_job_and_requeues_the_prefetched(
        tmp_path, rabbit, vhost, amqp, out, processes):
    runner = {"runner": "python!worker_runners:sleep_then_finish", "seconds": 5,
              "concurrency": 1, "prefetch": 5, "outdir": out}
    config = write_config(tmp_path, rabbit.url(vhost), {QUEUE: runner})
    worker = _start(processes, config)
    _wait_for_queue(rabbit, vhost, worker)
    amqp.publish_jobs(["first", "second", "third", "fourth"], exchange="", routing_key=QUEUE)
    wait_until(lambda: (out / "started").exists(), 10, "the first job to start")
    wait_until(lambda: rabbit.list_queues(vhost)[QUEUE] == (0, 4), 10, "all four prefetched")

    worker.signal(signal.SIGTERM)
    # The prefetched jobs go back at once, for other workers, while the first runs on.
    wait_until(lambda: rabbit.list_queues(vhost)[QUEUE] == (3, 1), 4,
               "the three prefetched jobs to be requeued")
    assert not (out / "first.finished").exists()
    code = worker.wait(timeout=20)

    assert code == 0, worker.output
    assert (out / "first.finished").exists()
    assert (out / "started").read_text().split() == ["first"]  # nothing else was run
    assert rabbit.list_queues(vhost)[QUEUE] == (3, 0)
    ids = sorted(amqp.get(QUEUE)[1].message_id for _ in range(3))
    assert ids == ["fourth", "second", "third"]


SCRIPT = """#!/bin/sh
sleep 60 &
echo $$ $! > "$1/pids"
wait
"""


def test_second_signal_stops_a_long_job_and_leaves_it_for_redelivery(
        tmp_path, rabbit, vhost, amqp, out, processes):
    worker, (child, grandchild) = _run_long_shell_job(
        tmp_path, rabbit, vhost, amqp, out, processes, grace=30)

    worker.signal(signal.SIGTERM)
    _wait_for_grace(worker)  # two separate signals: the first one was taken in
    assert worker.proc.poll() is None, "the worker must wait for the job after SIGTERM"
    assert pid_alive(child), "the job must run on in the grace period"
    assert pid_alive(grandchild)
    started = time.monotonic()
    worker.signal(signal.SIGINT)
    code = worker.wait(timeout=15)

    assert code == 3, worker.output
    assert time.monotonic() - started < 20  # the grace is 30 s
    assert not pid_alive(child)
    assert not pid_alive(grandchild)
    assert rabbit.list_queues(vhost)[QUEUE] == (1, 0)
    method, props, _body = amqp.get(QUEUE)
    assert props.message_id == "long"
    assert method.redelivered


def test_second_signal_does_not_wait_for_a_job_running_in_a_worker_thread(
        tmp_path, rabbit, vhost, amqp, out, processes):
    # An in-thread python! job cannot be interrupted; the process exits without it and
    # the broker redelivers the job.
    runner = {"runner": "python!worker_runners:sleep_then_finish", "seconds": 60,
              "outdir": out}
    config = write_config(tmp_path, rabbit.url(vhost), {QUEUE: runner},
                          rbit={"shutdown_grace": 30})
    worker = _start(processes, config)
    _wait_for_queue(rabbit, vhost, worker)
    amqp.publish_jobs(["stuck"], exchange="", routing_key=QUEUE)
    wait_until(lambda: (out / "started").exists(), 10, "the job to start")

    worker.signal(signal.SIGTERM)
    _wait_for_grace(worker)  # two separate signals: the first one was taken in
    started = time.monotonic()
    worker.signal(signal.SIGTERM)
    code = worker.wait(timeout=20)

    assert code == 3, worker.output
    assert time.monotonic() - started < 20  # the grace is 30 s
    assert rabbit.list_queues(vhost)[QUEUE] == (1, 0)
    assert not (out / "stuck.finished").exists()


def test_grace_period_over_stops_the_job_and_leaves_it_for_redelivery(
        tmp_path, rabbit, vhost, amqp, out, processes):
    worker, pids = _run_long_shell_job(tmp_path, rabbit, vhost, amqp, out, processes, grace=1)

    worker.signal(signal.SIGTERM)
    code = worker.wait(timeout=15)

    assert code == 3, worker.output
    assert not any(pid_alive(pid) for pid in pids)
    assert rabbit.list_queues(vhost)[QUEUE] == (1, 0)


def _port_nobody_listens_on() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_runner_that_cannot_load_exits_with_the_config_code(tmp_path, processes):
    port = _port_nobody_listens_on()
    runner = {"runner": "python!no_such_module_here:run"}
    config = write_config(tmp_path, f"amqp://guest:guest@127.0.0.1:{port}/", {QUEUE: runner})
    worker = _start(processes, config)
    assert worker.wait(timeout=20) == 78, worker.output
    assert "no_such_module_here" in worker.output


def test_bad_config_exits_before_connecting_and_names_the_key(tmp_path, processes):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(0.0)
        url = f"amqp://guest:guest@127.0.0.1:{listener.getsockname()[1]}/"
        runner = {"runner": "python!worker_runners:succeed", "concurrency": "many"}
        config = write_config(tmp_path, url, {QUEUE: runner})
        worker = _start(processes, config)
        code = worker.wait(timeout=20)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody ever connected
    assert code == 78
    assert str(config) in worker.output
    assert f"[runner:{QUEUE}]" in worker.output
    assert "'concurrency'" in worker.output


def test_unreachable_broker_exits_with_its_own_code(tmp_path, processes):
    port = _port_nobody_listens_on()
    runner = {"runner": "python!worker_runners:succeed"}
    config = write_config(tmp_path, f"amqp://guest:guest@127.0.0.1:{port}/", {QUEUE: runner})
    worker = _start(processes, config)
    assert worker.wait(timeout=30) == 69, worker.output
    assert f"127.0.0.1:{port}" in worker.output


def test_sigterm_on_an_idle_worker_exits_cleanly_at_once(tmp_path, rabbit, vhost, processes):
    runner = {"runner": "python!worker_runners:succeed"}
    config = write_config(tmp_path, rabbit.url(vhost), {QUEUE: runner})
    worker = _start(processes, config)
    _wait_for_queue(rabbit, vhost, worker)
    started = time.monotonic()
    worker.signal(signal.SIGINT)
    assert worker.wait(timeout=15) == 0, worker.output
    assert time.monotonic() - started < 10  # at once, not after a grace period



def test_poll_mode_worker_with_poll_time_option_runs_jobs_and_stops_cleanly(
        tmp_path, rabbit, vhost, amqp, out, processes):
    runner = {"runner": "python!worker_runners:succeed", "outdir": out}
    config = write_config(tmp_path, rabbit.url(vhost), {QUEUE: runner},
                          rbit={"mode": "poll", "polling_time": 600})
    worker = _start(processes, config, "--poll-time", "0.5")
    _wait_for_queue(rabbit, vhost, worker)
    amqp.publish_jobs(["p1", "p2", "p3"], exchange="", routing_key=QUEUE)
    # polling_time = 600 in the file: only --poll-time makes the next pass come soon.
    wait_until(lambda: (out / "runs").exists()
               and len((out / "runs").read_text().split()) == 3, 60, "three jobs")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=15) == 0, worker.output
    assert rabbit.list_queues(vhost)[QUEUE] == (0, 0)
