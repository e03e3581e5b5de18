"""The credit runner inside a real worker, with a real RabbitMQ and a real HTTP server.

The worker is SIGKILLed while its POST is in flight, or after the server applied a batch
but before the worker's acks reached the broker; after a restart every credit event
reaches the credit server exactly once and the queue drains.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika
import pytest
from creditpiggy_server import FakeCreditPiggy
from tcp_proxy import BASIC_ACK, Proxy

from rbit.credit.events import CreditEvent

pytestmark = [pytest.mark.slow, pytest.mark.fault]

KEY, SECRET = "e2ekey", "e2esecret"
QUEUE = "credits"
WAIT = 60.0


def wait_until(predicate: Callable[[], Any], timeout: float = WAIT, every: float = 0.2) -> Any:
    """Poll ``predicate`` (it queries another process) until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)  # the polling interval of a bounded wait
    raise AssertionError(f"condition not met within {timeout} s: {predicate}")


def write_config(path: Path, amqp_url: str, server: FakeCreditPiggy, state: Path) -> Path:
    path.write_text(
        "[rbit]\nname = credit-e2e\npolling_time = 1\n"
        f"[amqp]\nurl = {amqp_url}\n"
        f"[runner:{QUEUE}]\n"
        "runner = python!rbitext.creditpiggy:CreditRunner\n"
        "prefetch = 50\n"
        f"api_url = {server.url}\napi_key = {KEY}\napi_secret = {SECRET}\n"
        "batch_size = 50\nflush_interval = 0.5\nmax_requests_per_second = 20\n"
        f"seen_ids_file = {state}\nretry_max_delay = 0.5\nhttp_timeout = 5\n"
    )
    return path


