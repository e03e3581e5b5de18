"""``rbit ctl`` against real workers on the real broker: ping, status, pause, history,
shutdown, loglevel, authorization, and a second worker of the same name."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pika
import pytest
from worker_helpers import (
    QUEUE,
    ROOT_DIR,
    TESTS_DIR,
    WorkerProcess,
    consumer_prefetch,
    pybit_body,
    wait_until,
    write_config,
)

from rbit.cli import ExitCode
from rbit.control.client import CtlExit
from rbit.control.client import main as ctl_main

RUNNER = {"runner": "python!worker_runners:succeed"}


def ctl(config: Path, *args: str, timeout: float = 3.0) -> tuple[int, dict[str, Any]]:
    """``rbit ctl CONFIG ARGS --json`` in this process: exit code and the result."""
    out = io.StringIO()
    code = ctl_main([str(config), *args, "--json", "--timeout", str(timeout)], out=out)
    text = out.getvalue()
    return code, json.loads(text) if text else {}


def replies(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["worker"]: r for r in result.get("replies", [])}


def worker_config(tmp_path: Path, url: str, name: str, out: Path,
                  runner: dict[str, Any] | None = None, **rbit: Any) -> Path:
    """A worker named ``name`` on QUEUE (``runner``: its section, default RUNNER)."""
    return write_config(tmp_path, url, {QUEUE: {**(runner or RUNNER), "outdir": out}},
                        rbit={"name": name, **rbit}, name=f"{name}.ini")


def start_worker(config: Path, name: str) -> WorkerProcess:
    proc = WorkerProcess(config)
    try:
        wait_until(lambda: name in replies(ctl(config, "ping", "--worker", name,
                                               timeout=1.0)[1]),
                   timeout=30, what=f"{name} to answer ping")
    except AssertionError:
        proc.kill()
        raise AssertionError(proc.output) from None
    return proc


def runs(out: Path) -> list[str]:
    path = out / "runs"
    return path.read_text().split() if path.exists() else []


def test_three_workers_answer_ping_and_a_killed_one_is_named_missing(
        tmp_path, rabbit, vhost, out):
    url = rabbit.url(vhost)
    names = ["w1", "w2", "w3"]
    configs = {n: worker_config(tmp_path, url, n, out) for n in names}
    procs = {n: start_worker(configs[n], n) for n in names}
    try:
        code, result = ctl(configs["w1"], "ping")
        assert code == CtlExit.OK, result
        assert set(replies(result)) == set(names)
        for name, reply in replies(result).items():
            assert reply["pid"] == procs[name].proc.pid
            assert reply["uptime"] >= 0
            assert reply["version"]
            assert reply["host"]
        assert result["missing"] == []

        procs["w3"].kill()
        # Through the real command line: the exit code says a worker did not answer.
        done = subprocess.run(
            [sys.executable, "-m", "rbit", "ctl", str(configs["w1"]), "ping", "--timeout", "2"],
            cwd=str(ROOT_DIR), capture_output=True, text=True, timeout=60,
            env={"PYTHONPATH": f"{ROOT_DIR}:{TESTS_DIR}", "PATH": "/usr/bin:/bin"})
        assert done.returncode == CtlExit.NOT_ANSWERED == 4, done.stdout + done.stderr
        assert "w3: no answer" in done.stdout
        assert "w1\t" in done.stdout
        assert "w2\t" in done.stdout
    finally:
        for proc in procs.values():
            proc.kill()


def test_a_gracefully_stopped_worker_is_not_reported_missing(tmp_path, rabbit, vhost, out):
    url = rabbit.url(vhost)
    configs = {n: worker_config(tmp_path, url, n, out) for n in ("a", "b")}
    procs = {n: start_worker(configs[n], n) for n in configs}
    try:
        procs["b"].signal(signal.SIGTERM)
        assert procs["b"].wait(30) == ExitCode.OK
        code, result = ctl(configs["a"], "ping")
        assert code == CtlExit.OK, result
        assert set(replies(result)) == {"a"}
    finally:
        for proc in procs.values():
            proc.kill()


def test_a_second_worker_of_the_same_name_refuses_to_start(tmp_path, rabbit, vhost, out):
    url = rabbit.url(vhost)
    first = start_worker(worker_config(tmp_path, url, "twin", out), "twin")
    try:
        other = write_config(tmp_path, url, {QUEUE: {**RUNNER, "outdir": out}},
                             rbit={"name": "twin"}, name="twin-2.ini")
        second = WorkerProcess(other)
        assert second.wait(60) == ExitCode.DUPLICATE_NAME == 73
        assert "another worker named 'twin' is running" in second.output
    finally:
        first.kill()


def test_pause_keeps_jobs_waiting_across_a_restart_and_resume_drains_them(
        tmp_path, rabbit, vhost, out, amqp):
    config = worker_config(tmp_path, rabbit.url(vhost), "pauser", out)
    proc = start_worker(config, "pauser")
    try:
        amqp.publish(pybit_body(1))
        wait_until(lambda: len(runs(out)) == 1, timeout=15, what="the first job")
        code, result = ctl(config, "pause", QUEUE)
        assert code == CtlExit.OK, result
        assert replies(result)["pauser"]["paused"] == [QUEUE]
        amqp.publish_jobs([f"p{n}" for n in range(5)])
        wait_until(lambda: rabbit.list_queues(vhost).get(QUEUE) == (5, 0), timeout=10,
                   what="five jobs waiting in the paused queue")
        _, status = ctl(config, "status")
        assert replies(status)["pauser"]["queues"] == [
            {"queue": QUEUE, "consuming": False, "paused": True}]

        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == ExitCode.OK
        proc = start_worker(config, "pauser")  # the pause holds across the restart
        _, status = ctl(config, "status")
        assert replies(status)["pauser"]["queues"][0]["paused"] is True
        assert rabbit.list_queues(vhost).get(QUEUE) == (5, 0)
        assert len(runs(out)) == 1

        code, result = ctl(config, "resume", QUEUE)
        assert code == CtlExit.OK, result
        assert replies(result)["pauser"]["paused"] == []
        wait_until(lambda: len(runs(out)) == 6, timeout=15, what="the waiting jobs to run")
        assert sorted(runs(out)[1:]) == [f"p{n}" for n in range(5)]
        wait_until(lambda: rabbit.list_queues(vhost).get(QUEUE) == (0, 0), timeout=10,
                   what="the queue to drain")
    finally:
        proc.kill()


def test_history_lists_the_jobs_from_before_a_restart(tmp_path, rabbit, vhost, out, amqp):
    config = worker_config(tmp_path, rabbit.url(vhost), "historian", out, history_depth=3)
    proc = start_worker(config, "historian")
    try:
        amqp.publish_jobs([f"h{n}" for n in range(5)])
        wait_until(lambda: len(runs(out)) == 5, timeout=15, what="five jobs")
        wait_until(lambda: replies(ctl(config, "status")[1]).get("historian", {})
                   .get("counts", {}).get("done") == 5, timeout=10, what="the counts")
        # The writer commits every second; once an outcome is committed, a SIGKILL
        # must not lose it nor tear the file. Three rows are not enough to wait for:
        # h0-h2 may be committed while h3 and h4 still wait for the next commit.
        wait_until(lambda: (tmp_path / "state-historian" / "state.sqlite3-wal").exists()
                   and _committed(tmp_path / "state-historian") == ["h4", "h3", "h2"],
                   timeout=10, what="the last three outcomes to be committed")
        proc.kill()
        proc = start_worker(config, "historian")
        code, result = ctl(config, "history", QUEUE, "--depth", "10")
        assert code == CtlExit.OK, result
        history = replies(result)["historian"]["history"]
        assert [h["job_id"] for h in history] == ["h4", "h3", "h2"]  # pruned to 3
        assert all(h["status"] == "Done" and h["attempt"] == 1 and h["queue"] == QUEUE
                   and h["ended"] >= h["started"] for h in history)
    finally:
        proc.kill()


def test_a_command_from_a_user_not_in_the_list_is_refused_and_changes_nothing(
        tmp_path, rabbit, vhost, out, amqp):
    config = worker_config(tmp_path, rabbit.url(vhost), "guarded", out)
    text = config.read_text() + "\n[control]\nusers = operator\n"
    config.write_text(text)
    proc = start_worker_refusing(config)
    try:
        code, result = ctl(config, "pause", QUEUE)
        assert code == CtlExit.REFUSED == 5, result
        assert "not in [control] users" in replies(result)["guarded"]["refused"]
        amqp.publish(pybit_body(1))
        wait_until(lambda: len(runs(out)) == 1, timeout=15, what="the job to run anyway")
        # No user_id at all: refused too.
        answer = raw_command(rabbit.url(vhost), b'{"command": "shutdown"}')
        assert json.loads(answer)["refused"] == "no user_id property"
        assert proc.proc.poll() is None
        assert "control command refused" in proc.output
    finally:
        proc.kill()


def _committed(state_dir: Path) -> list[str]:
    """The job ids committed to the history, newest first, read as another process would."""
    import sqlite3

    db = sqlite3.connect(f"file:{state_dir / 'state.sqlite3'}?mode=ro", uri=True)
    try:
        return [row[0] for row in db.execute("SELECT job_id FROM history ORDER BY id DESC")]
    finally:
        db.close()


def start_worker_refusing(config: Path) -> WorkerProcess:
    proc = WorkerProcess(config)
    wait_until(lambda: ctl(config, "ping", "--worker", "guarded", timeout=1.0)[0]
               == CtlExit.REFUSED, timeout=30, what="the worker to answer (refusing)")
    return proc


def raw_command(url: str, body: bytes) -> bytes:
    """Send a command without ``user_id`` and wait for the reply."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        got: list[bytes] = []
        channel.basic_consume("amq.rabbitmq.reply-to",
                              lambda _c, _m, _p, b: got.append(b), auto_ack=True)
        channel.basic_publish("rbit.control", "all", body,
                              pika.BasicProperties(reply_to="amq.rabbitmq.reply-to"))
        wait_until(lambda: got or connection.process_data_events(0.1), timeout=10,
                   what="a reply")
        return got[0]
    finally:
        connection.close()


