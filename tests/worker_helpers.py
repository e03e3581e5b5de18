"""Helpers for the end-to-end worker tests: configs, publishing, watching, waiting.

Everything here talks to the real broker of the ``rabbit`` fixture. pika is used
directly (the tests play PyBit and the watchers); rbit itself is run either in-process
(:func:`running_worker`) or as a real process (:class:`WorkerProcess`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika

from rbit.config import load_config
from rbit.worker import Worker
from rbitext.examples import build_request_body

TESTS_DIR = Path(__file__).resolve().parent
ROOT_DIR = TESTS_DIR.parent
QUEUE = "cnx_any_latex_pdf"
ROUTE = "cnx.any.latex.pdf"


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something true; return that value.

    Raises:
        AssertionError: Not true within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)  # the polling interval of a bounded wait


# ------------------------------------------------------------------------ configs


def write_config(tmp_path: Path, url: str, runners: dict[str, dict[str, Any]], *,
                 rbit: dict[str, Any] | None = None, amqp: dict[str, Any] | None = None,
                 status: dict[str, Any] | None = None, name: str = "worker.ini") -> Path:
    """Write an rbit ini file; ``runners`` maps queue names to their section's keys."""
    # Each config gets a state directory of its own: no history or pause shared.
    state_dir = tmp_path / f"state-{Path(name).stem}"
    sections: dict[str, dict[str, Any]] = {
        "rbit": {"name": "test-worker", "polling_time": 1, "state_dir": state_dir,
                 **(rbit or {})},
        "amqp": {"url": url, "connect_timeout": 2, **(amqp or {})},
    }
    if status is not None:
        sections["status"] = status
    for queue, keys in runners.items():
        sections[f"runner:{queue}"] = keys
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in keys.items())
        lines.append("")
    path = tmp_path / name
    path.write_text("\n".join(lines))
    return path


@contextlib.contextmanager
def running_worker(config: Path, poll_time: float | None = None) -> Iterator[Worker]:
    """An in-process worker, started and connected; shut down gracefully on exit."""
    settings = load_config(str(config))
    worker = Worker(settings, poll_time=poll_time)
    worker.start(timeout=60)  # generous: a loaded machine's broker is slow to declare
    try:
        yield worker
    finally:
        worker.shutdown(threading.Event(), grace=15)


# ----------------------------------------------------------------------- broker side


class Amqp:
    """A blocking pika connection playing the publisher and the watcher."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def publish(self, body: bytes, *, exchange: str = "pybit", routing_key: str = ROUTE,
                message_id: str | None = None, headers: dict | None = None) -> None:
        """Publish a persistent job; mandatory, so an unrouted job fails the test."""
        props = pika.BasicProperties(delivery_mode=2, message_id=message_id, headers=headers)
        self.channel.basic_publish(exchange, routing_key, body, props, mandatory=True)

    def publish_jobs(self, ids: list[str], **kwargs: Any) -> None:
        for job_id in ids:
            self.publish(json.dumps({"job": job_id}).encode(), message_id=job_id, **kwargs)

    def get(self, queue: str) -> tuple[Any, Any, bytes] | None:
        """Take one message (acked) or ``None``."""
        method, props, body = self.channel.basic_get(queue, auto_ack=True)
        return None if method is None else (method, props, body)

    def watch(self, exchange: str, binding: str = "#", kind: str = "topic") -> StatusWatcher:
        """Bind a private queue to ``exchange`` (declared here if missing)."""
        self.channel.exchange_declare(exchange, kind, durable=True)
        queue = self.channel.queue_declare("", exclusive=True).method.queue
        self.channel.queue_bind(queue, exchange, binding)
        return StatusWatcher(self, queue)


class StatusWatcher:
    """Reads the JSON status events that reach its private queue."""

    def __init__(self, amqp: Amqp, queue: str) -> None:
        self.amqp = amqp
        self.queue = queue
        self.events: list[dict[str, Any]] = []

    def _drain(self) -> None:
        while True:
            method, _props, body = self.amqp.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                return
            event = json.loads(body)
            event["routing_key"] = method.routing_key
            self.events.append(event)

    def for_job(self, job_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["job_id"] == job_id]

    def wait_for(self, job_id: str, status: str, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Wait until ``job_id`` reached ``status``; return the job's events so far."""
        def reached() -> bool:
            self._drain()
            return any(e["status"] == status for e in self.for_job(job_id))

        wait_until(reached, timeout, f"status {status} of job {job_id}")
        return self.for_job(job_id)


def pybit_body(job_id: int, package: str = "col10001", version: str = "1.0") -> bytes:
    """A BuildRequest as PyBit's jsonpickle writes it (classes ``pybit.models.*``)."""
    return build_request_body(job_id, package, version, web_host="pybit.example:8080")


def connections(rabbit: Any, vhost: str) -> list[str]:
    """Erlang pids of the open client connections to ``vhost``."""
    out = rabbit.ctl("list_connections", "-q", "--no-table-headers", "vhost", "pid")
    pids = []
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) == 2 and fields[0] == vhost:
            pids.append(fields[1])
    return pids


def run_long_job_on_one_connection(config: Path, rabbit: Any, vhost: str, amqp: Any,
                                   queue: str, started: Path, ack_timeout: float) -> None:
    """Runs job ``long`` (``started`` appears when it starts) until it is acked.

    Asserts that the worker kept the very same connection throughout: its I/O thread
    answered the heartbeats while the job ran.
    """
    with running_worker(config, poll_time=30):
        before = connections(rabbit, vhost)
        amqp.publish_jobs(["long"], exchange="", routing_key=queue)
        wait_until(started.exists, 10, "the job to start")
        wait_until(lambda: rabbit.list_queues(vhost)[queue] == (0, 0), ack_timeout,
                   "the job to be acked")
        after = connections(rabbit, vhost)
    assert len(before) == 2  # ours and the worker's
    assert after == before


def consumer_prefetch(rabbit: Any, vhost: str, queue: str) -> list[int]:
    """The prefetch counts of the consumers of ``queue``."""
    out = rabbit.ctl("list_consumers", "-p", vhost, "-q", "--no-table-headers",
                     "queue_name", "prefetch_count")
    counts = []
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) == 2 and fields[0] == queue:
            counts.append(int(fields[1]))
    return counts


# ------------------------------------------------------------------------ processes


class WorkerProcess:
    """``python -m rbit CONFIG`` as a real process, in a session of its own."""

    def __init__(self, config: Path, *args: str, module: str = "rbit") -> None:
        """Start ``python -m MODULE CONFIG ARGS`` (``module``: rbit, or a test's wrapper)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT_DIR), str(TESTS_DIR), env.get("PYTHONPATH", "")])
        self.log_path = config.with_suffix(".log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, str(config), *args],
            cwd=str(ROOT_DIR), env=env, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is not None:
                self._log.close()

    def kill(self) -> None:
        """Kill the worker's whole process group (cleanup after a failed test)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    # ProcessLookupError: the process was reaped between the open and the read.
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"
