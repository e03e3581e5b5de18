"""The test infrastructure itself: the private RabbitMQ node and the HTTP server."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pika
import pika.exceptions
import pytest
from httpserver import HttpServer, Response
from rabbit import CONSUMER_TIMEOUT_MS, RabbitNode

from rbit.config import AmqpSettings


@contextlib.contextmanager
def channel(url: str) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        yield connection.channel()
    finally:
        connection.close()


def private_node(rabbit) -> RabbitNode:
    if not isinstance(rabbit, RabbitNode):
        pytest.skip("needs a private node; RBIT_TEST_AMQP_URL gives AMQP only")
    return rabbit


def test_private_node_round_trips_a_message(rabbit, vhost):
    with channel(rabbit.url(vhost)) as ch:
        ch.queue_declare("infra", durable=True)
        ch.basic_publish("", "infra", b"hello", pika.BasicProperties(message_id="m-1"))
        method, props, body = ch.basic_get("infra", auto_ack=True)
    assert body == b"hello"
    assert props.message_id == "m-1"


def test_private_node_has_short_consumer_timeout(rabbit):
    node = private_node(rabbit)
    out = node.ctl("eval", "application:get_env(rabbit, consumer_timeout).")
    assert out.strip() == "{ok,%d}" % CONSUMER_TIMEOUT_MS


def test_list_queues_counts_ready_and_unacked_messages(rabbit, vhost):
    node = private_node(rabbit)
    with channel(rabbit.url(vhost)) as ch:
        ch.queue_declare("counted")
        for n in range(3):
            ch.basic_publish("", "counted", b"%d" % n)
        method, _, _ = ch.basic_get("counted")  # unacked while the channel is open
        assert method is not None
        assert node.list_queues(vhost) == {"counted": (2, 1)}


def test_each_test_gets_an_empty_vhost_of_its_own(rabbit, vhost):
    node = private_node(rabbit)
    assert node.list_queues(vhost) == {}
    other = node.new_vhost()
    try:
        assert other != vhost
        with channel(rabbit.url(other)) as ch:
            ch.queue_declare("only-in-other")
        assert node.list_queues(vhost) == {}
    finally:
        node.delete_vhost(other)


def test_amqp_settings_point_at_the_node(rabbit, vhost):
    settings = rabbit.amqp_settings(vhost, heartbeat=5)
    assert isinstance(settings, AmqpSettings)
    assert settings.virtual_host == vhost
    assert (settings.hosts[0].host, settings.hosts[0].port) == ("127.0.0.1", rabbit.port)
    assert settings.heartbeat == 5


@pytest.mark.fault
def test_stop_app_makes_the_broker_unreachable_until_start_app(rabbit, vhost):
    node = private_node(rabbit)
    node.stop_app()
    try:
        with pytest.raises(pika.exceptions.AMQPConnectionError), channel(rabbit.url(vhost)):
            pass
    finally:
        node.start_app()
    with channel(rabbit.url(vhost)) as ch:
        ch.queue_declare("after-outage")


@pytest.mark.fault
def test_memory_alarm_is_raised_and_cleared(rabbit):
    node = private_node(rabbit)
    node.set_memory_alarm(True)
    try:
        assert "memory" in node.ctl("eval", "rabbit_alarm:get_alarms().")
    finally:
        node.set_memory_alarm(False)
    assert node.ctl("eval", "rabbit_alarm:get_alarms().").strip() == "[]"


def _post(url: str, body: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def test_http_server_records_requests_and_answers_per_path(http_server):
    http_server.set_response("/batch/bulk", 200, {"result": "ok"})
    status, body = _post(http_server.url_for("/batch/bulk?x=1"), b'{"alloc": []}')
    assert (status, json.loads(body)) == (200, {"result": "ok"})
    (request,) = http_server.wait_for(1, timeout=5)
    assert (request.method, request.path) == ("POST", "/batch/bulk?x=1")
    assert request.header("content-type") == "application/json"
    assert request.json() == {"alloc": []}


def test_http_server_handler_decides_the_answer(http_server):
    http_server.set_handler(lambda req: Response(503, "busy") if req.body == b"no" else None)
    assert _post(http_server.url_for("/a"), b"no") == (503, b"busy")
    assert _post(http_server.url_for("/a"), b"yes")[0] == 200
    assert [r.body for r in http_server.wait_for(2)] == [b"no", b"yes"]


def test_http_server_wait_for_times_out_with_a_clear_error(http_server):
    with pytest.raises(AssertionError, match="expected 1 HTTP request"):
        http_server.wait_for(1, timeout=0.2)


@pytest.mark.fault
def test_http_server_restarts_on_the_same_port():
    with HttpServer() as server:
        port = server.port
        server.stop()
        with pytest.raises(urllib.error.URLError):
            _post(server.url_for("/down"), b"")
        server.start()
        assert server.port == port
        assert _post(server.url_for("/up"), b"")[0] == 200
        assert [r.path for r in server.wait_for(1)] == ["/up"]
