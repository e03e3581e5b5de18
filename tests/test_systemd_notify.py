"""systemd's notify protocol: a real worker process tells a fake NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import time

import pytest
from worker_helpers import WorkerProcess, wait_until, write_config

from rbit.systemd import Notifier

QUEUE = "notified"


class FakeSystemd:
    """A unix datagram socket bound where a worker is told systemd listens."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.lines: list[str] = []

    def wait_for(self, line: str, timeout: float = 20.0) -> int:
        """Read datagrams until one holds ``line``; its index in :attr:`lines`."""
        deadline = time.monotonic() + timeout
        while line not in self.lines:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {line!r} within {timeout} s; got {self.lines}")
            with contextlib.suppress(TimeoutError):
                self.lines.extend(self.sock.recv(4096).decode().split("\n"))
        return self.lines.index(line)

    def close(self) -> None:
        self.sock.close()


def test_a_worker_notifies_ready_watchdog_and_stopping(tmp_path, rabbit, vhost, monkeypatch):
    systemd = FakeSystemd(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # a beat every half second
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    config = write_config(tmp_path, rabbit.url(vhost),
                          {QUEUE: {"runner": "python!worker_runners:succeed",
                                   "outdir": tmp_path}})
    config.write_text(config.read_text() + "\n[http]\nbind = 127.0.0.1:0\n")
    worker = WorkerProcess(config)
    try:
        ready = systemd.wait_for("READY=1")
        assert any(line.startswith("STATUS=consuming 1 queues") for line in systemd.lines)
        watchdog = systemd.wait_for("WATCHDOG=1", timeout=5)
        assert ready < watchdog

        port = int(wait_until(lambda: re.search(r"HTTP endpoint on 127\.0\.0\.1:(\d+)",
                                                worker.output), 10, "the port")[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/healthz")
        assert connection.getresponse().status == 200
        connection.close()

        worker.signal(signal.SIGTERM)
        stopping = systemd.wait_for("STOPPING=1")
        assert stopping > ready
        assert worker.wait(30) == 0
    finally:
        worker.kill()
        systemd.close()


def test_an_abstract_socket_name_is_reached():
    name = f"@rbit-test-{os.getpid()}-{time.monotonic_ns()}"
    systemd = FakeSystemd(name)
    try:
        assert Notifier(name).ready("consuming 2 queues, 0 jobs running")
        systemd.wait_for("READY=1", timeout=5)
        assert "STATUS=consuming 2 queues, 0 jobs running" in systemd.lines
    finally:
        systemd.close()


@pytest.mark.parametrize(("environ", "interval"), [
    ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000"}, 2.0),
    ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}, None),
    ({"NOTIFY_SOCKET": "/x"}, None),
])
def test_the_watchdog_interval_is_half_the_timeout_for_this_process_only(environ, interval):
    assert Notifier.from_environ(environ, pid=4242).watchdog_interval == interval


def test_without_notify_socket_nothing_is_sent():
    assert not Notifier.from_environ({}).notify("READY=1")
