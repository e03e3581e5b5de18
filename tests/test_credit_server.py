"""The front door's socket server, with an in-process publisher confirming from a thread.

The real-broker path (``rbit.amqp.broker.Broker`` behind ``broker_publisher``) is covered at
the end with the session's RabbitMQ node.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import queue
import signal
import socket
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rbit.config import HostAddress
from rbit.credit import daemon
from rbit.credit.client import DaemonUnavailable, send
from rbit.credit.events import CreditEvent
from rbit.credit.protocol import MAX_LINE_BYTES, ProtocolError
from rbit.credit.server import CreditServer, Limits, ServerError
from rbit.credit.settings import load_credit_config
from rbit.errors import ConfigError

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


def unread_bytes(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive queue."""
    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0]


def accepts(path: str) -> bool:
    """Whether the server at ``path`` still takes a new connection."""
    try:
        connect(path).close()
    except (FileNotFoundError, ConnectionRefusedError):
        return False
    return True


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
        assert wait_for(lambda: publisher.calls >= 200, TIMEOUT), publisher.calls
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


def test_a_client_reading_its_replies_late_gets_them_all_in_order(
    running, publisher, socket_path
) -> None:
    # More reply bytes than a socket buffer holds: the server has to keep the rest and
    # stop reading that client meanwhile, while other clients are served as usual.
    count = 20000
    lines = [f"BOGUS{i:06d}{'x' * 30}\n".encode() for i in range(count)]
    with connect(socket_path) as sock:
        sender = threading.Thread(target=sock.sendall, args=(b"".join(lines),))
        sender.start()
        assert wait_for(lambda: unread_bytes(sock) >= 100_000, TIMEOUT), \
            "our receive queue (nearly) full"
        assert sender.is_alive()  # the server stopped reading us meanwhile
        assert exchange(socket_path, b"ALLOC,slot=other\n") == ["OK"]
        replies = read_replies(sock, count)
        sender.join(TIMEOUT)
    assert len(replies) == count
    assert replies[0] == "ER unknown command 'BOGUS000000" + "x" * 29 + "...'"
    assert replies[-1].startswith(f"ER unknown command 'BOGUS{count - 1:06d}")
    assert publisher.slots() == ["other"]


def test_a_connection_sending_now_and_then_is_not_closed_as_idle(publisher, socket_path):
    thread = ServerThread(
        CreditServer(publisher, unix_path=socket_path, limits=Limits(idle_timeout=0.3))
    )
    try:
        with connect(socket_path) as sock:
            for index in range(6):  # 0.6 s in all, never 0.3 s quiet
                sock.sendall(f"DISCARD,slot=s{index}\n".encode())
                assert read_replies(sock, 1) == ["OK"]
                time.sleep(0.1)  # pacing the client, not waiting for the server
            assert sock.recv(10) == b""  # then closed once it was quiet long enough
    finally:
        thread.stop()


def test_a_nack_answers_not_confirmed_and_a_publisher_failure_broker_unavailable(
        socket_path) -> None:
    def verdict(body: bytes) -> object:
        slot = json.loads(body)["args"]["slot"]
        return {"nack": False, "boom": RuntimeError("channel closed")}.get(slot, True)

    pub = ThreadedPublisher(verdict)
    thread = ServerThread(CreditServer(pub, unix_path=socket_path))
    try:
        payload = b"ALLOC,slot=nack\nALLOC,slot=boom\nALLOC,slot=fine\n"
        assert exchange(socket_path, payload, 3) == [
            "ER not confirmed", "ER broker unavailable", "OK"]
        assert pub.slots() == ["fine"]
    finally:
        thread.stop()
        pub.close()


