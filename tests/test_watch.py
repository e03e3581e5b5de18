"""``rbit watch CONFIG [--job ID] [--queue Q]`` as a real process, following a real
worker's statuses on the status exchange ([status] sinks = amqp)."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from worker_helpers import QUEUE, ROOT_DIR, TESTS_DIR, WorkerProcess, wait_until, write_config

from rbit.cli import ExitCode

OTHER = "other_q"
FIELDS = ("time", "queue", "job_id", "status", "worker", "message")


class Watch:
    """``python -m rbit watch CONFIG ARGS``, its stdout read line by line."""

    def __init__(self, config: Path, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": f"{ROOT_DIR}:{TESTS_DIR}"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rbit", "watch", str(config), *args], cwd=str(ROOT_DIR),
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)
        self.lines: list[list[str]] = []
        self._pending = b""

    def until(self, predicate, timeout: float = 30.0) -> list[list[str]]:
        """Read lines until ``predicate(lines)``; every line has the six fields."""
        deadline = time.monotonic() + timeout
        while not predicate(self.lines):
            left = deadline - time.monotonic()
            assert left > 0, f"rbit watch printed only {self.lines}"
            if self._selector.select(min(left, 1.0)):
                # os.read, not readline: a buffered reader could keep a second line
                # where select() no longer sees it.
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                assert chunk, f"rbit watch ended: {self.proc.stderr.read()!r}"
                self._take(chunk)
        return self.lines

    def _take(self, chunk: bytes) -> None:
        *complete, self._pending = (self._pending + chunk).split(b"\n")
        for raw in complete:
            fields = raw.decode("utf-8").split("\t")
            assert len(fields) == len(FIELDS), raw
            self.lines.append(fields)

    def stop(self, sig: int) -> tuple[int, str]:
        """Send ``sig``; the exit code and what was printed on stderr."""
        self.proc.send_signal(sig)
        _out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, err.decode("utf-8", "replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _status(lines, job_id: str, status: str) -> bool:
    return any(line[2] == job_id and line[3] == status for line in lines)


def _watch_queues(rabbit, vhost: str) -> int:
    """Server-named queues: one per ``rbit watch`` bound to the status exchange."""
    return sum(name.startswith("amq.gen-") for name in rabbit.list_queues(vhost))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_watch_prints_a_jobs_statuses_live_filtered_and_escaped(
        tmp_path, rabbit, vhost, amqp, out, sig):
    runners = {QUEUE: {"runner": "python!worker_runners:say_body_then_wait", "outdir": out},
               OTHER: {"runner": "python!worker_runners:succeed", "outdir": out}}
    config = write_config(tmp_path, rabbit.url(vhost), runners, status={"sinks": "amqp, log"})
    worker = WorkerProcess(config)
    by_job = by_queue = None
    try:
        # The worker declares the status exchange: a watch before it would find none.
        wait_until(lambda: "worker test-worker consuming" in worker.output, 30,
                   "the worker to consume")
        by_job = Watch(config, "--job", "j1")
        by_queue = Watch(config, "--queue", OTHER)
        wait_until(lambda: _watch_queues(rabbit, vhost) == 2, 30, "both watchers bound")
        amqp.publish(b"hello\tworld\n\x1b[31mred", routing_key="cnx.any.latex.pdf",
                     message_id="j1")
        # Live: the Building status is printed while the job still runs.
        lines = by_job.until(lambda ls: any(line[5] for line in ls))
        assert not (out / "j1.done").exists()
        assert lines[-1][1:5] == [QUEUE, "j1", "Building", "test-worker"]
        assert lines[-1][5] == "hello\\tworld\\n\\x1b[31mred"  # escaped, one line
        assert datetime.fromisoformat(lines[-1][0]).tzinfo is not None
        amqp.publish(b"x", exchange="", routing_key=OTHER, message_id="j2")
        amqp.publish(b"x", exchange="", routing_key=OTHER, message_id="j3")
        (out / "release").touch()
        lines = by_job.until(lambda ls: _status(ls, "j1", "Done"))
        assert {line[2] for line in lines} == {"j1"}
        assert [line[3] for line in lines][-1] == "Done"
        assert {line[3] for line in lines} <= {"Waiting", "Building", "Done"}
        lines = by_queue.until(lambda ls: _status(ls, "j2", "Done") and _status(ls, "j3", "Done"))
        assert {line[1] for line in lines} == {OTHER}
        assert {line[2] for line in lines} == {"j2", "j3"}
        for watch in (by_job, by_queue):
            code, err = watch.stop(sig)
            assert code == ExitCode.OK == 0, err
            assert "Traceback" not in err
    finally:
        for watch in (by_job, by_queue):
            if watch is not None:
                watch.kill()
        worker.kill()
