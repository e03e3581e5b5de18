"""Status reporting: the log, HTTP (PyBit front-end) and AMQP sinks.

The HTTP tests talk to a real server on 127.0.0.1. The AMQP tests named ``*_unit_*``
drive the sink's ordering and retry logic with a scripted ``publish`` callable standing
in for the broker module's publisher; the real broker end to end is tested with the
worker.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import queue
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from httpserver import HttpServer, Response

from rbit.config import StatusSettings
from rbit.errors import BrokerError, ConfigError
from rbit.outcome import Status
from rbit.status import StatusReporter, one_line

FIXED_TIME = 1_700_000_000.123456


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)  # polling interval of the wait, bounded by the deadline


class FakeSleep:
    """Backoff pauses, recorded; each lasts a few milliseconds so retries do not spin.

    Clear ``gate`` to hold the sink thread inside its next pause until it is set again.
    """

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()

    def __call__(self, delay: float) -> None:
        with self._lock:
            self.delays.append(delay)
        assert self.gate.wait(10), "test never opened the gate"
        time.sleep(0.002)  # a pause's length, so that retries do not spin

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.delays)


class ScriptedPublisher:
    """Stands in for the broker module's publisher (ordering/retry unit tests only).

    Confirms come from a thread of its own, as they would from the broker's I/O thread.
    ``raise_next`` publishes fail with BrokerError; events listed in ``nack_once`` are
    nacked the first time they are published.
    """

    def __init__(self) -> None:
        self.raise_next = 0
        self.nack_once: set[tuple[str, str]] = set()
        self.published: list[tuple[str, str, dict]] = []  # exchange, key, event
        self.confirmed: list[tuple[str, str]] = []  # (job_id, status) acked, in order
        self._lock = threading.Lock()
        self._confirms: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._io, daemon=True)
        self._thread.start()

    def __call__(self, exchange, routing_key, body, on_confirm) -> None:
        event = json.loads(body)
        ident = (event["job_id"], event["status"])
        with self._lock:
            if self.raise_next:
                self.raise_next -= 1
                raise BrokerError("not connected")
            self.published.append((exchange, routing_key, event))
            ok = ident not in self.nack_once
            self.nack_once.discard(ident)
        self._confirms.put((on_confirm, ok, ident))

    def _io(self) -> None:
        while True:
            item = self._confirms.get()
            if item is None:
                return
            on_confirm, ok, ident = item
            if ok:
                with self._lock:
                    self.confirmed.append(ident)
            on_confirm(ok)

    def published_ids(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(event["job_id"], event["status"]) for _, _, event in self.published]

    def confirmed_ids(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self.confirmed)

    def close(self) -> None:
        self._confirms.put(None)
        self._thread.join(5)


@pytest.fixture
def reporters() -> Iterator[list[StatusReporter]]:
    made: list[StatusReporter] = []
    yield made
    for reporter in made:
        reporter.close(0)


@pytest.fixture
def publisher() -> Iterator[ScriptedPublisher]:
    fake = ScriptedPublisher()
    yield fake
    fake.close()


def make(reporters, sinks, **kwargs) -> StatusReporter:
    publish = kwargs.pop("publish", None)
    sleep = kwargs.pop("sleep", None)
    settings = StatusSettings(sinks=sinks, **kwargs)
    reporter = StatusReporter(settings, "worker-1", publish=publish,
                              clock=lambda: FIXED_TIME, sleep=sleep)
    reporters.append(reporter)
    return reporter


def per_job(pairs):
    jobs: dict[str, list[str]] = {}
    for job, status in pairs:
        jobs.setdefault(job, []).append(status)
    return jobs


# ---------------------------------------------------------------------------------------
# log


def test_log_sink_writes_one_line_per_status(reporters, caplog):
    reporter = make(reporters, ("log",))
    caplog.set_level(logging.INFO, logger="rbit.status")
    reporter.report("42", "cnx_any_latex_pdf", Status.FAILED, "Traceback:\n  boom\nValueError")
    reporter.report("42", "cnx_any_latex_pdf", "building")
    reporter.report("42", "cnx_any_latex_pdf", Status.FAILED, KeyError("name"))
    lines = [r.getMessage() for r in caplog.records if r.name == "rbit.status"]
    assert lines == [
        "job 42 cnx_any_latex_pdf: Failed Traceback: boom ValueError",
        "job 42 cnx_any_latex_pdf: Failed 'name'",
    ]


def test_log_sink_puts_bare_progress_statuses_at_debug(reporters, caplog):
    reporter = make(reporters, ("log",))
    caplog.set_level(logging.DEBUG, logger="rbit.status")
    reporter.report("7", "q", Status.BUILDING)
    reporter.report("7", "q", Status.BUILDING, "chapter 3")
    reporter.report("7", "q", Status.DONE)
    levels = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "rbit.status"]
    assert levels == [
        (logging.DEBUG, "job 7 q: Building"),
        (logging.INFO, "job 7 q: Building chapter 3"),
        (logging.INFO, "job 7 q: Done"),
    ]


def test_a_reporter_without_sinks_reports_nothing(reporters, caplog):
    reporter = make(reporters, ())
    caplog.set_level(logging.DEBUG, logger="rbit.status")
    reporter.report("7", "q", Status.DONE)
    assert [r for r in caplog.records if r.name == "rbit.status"] == []
    assert reporter.pending() == 0


def test_long_log_messages_are_cut():
    text = one_line("x" * 2000)
    assert len(text) == 500
    assert text.endswith("\u2026")


def test_unknown_status_name_is_a_value_error(reporters):
    reporter = make(reporters, ("log",))
    with pytest.raises(ValueError, match="unknown status"):
        reporter.report("1", "q", "Exploded")


# ---------------------------------------------------------------------------------------
# http


def http_settings(server: HttpServer, **kwargs) -> dict:
    return {"http_url": server.url, "retry_max_delay": 1.0, **kwargs}


def test_http_sink_puts_status_form_with_basic_auth(reporters, http_server):
    reporter = make(reporters, ("http",), http_url=http_server.url + "/pybit/",
                    http_user="front", http_password="s3cr:et")  # noqa: S106
    reporter.report("a/b c", "q", Status.BUILDING, "not sent")
    (request,) = http_server.wait_for(1)
    assert request.method == "PUT"
    assert request.path == "/pybit/job/a%2Fb%20c"
    assert request.header("Content-Type") == "application/x-www-form-urlencoded"
    form = urllib.parse.parse_qs(request.body.decode())
    assert form == {"status": ["Building"], "client": ["worker-1"]}
    expected = base64.b64encode(b"front:s3cr:et").decode()
    assert request.header("Authorization") == "Basic " + expected


def test_http_sink_sends_no_credentials_when_none_are_set(reporters, http_server):
    reporter = make(reporters, ("http",), http_url=http_server.url)
    reporter.report("7", "q", Status.DONE)
    (request,) = http_server.wait_for(1)
    assert request.path == "/job/7"
    assert request.header("Authorization") is None


def test_http_sink_delivers_every_event_in_order_after_server_was_down(reporters, http_server):
    http_server.stop()  # the port now refuses connections
    sleep = FakeSleep()
    reporter = make(reporters, ("http",), sleep=sleep, **http_settings(http_server))
    sent, slowest = [], 0.0
    for status in (Status.WAITING, Status.BUILDING, Status.DONE, Status.UPLOADED):
        for job in ("j1", "j2", "j3"):
            started = time.perf_counter()
            reporter.report(job, "q", status)
            slowest = max(slowest, time.perf_counter() - started)
            sent.append((job, status.value))
    wait_until(lambda: sleep.count >= 3, what="three failed attempts")
    assert http_server.requests == []
    assert reporter.pending() == len(sent)
    assert slowest < 0.05

    http_server.start()  # same port
    requests = http_server.wait_for(len(sent))
    got = [(r.path.rsplit("/", 1)[1], urllib.parse.parse_qs(r.body.decode())["status"][0])
           for r in requests]
    assert got == sent
    wait_until(lambda: reporter.pending() == 0, what="nothing pending")
    assert max(sleep.delays) <= 1.0


def test_http_sink_retries_a_server_error_then_delivers(reporters, http_server):
    answers = iter([Response(500), Response(503)])
    http_server.set_handler(lambda request: next(answers, None))
    sleep = FakeSleep()
    reporter = make(reporters, ("http",), sleep=sleep, **http_settings(http_server))
    reporter.report("9", "q", Status.DONE)
    reporter.report("9", "q", Status.UPLOADED)
    requests = http_server.wait_for(4)
    statuses = [urllib.parse.parse_qs(r.body.decode())["status"][0] for r in requests]
    assert statuses == ["Done", "Done", "Done", "Uploaded"]
    wait_until(lambda: reporter.pending() == 0, what="nothing pending")
    assert sleep.count == 2


def test_http_sink_drops_an_event_refused_with_404_and_logs_it(reporters, http_server, caplog):
    http_server.set_response("/job/gone", 404)
    reporter = make(reporters, ("http",), **http_settings(http_server))
    reporter.report("gone", "q", Status.DONE)
    reporter.report("here", "q", Status.DONE)
    requests = http_server.wait_for(2)
    wait_until(lambda: reporter.pending() == 0, what="nothing pending")
    assert [r.path for r in requests] == ["/job/gone", "/job/here"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["job gone: the status server refused status Done with HTTP 404; dropped"]


class KeepAliveServer:
    """An HTTP/1.1 server on 127.0.0.1 that keeps connections open and counts them.

    ``drop_connections()`` closes them from the server side, as a server does with idle
    kept-alive connections.
    """

    def __init__(self) -> None:
        self.connections: list[socket.socket] = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with outer._lock:
                    outer.connections.append(self.connection)

            def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers["Content-Length"]))
                with outer._lock:
                    outer.paths.append(self.path)
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def drop_connections(self) -> None:
        with self._lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):  # already closed by its handler
                    conn.shutdown(socket.SHUT_RDWR)

    def received(self) -> int:
        with self._lock:
            return len(self.paths)

    def stop(self) -> None:
        self.drop_connections()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def keepalive_server() -> Iterator[KeepAliveServer]:
    server = KeepAliveServer()
    yield server
    server.stop()


def test_http_sink_keeps_one_connection_and_replaces_a_dropped_one_at_once(
    reporters, keepalive_server
):
    sleep = FakeSleep()
    reporter = make(reporters, ("http",), sleep=sleep, http_url=keepalive_server.url)
    for status in (Status.WAITING, Status.BUILDING, Status.DONE):
        reporter.report("1", "q", status)
    wait_until(lambda: keepalive_server.received() == 3, what="three PUTs")
    assert len(keepalive_server.connections) == 1

    keepalive_server.drop_connections()
    reporter.report("1", "q", Status.UPLOADED)
    wait_until(lambda: keepalive_server.received() == 4, what="the fourth PUT")
    wait_until(lambda: reporter.pending() == 0, what="nothing pending")
    assert len(keepalive_server.connections) == 2
    assert sleep.delays == []  # a stale kept-alive socket is not an outage


def test_http_sink_needs_a_url():
    with pytest.raises(ConfigError, match="http_url"):
        StatusReporter(StatusSettings(sinks=("http",)), "w")


def test_http_password_is_never_logged(reporters, http_server, caplog):
    http_server.stop()
    caplog.set_level(logging.DEBUG, logger="rbit.status")
    sleep = FakeSleep()
    reporter = make(reporters, ("http",), sleep=sleep, http_password="hunter2",  # noqa: S106
                    http_user="u", **http_settings(http_server))
    reporter.report("1", "q", Status.DONE)
    wait_until(lambda: sleep.count >= 2, what="two failed attempts")
    reporter.close(0)
    assert caplog.records
    assert all("hunter2" not in r.getMessage() for r in caplog.records)
    assert "hunter2" not in repr(reporter.__dict__)


# ---------------------------------------------------------------------------------------
# amqp (ordering and retry logic against a scripted publisher)


def test_amqp_sink_unit_publishes_json_event_under_routing_key(reporters, publisher):
    reporter = make(reporters, ("amqp",), publish=publisher)
    reporter.report("42", "cnx_any_latex_pdf", Status.DONE, "all good")
    wait_until(lambda: publisher.confirmed_ids() == [("42", "Done")], what="confirm")
    ((exchange, key, event),) = publisher.published
    assert (exchange, key) == ("rbit.status", "cnx_any_latex_pdf.Done")
    stamp = event.pop("time")
    assert event == {"job_id": "42", "status": "Done", "message": "all good",
                     "worker": "worker-1", "queue": "cnx_any_latex_pdf"}
    assert stamp == "2023-11-14T22:13:20.123456+00:00"
    assert datetime.fromisoformat(stamp).timestamp() == pytest.approx(FIXED_TIME)


def test_amqp_sink_unit_formats_custom_routing_key(reporters, publisher):
    reporter = make(reporters, ("amqp",), publish=publisher, exchange="jobs",
                    routing_key="{worker}.{job_id}.{status}")
    reporter.report("a.b", "q", Status.BUILDING)
    wait_until(lambda: publisher.confirmed_ids(), what="confirm")
    assert publisher.published[0][:2] == ("jobs", "worker-1.a.b.Building")


def test_amqp_sink_unit_resends_from_a_nacked_middle_event_in_order(reporters, publisher):
    sleep = FakeSleep()
    sleep.gate.clear()
    publisher.raise_next = 1  # holds the sink in a pause while all events are queued
    publisher.nack_once = {("j", "Building")}
    reporter = make(reporters, ("amqp",), publish=publisher, sleep=sleep)
    statuses = ["Waiting", "Building", "Done", "Uploaded"]
    for status in statuses:
        reporter.report("j", "q", Status.parse(status))
    wait_until(lambda: sleep.count == 1, what="the first pause")
    sleep.gate.set()
    wait_until(lambda: reporter.pending() == 0, what="all confirmed")
    published = [status for _, status in publisher.published_ids()]
    # One window with the nack, then a re-send from the nacked event onwards.
    assert published == statuses + ["Building", "Done", "Uploaded"]
    assert [s for _, s in publisher.confirmed_ids()][-3:] == ["Building", "Done", "Uploaded"]


def test_amqp_sink_unit_retries_after_publish_raises(reporters, publisher):
    sleep = FakeSleep()
    publisher.raise_next = 6
    reporter = make(reporters, ("amqp",), publish=publisher, sleep=sleep,
                    retry_max_delay=2.0)
    sent = [(job, status) for status in ("Waiting", "Done") for job in ("a", "b")]
    for job, status in sent:
        reporter.report(job, "q", Status.parse(status))
    wait_until(lambda: reporter.pending() == 0, what="all confirmed")
    assert publisher.confirmed_ids() == sent
    assert publisher.published_ids() == sent
    # Doubling from 0.5 s up to the 2 s cap, each pause jittered into [step/2, step].
    steps = [0.5, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert len(sleep.delays) == len(steps)
    assert all(step / 2 <= d <= step for d, step in zip(sleep.delays, steps, strict=True))


def test_amqp_sink_unit_close_flushes_every_event(reporters, publisher):
    reporter = make(reporters, ("amqp",), publish=publisher)
    sent = [(f"job{n % 7}", status) for n in range(700) for status in ("Building",)]
    for job, status in sent:
        reporter.report(job, "q", Status.parse(status))
    reporter.close(10)
    assert reporter.pending() == 0
    assert publisher.confirmed_ids() == sent


def test_close_gives_up_on_a_sink_that_stays_down_and_logs_the_count(reporters, caplog):
    def down(*args):
        raise BrokerError("not connected")

    reporter = make(reporters, ("amqp",), publish=down, retry_max_delay=60.0)
    for n in range(3):
        reporter.report(str(n), "q", Status.DONE)
    started = time.monotonic()
    reporter.close(0.3)
    assert time.monotonic() - started < 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "amqp status sink: 3 event(s) dropped: 3 undelivered at shutdown, " \
        "0 over max_pending, 0 refused" in warnings


def test_report_returns_at_once_while_publish_hangs(reporters):
    release = threading.Event()
    reporter = make(reporters, ("amqp",), publish=lambda *args: release.wait(10))
    started = time.perf_counter()
    for n in range(1000):
        reporter.report(str(n), "q", Status.BUILDING)
    elapsed = time.perf_counter() - started
    release.set()
    assert elapsed < 5  # 1000 reports; one blocked on the publish would take 10 s
    assert reporter.pending() == 1000


def test_oldest_events_are_dropped_beyond_max_pending(reporters, caplog):
    sleep = FakeSleep()
    sleep.gate.clear()
    published = []

    def publish(exchange, key, body, on_confirm):
        if not sleep.gate.is_set():
            raise BrokerError("not connected")
        published.append(json.loads(body)["job_id"])
        on_confirm(True)

    reporter = make(reporters, ("amqp",), publish=publish, sleep=sleep, max_pending=5)
    reporter.report("0", "q", Status.DONE)
    wait_until(lambda: sleep.count == 1, what="the first pause")
    for n in range(1, 20):
        reporter.report(str(n), "q", Status.DONE)
    assert reporter.pending() == 6  # one in flight, five waiting
    sleep.gate.set()
    wait_until(lambda: reporter.pending() == 0, what="the rest delivered")
    assert published == ["0", "15", "16", "17", "18", "19"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("14 event(s) dropped" in w for w in warnings)


def test_amqp_sink_needs_a_publisher():
    with pytest.raises(ValueError, match="publish"):
        StatusReporter(StatusSettings(sinks=("amqp",)), "w")


def test_every_sink_receives_every_event(reporters, publisher, http_server, caplog):
    caplog.set_level(logging.INFO, logger="rbit.status")
    reporter = make(reporters, ("log", "amqp", "http"), publish=publisher,
                    http_url=http_server.url)
    reporter.report("5", "q", Status.DONE)
    http_server.wait_for(1)
    wait_until(lambda: reporter.pending() == 0, what="both sinks delivered")
    assert publisher.confirmed_ids() == [("5", "Done")]
    assert "job 5 q: Done" in [r.getMessage() for r in caplog.records]