def test_poll_mode_skips_a_paused_queue_until_resumed(tmp_path, rabbit, vhost, out, amqp):
    from worker_helpers import running_worker

    config = write_config(tmp_path, rabbit.url(vhost), {QUEUE: {**RUNNER, "outdir": out}},
                          rbit={"name": "poller", "mode": "poll"})
    with running_worker(config, poll_time=0.2) as worker:
        worker.broker.pause(QUEUE)
        wait_until(lambda: QUEUE in worker.broker.paused(), timeout=5, what="the pause")
        amqp.publish_jobs(["q1", "q2"])
        # Several passes go by (each reconnects): the jobs stay in their queue.
        generation = worker.broker.generation
        wait_until(lambda: worker.broker.generation >= generation + 3, timeout=15,
                   what="three more passes")
        assert runs(out) == []
        assert rabbit.list_queues(vhost).get(QUEUE) == (2, 0)
        assert worker.control.status()["queues"][0]["paused"] is True
        worker.broker.resume(QUEUE)
        wait_until(lambda: sorted(runs(out)) == ["q1", "q2"], timeout=15, what="the jobs")


def queue_counts(rabbit: Any, vhost: str) -> tuple[int, int] | None:
    """QUEUE's (ready, unacked); a count the broker left blank is not taken for 0."""
    return rabbit.list_queues(vhost, blank=None).get(QUEUE)


