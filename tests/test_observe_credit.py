"""``rbit-credit``'s /healthz and /metrics: a real daemon, a real broker, real lines."""

from __future__ import annotations

import http.client
import re

from prometheus_client.parser import text_string_to_metric_families
from test_credit_frontdoor_faults import Daemon, run_dir, send_line, wait_for  # noqa: F401

from rbit.credit.settings import load_credit_config

TOKEN = "credit-token"


def _get(port: int, path: str, token: str | None = TOKEN) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers={"Authorization": f"Bearer {token}"}
                           if token else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _samples(body: bytes) -> dict[tuple[str, tuple], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples}


def test_the_front_door_counts_lines_by_command_and_result(rabbit, vhost, run_dir):  # noqa: F811
    daemon = Daemon(run_dir, rabbit.url(vhost))
    daemon.config.write_text(daemon.config.read_text()
                             + f"[http]\nbind = 127.0.0.1:0\ntoken = {TOKEN}\n")
    with daemon:
        port = int(wait_for(lambda: daemon.log.exists() and re.search(
            r"HTTP endpoint on 127\.0\.0\.1:(\d+)", daemon.log.read_text()))[1])
        assert _get(port, "/healthz", token=None)[0] == 401
        status, body = _get(port, "/healthz")
        assert status == 200
        assert body.startswith(b"serving")
        for n in range(3):
            assert send_line(daemon.socket, f"ALLOC,slot=job{n},credits=10")[0] == "OK"
        assert send_line(daemon.socket, "CLAIM,slot=job0,machine=m1")[0] == "OK"
        assert send_line(daemon.socket, "NONSENSE,x=1")[0].startswith("ER")
        found = _samples(_get(port, "/metrics")[1])
        assert daemon.stop() == 0
    assert found[("rbit_credit_lines_total", (("command", "alloc"), ("result", "ok")))] == 3
    assert found[("rbit_credit_lines_total", (("command", "claim"), ("result", "ok")))] == 1
    assert found[("rbit_credit_lines_total",
                  (("command", "invalid"), ("result", "malformed")))] == 1
    assert found[("rbit_credit_reply_latency_seconds_count", ())] == 4
    assert found[("rbit_credit_confirms_outstanding", ())] == 0
    assert found[("rbit_credit_broker_connected", ())] == 1


def test_the_credit_config_takes_an_http_section(tmp_path):
    path = tmp_path / "credit.conf"
    path.write_text("[amqp]\nhost = localhost\n[http]\nbind = 127.0.0.1:9101\ntoken = t\n")
    settings = load_credit_config(str(path))
    assert (settings.http.host, settings.http.port, settings.http.token) == (
        "127.0.0.1", 9101, "t")
    assert settings.warnings == ()
    path.write_text("[amqp]\nhost = localhost\n")
    assert load_credit_config(str(path)).http is None