class Worker:
    """``python -m rbit CONFIG`` as a child process."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rbit", str(self.config), "--debug"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


@pytest.fixture
def server() -> Iterator[FakeCreditPiggy]:
    with FakeCreditPiggy({KEY: SECRET}) as srv:
        yield srv


def publish(amqp_url: str, events: list[CreditEvent]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for ev in events:
            props = pika.BasicProperties(
                delivery_mode=2, message_id=ev.id, content_type="application/json"
            )
            channel.basic_publish("", QUEUE, ev.to_json(), props, mandatory=True)
    finally:
        connection.close()


def test_worker_killed_mid_post_delivers_every_credit_exactly_once(rabbit, vhost, server, tmp_path):
    amqp_url = rabbit.url(vhost)
    config = write_config(tmp_path / "rbit.ini", amqp_url, server, tmp_path / "seen.sqlite3")
    worker = Worker(config, tmp_path / "worker.log")
    server.ledger.alloc({"slot": "job"})
    events = [CreditEvent("counters", {"slot": "job", f"c{i}": 1}) for i in range(20)]
    release = server.hold_next()
    try:
        worker.start()
        wait_until(lambda: QUEUE in rabbit.list_queues(vhost))
        publish(amqp_url, events)

        assert server.held.wait(WAIT), (tmp_path / "worker.log").read_text()
        worker.kill()  # the POST is in flight, nothing is acked
        release.set()
        # Nothing was acked while the POST was in flight: the broker gives all back.
        wait_until(lambda: sum(rabbit.list_queues(vhost).get(QUEUE, (0, 0))) == len(events))

        worker.start()
        wait_until(lambda: sum(server.ledger.slots["job"].counters.values()) >= 20)
        wait_until(lambda: rabbit.list_queues(vhost).get(QUEUE) == (0, 0))
        assert server.ledger.slots["job"].counters == {f"c{i}": 1 for i in range(20)}
        assert all(server.times_applied("counters", dict(ev.args)) == 1 for ev in events)

        # The same events published again (same ids) are recognised and not sent.
        requests_before = len(server.requests)
        publish(amqp_url, events[:3])
        wait_until(lambda: rabbit.list_queues(vhost).get(QUEUE) == (0, 0))
        assert len(server.requests) == requests_before
        assert worker.stop() == 0
    finally:
        release.set()
        worker.stop()


def test_credit_server_down_for_ten_seconds_then_every_event_arrives_once(
        rabbit, vhost, server, tmp_path):
    amqp_url = rabbit.url(vhost)
    config = write_config(tmp_path / "rbit.ini", amqp_url, server, tmp_path / "seen.sqlite3")
    worker = Worker(config, tmp_path / "worker.log")
    server.ledger.alloc({"slot": "job"})
    events = [CreditEvent("counters", {"slot": "job", f"c{i}": 1}) for i in range(30)]
    try:
        worker.start()
        wait_until(lambda: QUEUE in rabbit.list_queues(vhost))
        server.stop()
        publish(amqp_url, events)
        time.sleep(10)  # the outage itself: its length is the point of the test
        ready, unacked = rabbit.list_queues(vhost)[QUEUE]
        assert ready + unacked == len(events)  # kept by the broker, none acked
        assert server.ledger.slots["job"].counters == {}
        server.start()  # same port

        wait_until(lambda: rabbit.list_queues(vhost).get(QUEUE) == (0, 0))
        assert server.ledger.slots["job"].counters == {f"c{i}": 1 for i in range(30)}
        assert all(server.times_applied("counters", dict(ev.args)) == 1 for ev in events)
        assert worker.stop() == 0
    finally:
        worker.stop()


def test_worker_killed_after_the_server_applied_a_batch_sends_none_of_it_again(
        rabbit, vhost, server, tmp_path):
    # The window the durable seen-ids store exists for: the server applied the batch and
    # the worker remembered that, but its acks never reached the broker. The worker that
    # gets the redeliveries is a new process, so only ids kept on disk can stop them.
    proxy = Proxy((rabbit.host, rabbit.port))
    amqp_url = "amqp://guest:guest@127.0.0.1:%d/%s" % (proxy.port, quote(vhost, safe=""))
    config = write_config(tmp_path / "rbit.ini", amqp_url, server, tmp_path / "seen.sqlite3")
    worker = Worker(config, tmp_path / "worker.log")
    server.ledger.alloc({"slot": "job"})
    events = [CreditEvent("counters", {"slot": "job", f"c{i}": 1}) for i in range(20)]
    release = server.hold_next(apply=True)
    try:
        worker.start()
        wait_until(lambda: QUEUE in rabbit.list_queues(vhost))
        publish(rabbit.url(vhost), events)

        assert server.held.wait(WAIT), (tmp_path / "worker.log").read_text()
        applied = sum(server.ledger.slots["job"].counters.values())
        assert applied > 0  # the server committed (part of) the events
        proxy.hold()  # from now on nothing the worker sends reaches the broker
        release.set()  # the 200 reply goes out
        assert proxy.wait_held(BASIC_ACK, WAIT), "the worker never acked the batch"
        worker.kill()  # its acks die with it
        proxy.sever()
        wait_until(lambda: sum(rabbit.list_queues(vhost).get(QUEUE, (0, 0))) == len(events))

        worker = Worker(config, tmp_path / "worker-2.log")
        worker.start()
        wait_until(lambda: rabbit.list_queues(vhost).get(QUEUE) == (0, 0))
        assert server.ledger.slots["job"].counters == {f"c{i}": 1 for i in range(20)}
        assert [server.times_applied("counters", dict(ev.args)) for ev in events] == [1] * 20
        assert worker.stop() == 0
    finally:
        release.set()
        worker.stop()
        proxy.close()


def test_a_section_without_prefetch_sends_whole_batches(rabbit, vhost, server, tmp_path):
    # The documented keys only: no prefetch, no batch_size (the runner's default, 100).
    # With the broker handing out one event at a time, every request would carry one
    # event and leave only once flush_interval (a minute here) had passed.
    amqp_url = rabbit.url(vhost)
    config = tmp_path / "rbit.ini"
    config.write_text(
        "[rbit]\nname = credit-batches\n"
        f"[amqp]\nurl = {amqp_url}\n"
        f"[runner:{QUEUE}]\nrunner = python!rbitext.creditpiggy:CreditRunner\n"
        f"api_url = {server.url}\napi_key = {KEY}\napi_secret = {SECRET}\n"
        f"flush_interval = 60\nseen_ids_file = {tmp_path / 'seen.sqlite3'}\n"
    )
    worker = Worker(config, tmp_path / "worker.log")
    server.ledger.alloc({"slot": "job"})
    events = [CreditEvent("counters", {"slot": "job", f"c{i}": 1}) for i in range(200)]
    try:
        worker.start()
        wait_until(lambda: QUEUE in rabbit.list_queues(vhost))
        publish(amqp_url, events)

        wait_until(lambda: rabbit.list_queues(vhost).get(QUEUE) == (0, 0))
        sizes = [len(json.loads(request.body)["counters"]) for request in server.requests]
        assert sizes == [100, 100]
        assert server.ledger.slots["job"].counters == {f"c{i}": 1 for i in range(200)}
        assert worker.stop() == 0
    finally:
        worker.stop()