@pytest.mark.parametrize("how", ["ctl shutdown", "SIGTERM"])
def test_ctl_shutdown_is_the_graceful_stop_sigterm_is(tmp_path, rabbit, vhost, out, amqp, how):
    # Either way: the running job ends and is acked, the prefetched one goes back at
    # once, a job published meanwhile is not taken, and the exit is clean.
    runner = {"runner": "python!worker_runners:wait_for_release", "concurrency": 1,
              "prefetch": 5}
    config = worker_config(tmp_path, rabbit.url(vhost), "stopper", out, runner,
                           shutdown_grace=60)
    proc = start_worker(config, "stopper")
    try:
        amqp.publish_jobs(["first", "second"])
        wait_until((out / "first.started").exists, timeout=15, what="the first job to start")
        wait_until(lambda: queue_counts(rabbit, vhost) == (0, 2), timeout=10,
                   what="the second job prefetched")
        if how == "SIGTERM":
            proc.signal(signal.SIGTERM)
        else:
            code, result = ctl(config, "shutdown")
            assert code == CtlExit.OK, result
            assert replies(result)["stopper"]["stopping"] is True
        wait_until(lambda: queue_counts(rabbit, vhost) == (1, 1), timeout=10,
                   what="the prefetched job to be requeued")
        wait_until(lambda: consumer_prefetch(rabbit, vhost, QUEUE) == [], timeout=10,
                   what="the worker to stop consuming")
        amqp.publish_jobs(["late"])
        wait_until(lambda: queue_counts(rabbit, vhost) == (2, 1), timeout=10,
                   what="the late job to wait in the queue")
        assert proc.proc.poll() is None, "the worker must wait for its running job"

        (out / "release").touch()
        assert proc.wait(30) == ExitCode.OK == 0, proc.output
        assert (out / "first.done").exists()
        assert sorted(path.name for path in out.glob("*.started")) == ["first.started"]
        assert queue_counts(rabbit, vhost) == (2, 0)  # the first job was acked
        left = {}
        for _ in range(2):
            method, props, _body = amqp.get(QUEUE)
            left[props.message_id] = method.redelivered
        # The late job never reached the worker; the prefetched one did, and went back.
        assert left == {"second": True, "late": False}
    finally:
        proc.kill()


