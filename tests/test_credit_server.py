"""The front door's socket server, with an in-process publisher confirming from a thread.

The real-broker path (``rbit.broker.Broker`` behind ``broker_publisher``) is covered at
the end with the session's RabbitMQ node.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rbit.credit.protocol import MAX_LINE_BYTES
from rbit.credit.server import CreditServer, Limits, ServerError

TIMEOUT = 10.0


class ThreadedPublisher:
    """Confirms each publish from its own thread, like the broker's I/O thread does.

    ``verdict(body)`` decides each confirm: True, False, or an exception to raise from
    ``publish`` itself. ``hold`` (an Event) delays every confirm until it is set.
    """

    def __init__(self, verdict: Callable[[bytes], object] = lambda body: True) -> None:
        self.verdict = verdict
        self.published: list[dict] = []
        self.calls = 0  # publish() calls so far
        self.hold = threading.Event()
        self.hold.set()
        self._work: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._confirm, daemon=True)
        self._thread.start()

    def __call__(self, body: bytes, message_id: str, on_confirm: Callable[[bool], None]) -> None:
        self.calls += 1
        verdict = self.verdict(body)
        if isinstance(verdict, Exception):
            raise verdict
        self._work.put((body, message_id, bool(verdict), on_confirm))

    def _confirm(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            body, message_id, ok, on_confirm = item
            self.hold.wait()
            if ok:
                event = json.loads(body)
                assert event["id"] == message_id
                with self._lock:
                    self.published.append(event)
            on_confirm(ok)

    def close(self) -> None:
        self.hold.set()
        self._work.put(None)
        self._thread.join(TIMEOUT)

    def slots(self) -> list[str]:
        with self._lock:
            return [event["args"]["slot"] for event in self.published]


class ServerThread:
    """A CreditServer running on an event loop in a background thread."""

    def __init__(self, server: CreditServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.call(server.start())

    def call(self, coro, timeout: float = TIMEOUT):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 5.0) -> None:
        try:
            self.call(self.server.stop(grace), timeout=grace + TIMEOUT)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(TIMEOUT)
            self.loop.close()


@pytest.fixture
def publisher() -> Iterator[ThreadedPublisher]:
    pub = ThreadedPublisher()
    yield pub
    pub.close()


@pytest.fixture
def socket_path(tmp_path: Path) -> str:
    # AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    short = Path(f"/tmp/rbit-credit-{os.getpid()}-{id(tmp_path):x}")
    short.mkdir()
    yield str(short / "run" / "credit.socket")
    for child in sorted(short.rglob("*"), reverse=True):
        child.unlink() if not child.is_dir() else child.rmdir()
    short.rmdir()


@pytest.fixture
def running(publisher: ThreadedPublisher, socket_path: str) -> Iterator[ServerThread]:
    thread = ServerThread(CreditServer(publisher, unix_path=socket_path))
    yield thread
    thread.stop()


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def read_replies(sock: socket.socket, count: int) -> list[str]:
    data = b""
    while data.count(b"\n") < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode().splitlines()


def exchange(path: str, payload: bytes, replies: int = 1, *, half_close: bool = True) -> list[str]:
    """Send ``payload`` on a fresh connection (like ``nc -U``) and read the replies."""
    with connect(path) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_replies(sock, replies)


def test_a_valid_line_is_published_then_answered_ok(running, publisher, socket_path) -> None:
    assert exchange(socket_path, b"ALLOC,slot=job42,credits=10\n") == ["OK"]
    [event] = publisher.published
    assert (event["command"], event["args"]) == ("alloc", {"slot": "job42", "credits": 10})


def test_a_line_without_newline_at_end_of_input_still_counts(running, publisher, socket_path):
    assert exchange(socket_path, b"claim,slot=a,machine=m") == ["OK"]
    assert publisher.slots() == ["a"]


def test_client_that_never_half_closes_gets_its_reply_and_is_hung_up_on(
    publisher, socket_path
) -> None:
    thread = ServerThread(
        CreditServer(publisher, unix_path=socket_path, limits=Limits(idle_timeout=0.2))
    )
    try:
        with connect(socket_path) as sock:
            sock.sendall(b"DISCARD,slot=x\n")
            assert read_replies(sock, 1) == ["OK"]
            assert sock.recv(10) == b""  # the server closed the idle connection
    finally:
        thread.stop()


def test_sixteen_concurrent_clients_one_line_each_all_get_ok(running, publisher, socket_path):
    def one(index: int) -> list[str]:
        return exchange(socket_path, f"ALLOC,slot=job{index},credits=1\n".encode())

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(one, range(400)))
    assert replies == [["OK"]] * 400
    assert sorted(publisher.slots()) == sorted(f"job{i}" for i in range(400))


def test_pipelined_lines_are_all_published_before_any_confirm(running, publisher, socket_path):
    publisher.hold.clear()  # no confirm until every line was handed to the publisher
    lines = b"".join(f"META,slot=s{i},k=v\n".encode() for i in range(200))
    with connect(socket_path) as sock:
        sock.sendall(lines)
        deadline = time.monotonic() + TIMEOUT
        while publisher.calls < 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert publisher.calls == 200
        publisher.hold.set()
        assert read_replies(sock, 200) == ["OK"] * 200
    assert publisher.slots() == [f"s{i}" for i in range(200)]


def test_replies_follow_line_order_with_errors_in_between(running, publisher, socket_path):
    payload = b"ALLOC,slot=a\nBOGUS\nALLOC,slot=\nCLAIM,slot=a,machine=m\n"
    replies = exchange(socket_path, payload, 4)
    assert replies == ["OK", "ER unknown command 'BOGUS'", "ER empty slot", "OK"]
    assert publisher.slots() == ["a", "a"]


def test_malformed_lines_get_er_and_publish_nothing(running, publisher, socket_path) -> None:
    bad = [b"ALLOC,credits=3\n", b"ALLOC,slot=a,slot=b\n", b"COUNTERS,slot=a,x=y\n",
           b"ALLOC,slot=\xff\xfe\n", b"CLAIM,slot=a\n"]
    for line in bad:
        [reply] = exchange(socket_path, line)
        assert reply.startswith("ER ")
    assert publisher.published == []


def test_over_long_line_is_refused_and_the_next_line_still_works(running, publisher, socket_path):
    payload = b"META,slot=a,x=" + b"y" * (3 * MAX_LINE_BYTES) + b"\nALLOC,slot=b\n"
    assert exchange(socket_path, payload, 2) == ["ER line too long", "OK"]
    assert publisher.slots() == ["b"]


def test_garbage_and_mid_line_disconnects_do_not_stall_the_server(
    running, publisher, socket_path
) -> None:
    with connect(socket_path) as sock:
        sock.sendall(os.urandom(20000))
    with connect(socket_path) as sock:
        sock.sendall(b"ALLOC,slot=half")  # gone mid-line, without reading anything
    with connect(socket_path) as sock:
        sock.sendall(b"ALLOC,slot=x\n" * 50)  # gone before the replies
    assert exchange(socket_path, b"ALLOC,slot=after\n") == ["OK"]
    assert "after" in publisher.slots()


def test_broker_refusal_or_failure_answers_broker_unavailable(socket_path) -> None:
    def verdict(body: bytes) -> object:
        slot = json.loads(body)["args"]["slot"]
        return {"nack": False, "boom": RuntimeError("channel closed")}.get(slot, True)

    pub = ThreadedPublisher(verdict)
    thread = ServerThread(CreditServer(pub, unix_path=socket_path))
    try:
        payload = b"ALLOC,slot=nack\nALLOC,slot=boom\nALLOC,slot=fine\n"
        assert exchange(socket_path, payload, 3) == [
            "ER broker unavailable", "ER broker unavailable", "OK"]
        assert pub.slots() == ["fine"]
    finally:
        thread.stop()
        pub.close()


def test_socket_is_group_only_and_its_directory_is_created(running, socket_path) -> None:
    mode = os.stat(socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) & 0o117 == 0  # 0660 or tighter
    assert stat.S_IMODE(os.stat(os.path.dirname(socket_path)).st_mode) == 0o755


def test_stale_socket_file_is_replaced(publisher, socket_path) -> None:
    os.makedirs(os.path.dirname(socket_path))
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(socket_path)
    stale.close()  # the file stays, nobody listens
    thread = ServerThread(CreditServer(publisher, unix_path=socket_path))
    try:
        assert exchange(socket_path, b"ALLOC,slot=a\n") == ["OK"]
    finally:
        thread.stop()
    assert not os.path.exists(socket_path)


def test_refuses_to_start_when_another_daemon_answers(running, publisher, socket_path) -> None:
    second = CreditServer(publisher, unix_path=socket_path)
    with pytest.raises(ServerError, match="another daemon"):
        asyncio.run(second.start())
    assert exchange(socket_path, b"ALLOC,slot=still\n") == ["OK"]


def test_refuses_to_replace_a_regular_file(publisher, tmp_path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    with pytest.raises(ServerError, match="not a socket"):
        asyncio.run(CreditServer(publisher, unix_path=str(path)).start())
    assert path.read_text() == "precious"


def test_stop_lets_lines_in_flight_get_their_replies(publisher, socket_path) -> None:
    thread = ServerThread(CreditServer(publisher, unix_path=socket_path))
    publisher.hold.clear()
    sock = connect(socket_path)
    try:
        sock.sendall(b"ALLOC,slot=a\nALLOC,slot=b\n")
        deadline = time.monotonic() + TIMEOUT
        while publisher.calls < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        stopping = threading.Thread(target=thread.stop)
        stopping.start()
        threading.Timer(0.2, publisher.hold.set).start()
        assert read_replies(sock, 2) == ["OK", "OK"]
        stopping.join(TIMEOUT)
        assert not stopping.is_alive()
    finally:
        sock.close()
    with pytest.raises(OSError):
        connect(socket_path)


def test_tcp_listener_serves_the_same_protocol(publisher) -> None:
    thread = ServerThread(CreditServer(publisher, host="127.0.0.1", port=0))
    try:
        host, port = thread.server.address
        with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
            sock.sendall(b"counters,slot=a,cpu/seconds=+12\n")
            assert read_replies(sock, 1) == ["OK"]
        assert publisher.published[0]["args"] == {"slot": "a", "cpu/seconds": 12}
    finally:
        thread.stop()
