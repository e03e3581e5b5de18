"""Helpers for the fault tests: worker processes, job publishing, record files.

Workers run as real processes (``python -m rbit CONFIG``) so that they can be killed
with SIGKILL; runners from :mod:`fault_runners` record every run in a file (see there).
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pika
from worker_helpers import wait_until  # also shared by the fault tests

TESTS_DIR = Path(__file__).resolve().parent
ROOT_DIR = TESTS_DIR.parent
QUEUE = "faults"


def write_config(path: Path, amqp: dict[str, Any], runner: dict[str, Any], *,
                 rbit: dict[str, Any] | None = None, status: dict[str, Any] | None = None,
                 queue: str = QUEUE) -> Path:
    """Write a worker ini file with one runner section for ``queue``."""
    sections = {
        "rbit": {"name": "fault-worker", "polling_time": 5, "shutdown_grace": 5,
                 "state_dir": path.parent / f"state-{path.stem}", **(rbit or {})},
        "amqp": {"connect_timeout": 2, "reconnect_delay": 0.2, "reconnect_max_delay": 1,
                 "heartbeat": 5, **amqp},
        f"runner:{queue}": {"routing_key": queue, **runner},
    }
    if status is not None:
        sections["status"] = status
    lines = []
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {value}" for key, value in keys.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def amqp_keys(rabbit: Any, vhost: str) -> dict[str, Any]:
    return {"host": f"{rabbit.host}:{rabbit.port}", "virtual_host": vhost}


class WorkerProcess:
    """``python -m rbit CONFIG`` in its own process, logging to a file."""

    def __init__(self, config: Path, log: Path, *extra: str) -> None:
        self.config = config
        self.log = log
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(ROOT_DIR),
                                             env.get("PYTHONPATH", "")])
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rbit", str(self.config), *self.extra],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=ROOT_DIR, env=env)
        return self

    def kill(self) -> None:
        """SIGKILL: no goodbye, no ack, no flush."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it lingers."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_consuming(self, timeout: float = 30.0) -> WorkerProcess:
        """Wait until the worker logged that it consumes; fail after ``timeout`` s."""
        wait_until(lambda: "consuming" in self.text(), timeout, f"{self.log.stem} consuming")
        return self


class Records:
    """The lines the fault runners appended to a record file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[list[str]]:
        if not self.path.exists():
            return []
        return [line.split("\t") for line in self.path.read_text().splitlines()]

    def events(self, event: str) -> list[list[str]]:
        return [fields for fields in self.lines() if fields[0] == event]

    def count(self, event: str = "done") -> collections.Counter:
        """How many times each job id has ``event``."""
        return collections.Counter(fields[1] for fields in self.events(event))


class Publisher:
    """A confirmed, blocking pika connection that publishes jobs by id."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def declare(self, queue: str = QUEUE, arguments: dict | None = None) -> None:
        self.channel.queue_declare(queue, durable=True, arguments=arguments)

    def jobs(self, ids: list[str], queue: str = QUEUE, body: bytes | None = None) -> None:
        for job_id in ids:
            props = pika.BasicProperties(delivery_mode=2, message_id=job_id)
            payload = body if body is not None else f'{{"job": "{job_id}"}}'.encode()
            self.channel.basic_publish("", queue, payload, props, mandatory=True)

    def get(self, queue: str) -> tuple[Any, Any, bytes] | None:
        """Take one message (acked at once) or None."""
        method, props, body = self.channel.basic_get(queue, auto_ack=True)
        return None if method is None else (method, props, body)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


def queue_totals(rabbit: Any, vhost: str, prefix: str = QUEUE,
                 blank: int | None = 0) -> dict[str, tuple[int, int]]:
    """``{queue: (ready, unacked)}`` of the queues whose names start with ``prefix``
    (a count the broker left blank reads as ``blank``)."""
    return {name: counts for name, counts in rabbit.list_queues(vhost, blank).items()
            if name.startswith(prefix)}


def all_empty(rabbit: Any, vhost: str, prefix: str = QUEUE) -> bool:
    """Whether every queue of the test holds nothing, ready or unacked.

    A count the broker left blank (a queue too busy to answer) is not taken for zero,
    nor is a listing without the work queue ``prefix`` itself (left out, or not yet
    declared): an empty answer must not pass for empty queues.
    """
    queues = queue_totals(rabbit, vhost, prefix, blank=None)
    return prefix in queues and all(counts == (0, 0) for counts in queues.values())