def test_socket_is_group_only_and_its_directory_is_created(running, socket_path) -> None:
    mode = os.stat(socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660  # docs/credits.rst: created mode 0660
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
        assert wait_for(lambda: publisher.calls >= 2, TIMEOUT), "both lines published"
        stopping = threading.Thread(target=thread.stop)
        stopping.start()
        # The confirms come only once the stop is under way (no new connection taken).
        assert wait_for(lambda: not accepts(socket_path), TIMEOUT), "the server stopping"
        publisher.hold.set()
        assert read_replies(sock, 2) == ["OK", "OK"]
        stopping.join(TIMEOUT)
        assert not stopping.is_alive()
    finally:
        sock.close()
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
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


# ---------------------------------------------------------------------------------------
# Config, pid file and the rbit-credit command (real processes)

REPO = Path(__file__).resolve().parent.parent

OLD_DAEMON_CONFIG = """\
# The old daemon's config, as a site has it
[api]
api_url=http://credits.example/api
project_id=d6db27eb65704bb6acb3b83ceaf95e40
project_auth=561c18dedd604057
flush_interval=7

[server]
pidfile={pidfile}
loglevel=20
logfile={logfile}
socket=unix
bind={socket}
"""


def write_config(directory: Path, amqp: str, *, extra_server: str = "") -> Path:
    path = directory / "credit.conf"
    path.write_text(
        OLD_DAEMON_CONFIG.format(
            pidfile=directory / "credit.pid",
            logfile=directory / "credit.log",
            socket=directory / "credit.socket",
        )
        + extra_server
        + "\n[amqp]\n"
        + amqp
    )
    return path


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(f"/tmp/rbit-cd-{os.getpid()}-{time.monotonic_ns() % 10**9}")
    path.mkdir()
    yield path
    for child in sorted(path.rglob("*"), reverse=True):
        child.unlink() if not child.is_dir() else child.rmdir()
    path.rmdir()


def test_old_daemon_config_loads_with_an_amqp_section(short_dir: Path) -> None:
    path = write_config(short_dir, "url = amqp://u:p@rabbit.example:5673/v\ncredit_queue = q.c\n")
    settings = load_credit_config(str(path), environ={})
    assert settings.unix_path == str(short_dir / "credit.socket")
    assert settings.pidfile == str(short_dir / "credit.pid")
    assert (settings.loglevel, settings.logfile) == (20, str(short_dir / "credit.log"))
    assert settings.api.api_key == "d6db27eb65704bb6acb3b83ceaf95e40"
    assert settings.api.api_secret == "561c18dedd604057"  # noqa: S105
    assert settings.api.flush_interval == 7.0
    assert settings.amqp.hosts == (HostAddress("rabbit.example", 5673),)
    assert settings.amqp.virtual_host == "v"
    assert settings.credit_queue == "q.c"
    assert "561c18dedd604057" not in repr(settings)


def test_defaults_and_tcp_bind(tmp_path: Path) -> None:
    path = tmp_path / "c.conf"
    path.write_text("[amqp]\nhost = localhost\n")
    settings = load_credit_config(str(path), environ={})
    assert (settings.socket, settings.unix_path) == ("unix", "/run/rbit/credit.socket")
    assert settings.pidfile == "/run/rbit/credit.pid"
    assert settings.credit_queue == "rbit.credits"
    path.write_text("[server]\nsocket = TCP\nbind = [::1]:9999\n[amqp]\nhost = localhost\n")
    settings = load_credit_config(str(path), environ={})
    assert (settings.socket, settings.host, settings.port) == ("tcp", "::1", 9999)


@pytest.mark.parametrize(
    ("text", "section", "key"),
    [
        ("[server]\nsocket = udp\n[amqp]\n", "server", "socket"),
        ("[server]\nsocket = tcp\nbind = nowhere\n[amqp]\n", "server", "bind"),
        ("[server]\nloglevel = chatty\n[amqp]\n", "server", "loglevel"),
        ("[api]\nflush_interval = soon\n[amqp]\n", "api", "flush_interval"),
        ("[api]\napi_key = a\nproject_id = b\n[amqp]\n", "api", "project_id"),
        ("[amqp]\nport = many\n", "amqp", "port"),
        ("[amqp]\ncredit_queue =\n", "amqp", "credit_queue"),
        ("[server]\n", "amqp", ""),
    ],
)
def test_config_errors_name_file_section_and_key(tmp_path: Path, text, section, key) -> None:
    path = tmp_path / "c.conf"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_credit_config(str(path), environ={})
    assert (caught.value.file, caught.value.section, caught.value.key) == (str(path), section, key)


def test_pidfile_is_written_atomically_and_readable_by_all(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "credit.pid")
    daemon.write_pidfile(path, 4242)
    assert Path(path).read_text() == "4242\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert os.listdir(tmp_path / "run") == ["credit.pid"]


def test_a_dead_pid_is_stale_and_stop_removes_it(tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    path = str(tmp_path / "credit.pid")
    daemon.write_pidfile(path, int(gone.stdout))
    assert daemon.running_pid(path) is None
    assert daemon.stop_daemon(path) is None
    assert not os.path.exists(path)


def test_a_live_unrelated_process_is_not_taken_for_the_daemon(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        path = str(tmp_path / "credit.pid")
        daemon.write_pidfile(path, sleeper.pid)
        assert daemon.running_pid(path) is None  # a reused pid is never signalled
    finally:
        sleeper.kill()
        sleeper.wait()


def cli(config: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rbit.credit.cli", "--config", str(config), *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_status_without_a_daemon_is_3_and_with_a_stale_pid_file_1(short_dir: Path) -> None:
    config = write_config(short_dir, "host = 127.0.0.1\n")
    assert cli(config, "status").returncode == 3
    (short_dir / "credit.pid").write_text("999999999\n")
    assert cli(config, "status").returncode == 1
    assert cli(config, "stop").returncode == 0  # stopping a stopped daemon is fine


def test_run_exits_7_when_rabbitmq_is_unreachable(short_dir: Path) -> None:
    config = write_config(short_dir, f"host = 127.0.0.1:{free_tcp_port()}\nconnect_timeout = 1\n")
    done = cli(config, "run")
    assert done.returncode == 7, done.stderr
    assert not (short_dir / "credit.pid").exists()


def test_send_verb_refuses_a_malformed_line_without_a_broker(short_dir: Path) -> None:
    config = write_config(short_dir, "host = 127.0.0.1\n")
    done = cli(config, "send", "ALLOC,credits=3")
    assert (done.returncode, done.stdout) == (1, "ER missing argument 'slot'\n")


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # the polling interval of a bounded wait
    return True


def drain_queue(url: str, queue_name: str) -> list[tuple[dict, object]]:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        messages = []
        while True:
            method, props, body = channel.basic_get(queue_name, auto_ack=True)
            if method is None:
                return messages
            messages.append((json.loads(body), props))
    finally:
        connection.close()


def test_run_serves_until_sigterm_and_status_follows(rabbit, vhost, short_dir: Path) -> None:
    config = write_config(short_dir, f"url = {rabbit.url(vhost)}\n")
    sock_path = str(short_dir / "credit.socket")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rbit.credit.cli", "--config", str(config), "run"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert wait_for(lambda: os.path.exists(sock_path) and cli(config, "status").returncode == 0)
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o660
        send("ALLOC,slot=job42,credits=10", socket_path=sock_path)
        with pytest.raises(ProtocolError, match="unknown argument 'colour'"):
            send("ALLOC,slot=job43,colour=red", socket_path=sock_path)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: send(f"CLAIM,slot=s{i},machine=m", socket_path=sock_path),
                          range(64)))
        resent = CreditEvent("meta", {"slot": "job42", "note": "again"})
        send(resent, socket_path=sock_path)
        send(resent, socket_path=sock_path)  # as after a timeout: the same id again
        assert cli(config, "stop").returncode == 0
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert cli(config, "status").returncode == 3
    assert not os.path.exists(sock_path)
    messages = drain_queue(rabbit.url(vhost), "rbit.credits")
    events = [event for event, _ in messages]
    assert events[0]["args"] == {"slot": "job42", "credits": 10}
    claims = [e["args"]["slot"] for e in events if e["command"] == "claim"]
    assert sorted(claims) == sorted(f"s{i}" for i in range(64))
    assert [e["id"] for e in events if e["command"] == "meta"] == [resent.id, resent.id]
    for event, props in messages:
        assert props.message_id == event["id"]
        assert props.content_type == "application/json"
        assert props.delivery_mode == 2


def test_start_daemonizes_refuses_a_second_start_and_stop_stops_it(
    rabbit, vhost, short_dir: Path
) -> None:
    config = write_config(short_dir, f"url = {rabbit.url(vhost)}\n")
    sock_path = str(short_dir / "credit.socket")
    started = cli(config, "start")
    try:
        assert started.returncode == 0, started.stderr
        pid = daemon.read_pid(str(short_dir / "credit.pid"))
        assert pid is not None
        assert daemon.pid_alive(pid)
        assert os.getsid(pid) != os.getsid(0)  # detached into a session of its own
        send("DISCARD,slot=x,reason=oom", socket_path=sock_path)
        again = cli(config, "start")
        assert again.returncode == 4
        assert "already running" in again.stderr
        assert cli(config, "status").returncode == 0
        assert cli(config, "stop").returncode == 0
        assert not daemon.pid_alive(pid)
    finally:
        pid = daemon.read_pid(str(short_dir / "credit.pid"))
        if pid is not None and daemon.pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert cli(config, "status").returncode == 3
    with pytest.raises(DaemonUnavailable):
        send("DISCARD,slot=x", socket_path=sock_path, timeout=2)
    assert "stopped" in (short_dir / "credit.log").read_text()


def test_send_verb_publishes_straight_to_rabbitmq(rabbit, vhost, short_dir: Path) -> None:
    config = write_config(short_dir, f"url = {rabbit.url(vhost)}\ncredit_queue = my.credits\n")
    done = cli(config, "send", "counters,slot=a,cpu/s=+5")
    assert (done.returncode, done.stdout) == (0, "OK\n"), done.stderr
    [(event, _)] = drain_queue(rabbit.url(vhost), "my.credits")
    assert (event["command"], event["args"]) == ("counters", {"slot": "a", "cpu/s": 5})


def test_a_line_without_a_confirm_is_answered_within_the_reply_timeout(socket_path) -> None:
    pub = ThreadedPublisher()
    pub.hold.clear()  # the broker never confirms (a frozen node)
    thread = ServerThread(
        CreditServer(pub, unix_path=socket_path, limits=Limits(reply_timeout=0.5)))
    try:
        with connect(socket_path) as sock:
            sock.sendall(b"ALLOC,slot=a\nALLOC,slot=b\n")
            began = time.monotonic()
            assert read_replies(sock, 2) == ["ER not confirmed", "ER not confirmed"]
            assert time.monotonic() - began < TIMEOUT
            pub.hold.set()  # the late confirms change nothing: one reply per line
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(100) == b""
    finally:
        thread.stop()
        pub.close()


def test_one_client_over_max_connections_is_answered_er_at_once(publisher, socket_path) -> None:
    thread = ServerThread(CreditServer(
        publisher, unix_path=socket_path, limits=Limits(max_connections=2, idle_timeout=None)))
    try:
        with connect(socket_path) as first, connect(socket_path) as second:
            first.sendall(b"DISCARD,slot=x\n")
            assert read_replies(first, 1) == ["OK"]  # both are being served now
            second.sendall(b"DISCARD,slot=y\n")
            assert read_replies(second, 1) == ["OK"]
            # Turned away on arrival, unasked: a line sent now could meet a closed socket.
            with connect(socket_path) as third:
                assert read_replies(third, 1) == ["ER too many connections"]
        assert wait_for(lambda: exchange(socket_path, b"DISCARD,slot=w\n") == ["OK"])
        assert publisher.slots() == ["x", "y", "w"]
    finally:
        thread.stop()


def test_a_half_line_is_refused_and_closed_after_the_line_timeout(publisher, socket_path):
    thread = ServerThread(CreditServer(
        publisher, unix_path=socket_path, limits=Limits(line_timeout=0.5, idle_timeout=None)))
    try:
        with connect(socket_path) as sock:
            sock.sendall(b"DISCARD,slot=ok\nALLOC,slot=half,cre")
            data = b""
            while chunk := sock.recv(100):  # the server hangs up by itself
                data += chunk
            assert data == b"OK\nER line not completed in time\n"
        assert publisher.slots() == ["ok"]
    finally:
        thread.stop()


def test_new_server_limits_are_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "c.conf"
    path.write_text("[server]\nreply_timeout = 2.5\nline_timeout = 4\nmax_connections = 50\n"
                    "[amqp]\nhost = localhost\n")
    settings = load_credit_config(str(path), environ={})
    assert (settings.reply_timeout, settings.line_timeout, settings.max_connections) == (
        2.5, 4.0, 50)
    assert not settings.warnings
    for bad in ("reply_timeout = 0", "line_timeout = never", "max_connections = 0"):
        path.write_text(f"[server]\n{bad}\n[amqp]\nhost = localhost\n")
        with pytest.raises(ConfigError) as caught:
            load_credit_config(str(path), environ={})
        assert (caught.value.section, caught.value.key) == ("server", bad.split()[0])
