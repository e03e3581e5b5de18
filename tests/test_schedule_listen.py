"""``listen = unix:PATH | tcp:HOST:PORT`` schedules: a real worker, real sockets, RabbitMQ.

Every job leaves a file named by its job id (:mod:`local_schedule_runners`) holding its
body, so each ``OK <job id>`` a client got is matched with the job that ran.
"""

from __future__ import annotations

import json
import re
import socket
import stat
import threading
from pathlib import Path

import pytest
from fault_helpers import WorkerProcess
from local_schedule_runners import worker_config
from rabbit import free_port
from test_config_errors import EXIT_CONFIG, assert_config_error, run_rbit
from worker_helpers import wait_until

QUEUE = "lines"
OK = re.compile(rb"OK (in@[0-9a-f]{32})")


def listen_config(tmp_path: Path, url: str, out: Path, listen: str) -> Path:
    return worker_config(tmp_path, url, out, QUEUE, "in", f"listen = {listen}")


@pytest.fixture(params=["unix", "tcp"])
def address(request, tmp_path):
    """(listen value, socket family, address to connect to)."""
    if request.param == "unix":
        path = str(tmp_path / "run" / "in.sock")
        return f"unix:{path}", socket.AF_UNIX, path
    port = free_port()
    return f"tcp:127.0.0.1:{port}", socket.AF_INET, ("127.0.0.1", port)


@pytest.fixture
def listener(tmp_path, rabbit, vhost, out, address):
    listen, _family, _where = address
    config = listen_config(tmp_path, rabbit.url(vhost), out, listen)
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    worker.wait_consuming(60)
    wait_until(lambda: "front door listening" in worker.text(), 60, "the listen socket")
    yield worker
    assert worker.stop() == 0, worker.text()


def connect(address) -> socket.socket:
    _listen, family, where = address
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(where)
    return sock


def read_replies(sock: socket.socket, count: int) -> list[bytes]:
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.splitlines()


def jobs(out: Path) -> dict[str, str]:
    return {p.name: json.loads(p.read_bytes())["body"] for p in out.iterdir()
            if not p.name.startswith(".") and ".again." not in p.name}


def test_200_lines_from_16_clients_give_200_jobs_and_200_ok(listener, address, out):
    replies: dict[str, bytes] = {}
    errors: list[BaseException] = []

    def client(index: int) -> None:
        lines = [f"client {index} line {n} ✓" for n in range(index, 200, 16)]
        try:
            with connect(address) as sock:
                if index % 2:  # pipelined: every line at once, then the replies
                    sock.sendall("".join(f"{line}\n" for line in lines).encode())
                    got = read_replies(sock, len(lines))
                else:  # one at a time, each reply awaited
                    got = []
                    for line in lines:
                        sock.sendall(f"{line}\n".encode())
                        got += read_replies(sock, 1)
            for line, reply in zip(lines, got, strict=True):
                replies[line] = reply
        except BaseException as exc:  # noqa: BLE001 -- reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert len(replies) == 200
    ids = {}
    for line, reply in replies.items():
        match = OK.fullmatch(reply)
        assert match, reply
        ids[match[1].decode()] = line
    assert len(ids) == 200  # every job id unique
    wait_until(lambda: len(jobs(out)) >= 200, 120, "200 jobs")
    assert jobs(out) == ids  # each OK'd id ran once, with its line as the body
    assert [p for p in out.iterdir() if ".again." in p.name] == []


def test_malformed_and_over_long_lines_get_er_and_the_connection_stays_usable(
        listener, address, out):
    with connect(address) as sock:
        sock.sendall(b"\xff\xfe bad\n" + b"\r\n" + b"x" * 70_000 + b"\n" + b"good line\r\n")
        got = read_replies(sock, 4)
    assert got[:3] == [b"ER not UTF-8", b"ER empty line", b"ER line too long"]
    match = OK.fullmatch(got[3])
    assert match, got
    wait_until(lambda: jobs(out), 60, "the good line's job")
    assert jobs(out) == {match[1].decode(): "good line"}  # nothing else was published


def test_the_unix_socket_is_not_open_to_every_local_user(tmp_path, rabbit, vhost, out):
    path = tmp_path / "run" / "in.sock"
    config = listen_config(tmp_path, rabbit.url(vhost), out, f"unix:{path}")
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    try:
        wait_until(lambda: "front door listening" in worker.text(), 60, "the socket")
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
    finally:
        assert worker.stop() == 0, worker.text()
    assert not path.exists()  # removed at stop


@pytest.mark.parametrize("listen", [
    "tcp:127.0.0.1", "tcp:127.0.0.1:99999", "udp:127.0.0.1:9000", "unix:relative.sock",
    "/run/rbit/in.sock",
])
def test_a_bad_listen_address_is_a_config_error(tmp_path, listen):
    text = f"""
[runner:{QUEUE}]
runner = python!local_schedule_runners:record

[schedule:in]
queue = {QUEUE}
listen = {listen}
"""
    code, stderr, path = run_rbit(tmp_path, text)
    assert code == EXIT_CONFIG, stderr
    assert_config_error(stderr, path, "schedule:in", "listen",
                        "expected unix:/ABSOLUTE/PATH, tcp:HOST:PORT or tcp:PORT")