def test_loglevel_changes_what_the_worker_writes(tmp_path, rabbit, vhost, out, amqp):
    # The log sink writes a line per job on rbit.status: its Done at INFO, rbit's
    # bare Building at DEBUG.
    config = worker_config(tmp_path, rabbit.url(vhost), "logs", out)
    proc = start_worker(config, "logs")

    def line(job_id: str, level: str, status: str) -> str:
        return f" {level} rbit.status: job {job_id} {QUEUE}: {status}\n"

    def run_job(job_id: str) -> None:
        amqp.publish_jobs([job_id])
        # Acked: the job's status lines were written (or not) before the ack was sent.
        wait_until(lambda: job_id in runs(out) and queue_counts(rabbit, vhost) == (0, 0),
                   timeout=15, what=f"job {job_id} to be acked")

    def set_level(level: str) -> None:
        code, result = ctl(config, "loglevel", "rbit.status", level)
        assert code == CtlExit.OK, result
        assert replies(result)["logs"] == {"worker": "logs", "ok": True, "command": "loglevel",
                                           "logger": "rbit.status", "level": level}

    try:
        run_job("l1")
        wait_until(lambda: line("l1", "INFO", "Done") in proc.output, timeout=10,
                   what="job l1's Done line")
        assert line("l1", "DEBUG", "Building") not in proc.output

        set_level("WARNING")
        run_job("l2")
        set_level("INFO")
        run_job("l3")
        # The lines keep their order: with l3's written, l2's would be there already.
        wait_until(lambda: line("l3", "INFO", "Done") in proc.output, timeout=10,
                   what="job l3's Done line")
        assert "rbit.status: job l2 " not in proc.output
        assert line("l3", "DEBUG", "Building") not in proc.output

        set_level("DEBUG")
        run_job("l4")
        wait_until(lambda: line("l4", "INFO", "Done") in proc.output, timeout=10,
                   what="job l4's Done line")
        assert line("l4", "DEBUG", "Building") in proc.output
    finally:
        proc.kill()


def worker_status(config: Path, name: str, *args: str) -> dict[str, Any]:
    """Worker ``name``'s ``status`` reply ({} if it did not answer)."""
    return replies(ctl(config, "status", *args)[1]).get(name, {})


def test_status_verbose_shows_the_running_job_and_the_counts(tmp_path, rabbit, vhost, out,
                                                             amqp):
    runner = {"runner": "python!worker_runners:wait_for_release"}
    config = worker_config(tmp_path, rabbit.url(vhost), "watched", out, runner)
    proc = start_worker(config, "watched")
    try:
        (out / "release").touch()
        amqp.publish_jobs(["s1", "s2"])
        wait_until(lambda: worker_status(config, "watched").get("counts", {}).get("done") == 2,
                   timeout=15, what="two jobs done")
        (out / "release").unlink()
        before = time.time()
        amqp.publish_jobs(["slow"])
        wait_until((out / "slow.started").exists, timeout=15, what="the slow job to start")

        code, result = ctl(config, "status", "--verbose")
        assert code == CtlExit.OK, result
        status = replies(result)["watched"]
        assert status["pid"] == proc.proc.pid
        assert status["queues"] == [{"queue": QUEUE, "consuming": True, "paused": False}]
        [running] = status["running"]
        assert (running["job_id"], running["queue"]) == ("slow", QUEUE)
        assert before <= running["since"] <= time.time()
        assert status["running_count"] == 1
        assert status["counts"] == {"done": 2, "failed": 0, "retried": 0, "dead_lettered": 0}
        assert status["broker_connected"] is True
        assert status["status_backlog"] == 0  # the log sink writes at once
        plain = worker_status(config, "watched")
        assert plain["running_count"] == 1
        assert "running" not in plain  # the list only with --verbose

        (out / "release").touch()
        wait_until(lambda: worker_status(config, "watched").get("counts", {}).get("done") == 3,
                   timeout=15, what="the slow job done")
        status = worker_status(config, "watched", "--verbose")
        assert status["running"] == []
        assert status["running_count"] == 0
        assert status["counts"] == {"done": 3, "failed": 0, "retried": 0, "dead_lettered": 0}
        assert (out / "slow.done").exists()
    finally:
        proc.kill()
