"""The credit front door (``rbit-credit run``, a real process) against a real broker going away.

Every line gets ``OK`` or ``ER`` within the documented bound; an event answered ``ER
broker unavailable`` never reaches the credit queue, not even after the broker is back;
every event answered ``OK`` is there exactly once; a deleted credit queue is answered
``ER`` and declared again; stalled clients are closed without keeping others waiting.
Events are counted in the queue by their ``event_id``.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pika
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.fault]

REPO = Path(__file__).resolve().parent.parent
QUEUE = "credits.faults"
REPLY_TIMEOUT = 3.0
LINE_TIMEOUT = 2.0
# A line's reply is due within REPLY_TIMEOUT; the margin absorbs a loaded 2-core machine
# (before the fix the broker outage left clients waiting 20 s and more).
REPLY_BOUND = REPLY_TIMEOUT + 4.0
WAIT = 60.0


def wait_for(condition: Callable[[], object], timeout: float = WAIT) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {condition}")
        time.sleep(0.05)  # the polling interval of a bounded wait


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    path = Path(f"/tmp/rbit-cf-{os.getpid()}-{time.monotonic_ns() % 10**9}")
    path.mkdir()
    yield path
    for child in sorted(path.rglob("*"), reverse=True):
        child.unlink() if not child.is_dir() else child.rmdir()
    path.rmdir()


class Daemon:
    """``rbit-credit --config FILE run`` as a child process."""

    def __init__(self, directory: Path, amqp_url: str, **server: object) -> None:
        self.socket = str(directory / "credit.socket")
        self.log = directory / "credit.log"
        extra = "".join(f"{key} = {value}\n" for key, value in server.items())
        self.config = directory / "credit.conf"
        self.config.write_text(
            f"[server]\nsocket = unix\nbind = {self.socket}\npidfile = {directory}/credit.pid\n"
            f"logfile = {self.log}\nreply_timeout = {REPLY_TIMEOUT}\n"
            f"line_timeout = {LINE_TIMEOUT}\n{extra}"
            f"[amqp]\nurl = {amqp_url}\ncredit_queue = {QUEUE}\n"
            "reconnect_delay = 0.2\nreconnect_max_delay = 1\nconnect_timeout = 2\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Daemon:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rbit.credit.cli", "--config", str(self.config), "run"],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: self._answers() or self.proc.poll() is not None)
        assert self.proc.poll() is None, self.log.read_text() if self.log.exists() else ""
        return self

    def _answers(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(self.socket)
            return True
        except OSError:
            return False

    def stop(self) -> int:
        """SIGTERM; the exit code (0 is a clean stop)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def send_line(path: str, line: str, timeout: float = 30.0) -> tuple[str | None, float]:
    """One line on a fresh connection, like ``echo LINE | nc -U``: (reply, seconds)."""
    began = time.monotonic()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(line.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        try:
            while b"\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
    reply = data.partition(b"\n")[0].decode() if b"\n" in data else None
    return reply, time.monotonic() - began


def queued_ids(url: str, queue: str = QUEUE) -> Counter[str]:
    """How many times each event id is in ``queue`` (messages are taken off it)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        ids: Counter[str] = Counter()
        while True:
            method, props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return ids
            event = json.loads(body)
            assert props.message_id == event["id"]
            ids[event["id"]] += 1
    finally:
        connection.close()


class Clients:
    """Threads sending one line per connection, each with its own event_id, until stopped."""

    def __init__(self, path: str, count: int) -> None:
        self.path = path
        self.replies: dict[str, tuple[str | None, float]] = {}
        self.sent_at: dict[str, float] = {}  # monotonic time each line was sent
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._serial = itertools.count()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(count)]

    def __enter__(self) -> Clients:
        for thread in self._threads:
            thread.start()
        return self

    def _run(self, number: int) -> None:
        while not self._stop.is_set():
            event_id = f"outage-{number}-{next(self._serial):08d}"
            line = f"COUNTERS,slot=job{number},cpu=+1,event_id={event_id}"
            with self._lock:
                self.sent_at[event_id] = time.monotonic()
            try:
                outcome = send_line(self.path, line)
            except OSError as exc:  # the daemon must never refuse a connection here
                outcome = (f"connection failed: {exc}", 0.0)
            with self._lock:
                self.replies[event_id] = outcome
            time.sleep(0.01)  # pacing the clients, not waiting for anything

    def count(self, reply: str) -> int:
        with self._lock:
            return sum(1 for got, _ in self.replies.values() if got == reply)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(WAIT)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def test_broker_outage_every_line_answered_in_time_and_no_er_event_published_later(
        rabbit, vhost, run_dir):
    url = rabbit.url(vhost)
    with Daemon(run_dir, url) as daemon, Clients(daemon.socket, 4) as clients:
        wait_for(lambda: clients.count("OK") >= 20)
        rabbit.stop_app()  # closes the daemon's connection before it returns
        cut = time.monotonic()
        try:
            wait_for(lambda: clients.count("ER broker unavailable") >= 20)
        finally:
            rabbit.start_app()
        oks_before = clients.count("OK")
        wait_for(lambda: clients.count("OK") >= oks_before + 20)  # reconnected
        clients.stop()
        assert daemon.stop() == 0
    # The daemon is gone: nothing it held could still be published after this point.
    queued = queued_ids(url)
    replies = clients.replies
    by_reply = Counter(reply for reply, _ in replies.values())
    assert set(by_reply) <= {"OK", "ER broker unavailable", "ER not confirmed"}, by_reply
    slow = {i: r for i, r in replies.items() if r[1] > REPLY_BOUND}
    assert not slow, f"{len(slow)} lines answered after more than {REPLY_BOUND} s: {slow}"
    for event_id, (reply, _) in replies.items():
        if reply == "OK":
            assert queued[event_id] == 1, (event_id, reply)
        elif reply == "ER broker unavailable":
            assert queued[event_id] == 0, (event_id, reply)
        else:  # "not confirmed": written before the outage cut it; in the queue at most once
            assert queued[event_id] <= 1, (event_id, reply)
            # Only a line in flight when the connection went can be "not confirmed"; one
            # sent during the outage was never written, and must never be (a held line
            # would be answered late and published after the reconnect).
            assert clients.sent_at[event_id] < cut + 1.0, (event_id, reply)
    assert set(queued) <= set(replies)  # nothing else reached the queue


def test_deleted_credit_queue_is_answered_er_then_declared_again(rabbit, vhost, run_dir):
    url = rabbit.url(vhost)
    with Daemon(run_dir, url) as daemon:
        assert send_line(daemon.socket, "ALLOC,slot=a,credits=1,event_id=before-delete")[0] == "OK"
        connection = pika.BlockingConnection(pika.URLParameters(url))
        connection.channel().queue_delete(QUEUE)
        connection.close()
        reply, _ = send_line(daemon.socket, "ALLOC,slot=b,credits=1,event_id=while-missing")
        assert reply == "ER credit queue missing"
        reply, _ = send_line(daemon.socket, "ALLOC,slot=c,credits=1,event_id=after-redeclare")
        assert reply == "OK"
        assert daemon.stop() == 0
    assert queued_ids(url) == Counter({"after-redeclare": 1})  # the first went with the queue


def test_stalled_half_line_clients_are_closed_and_do_not_delay_others(rabbit, vhost, run_dir):
    url = rabbit.url(vhost)
    with Daemon(run_dir, url) as daemon:
        stalled = []
        try:
            for _ in range(200):
                sock = socket.socket(socket.AF_UNIX)
                stalled.append(sock)
                sock.settimeout(WAIT)
                sock.connect(daemon.socket)
                sock.sendall(b"ALLOC,slot=stalled,credits=")  # and then nothing
            reply, took = send_line(daemon.socket, "CLAIM,slot=n,machine=m,event_id=normal-1")
            assert reply == "OK"
            assert took <= REPLY_BOUND
            began = time.monotonic()
            for sock in stalled:
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
                assert data == b"ER line not completed in time\n"
            # Each was closed after LINE_TIMEOUT (wide margin: 200 sockets on a busy machine).
            assert time.monotonic() - began <= LINE_TIMEOUT + 10
        finally:
            for sock in stalled:
                sock.close()
        assert daemon.stop() == 0
    assert queued_ids(url) == Counter({"normal-1": 1})


def test_a_client_resending_with_the_same_event_id_is_one_message_id(rabbit, vhost, run_dir):
    # The credit runner counts a message_id once: a resend after "ER not confirmed"
    # with the same event_id cannot count twice.
    url = rabbit.url(vhost)
    with Daemon(run_dir, url) as daemon:
        line = "COUNTERS,slot=j,cpu=+5,event_id=job-j-cpu-0001"
        assert send_line(daemon.socket, line)[0] == "OK"
        assert send_line(daemon.socket, line)[0] == "OK"
        assert daemon.stop() == 0
    assert queued_ids(url) == Counter({"job-j-cpu-0001": 2})


def test_memory_alarm_lines_answered_in_time_and_unsent_ones_never_published(
        rabbit, vhost, run_dir):
    url = rabbit.url(vhost)
    with Daemon(run_dir, url) as daemon:
        assert send_line(daemon.socket, "DISCARD,slot=a,event_id=before-alarm")[0] == "OK"
        rabbit.set_memory_alarm(True)
        try:
            outcomes = {}
            for n in range(5):
                event_id = f"during-alarm-{n}"
                outcomes[event_id] = send_line(daemon.socket,
                                               f"DISCARD,slot=a,event_id={event_id}")
        finally:
            rabbit.set_memory_alarm(False)
        for event_id, (reply, took) in outcomes.items():
            assert reply in ("ER broker unavailable", "ER not confirmed"), (event_id, reply)
            assert took <= REPLY_BOUND, (event_id, took)
        # Once the broker said it blocks publishing, lines are refused without a wait.
        assert outcomes["during-alarm-4"][0] == "ER broker unavailable"
        assert wait_for(lambda: send_line(daemon.socket, "DISCARD,slot=a,event_id=after-alarm")[0]
                        == "OK")
        assert daemon.stop() == 0
    queued = queued_ids(url)
    assert queued["before-alarm"] == 1
    assert queued["after-alarm"] >= 1
    for event_id, (reply, _) in outcomes.items():
        if reply == "ER broker unavailable":
            assert queued[event_id] == 0, event_id  # refused, and never sent later
        else:
            assert queued[event_id] <= 1, event_id  # written while blocked: may go in once
