"""The HTTP endpoint: health, stats, Prometheus metrics, run-time log levels, tokens."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from worker_helpers import wait_until, write_config

from rbit.config import HttpSettings, load_config
from rbit.observe.http import Endpoints, ObserveServer
from rbit.observe.worker import WorkerObservation

QUEUE = "observed"
TOKEN = "s3cret-token"


def _config(tmp_path: Path, rabbit, vhost: str, out: Path, runner: str, *,
            token: str | None = None, **keys) -> Path:
    path = write_config(tmp_path, rabbit.url(vhost),
                        {QUEUE: {"runner": f"python!worker_runners:{runner}",
                                 "outdir": out, **keys}})
    http = "\n[http]\nbind = 127.0.0.1:0\n" + (f"token = {token}\n" if token else "")
    path.write_text(path.read_text() + http)
    return path


@contextlib.contextmanager
def observed_worker(config: Path) -> Iterator[tuple[WorkerObservation, tuple[str, int]]]:
    """An in-process worker with its observation started, as ``rbit`` runs them."""
    from rbit.worker import Worker

    worker = Worker(load_config(str(config)))
    observation = WorkerObservation(worker)
    worker.start(timeout=20)
    observation.start()
    try:
        yield observation, observation.server.address
    finally:
        observation.stopping()
        worker.shutdown(threading.Event(), grace=15)
        observation.close()


def request(address: tuple[str, int], method: str, path: str, body: bytes | None = None,
            token: str | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(*address, timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def samples(text: bytes) -> dict[tuple[str, tuple], float]:
    """Every sample of a scrape, parsed by prometheus_client's own parser."""
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_count_the_jobs_run_and_health_reports_consuming(
        tmp_path, rabbit, vhost, amqp, out):
    config = _config(tmp_path, rabbit, vhost, out, "succeed", concurrency=2)
    with observed_worker(config) as (_observation, address):
        amqp.publish_jobs([f"job-{n}" for n in range(25)], exchange="", routing_key=QUEUE)
        wait_until(lambda: rabbit.list_queues(vhost)[QUEUE] == (0, 0), 20, "25 jobs done")

        def settled() -> dict:
            found = samples(request(address, "GET", "/metrics")[1])
            done = found.get(("rbit_jobs_total", (("outcome", "done"), ("queue", QUEUE))))
            return found if done == 25 else None

        found = wait_until(settled, 10, "the metrics to count 25 jobs")
        assert found[("rbit_job_duration_seconds_count", (("queue", QUEUE),))] == 25
        assert found[("rbit_jobs_in_progress", (("queue", QUEUE),))] == 0
        assert found[("rbit_jobs_total", (("outcome", "retried"), ("queue", QUEUE)))] == 0
        assert found[("rbit_broker_connected", ())] == 1
        assert ("rbit_broker_reconnects_total", ()) in found
        assert ("rbit_lease_renewals_total", ()) in found
        assert ("rbit_status_backlog", ()) in found
        assert any(name == "rbit_build_info" for name, _ in found)

        status, body = request(address, "GET", "/healthz")
        assert (status, body) == (200, f"consuming {QUEUE}\n".encode())
        status, body = request(address, "GET", "/stats")
        stats = json.loads(body)
        assert status == 200
        # The same snapshot `rbit ctl status` gathers (rbit.control).
        assert stats["name"] == "test-worker"
        assert stats["queues"] == [{"queue": QUEUE, "consuming": True, "paused": False}]
        assert stats["counts"]["done"] == 25
        assert "running" not in stats
        verbose = json.loads(request(address, "GET", "/stats?verbose=1")[1])
        assert verbose["running"] == []
        # History is written in batches, a fraction of a second after the jobs.
        wait_until(lambda: len(json.loads(request(
            address, "GET", f"/history?queue={QUEUE}&depth=5")[1])) == 5, 10, "history")
        assert request(address, "GET", "/nowhere")[0] == 404


def test_retries_and_dead_letters_are_counted_by_reason(tmp_path, rabbit, vhost, amqp, out):
    config = _config(tmp_path, rabbit, vhost, out, "explode", max_retries=1, retry_delay=0)
    with observed_worker(config) as (_observation, address):
        amqp.publish_jobs(["a", "b"], exchange="", routing_key=QUEUE)
        wait_until(lambda: rabbit.list_queues(vhost)[f"{QUEUE}.dead"][0] == 2, 20,
                   "two dead letters")

        def counted() -> dict:
            found = samples(request(address, "GET", "/metrics")[1])
            key = ("rbit_dead_letters_total", (("queue", QUEUE), ("reason", "retries_exhausted")))
            return found if found.get(key) == 2 else None

        found = wait_until(counted, 10, "the dead letters in the metrics")
    assert found[("rbit_jobs_total", (("outcome", "retried"), ("queue", QUEUE)))] == 2
    assert found[("rbit_job_retries_total", (("kind", "failed"), ("queue", QUEUE)))] == 2
    assert found[("rbit_jobs_total", (("outcome", "dead_lettered"), ("queue", QUEUE)))] == 2
    assert found[("rbit_jobs_total", (("outcome", "done"), ("queue", QUEUE)))] == 0


def test_the_series_count_does_not_grow_with_distinct_job_ids(
        tmp_path, rabbit, vhost, amqp, out):
    config = _config(tmp_path, rabbit, vhost, out, "succeed", concurrency=4, prefetch=50)
    with observed_worker(config) as (_observation, address):
        amqp.publish_jobs(["first"], exchange="", routing_key=QUEUE)
        wait_until(lambda: rabbit.list_queues(vhost)[QUEUE] == (0, 0), 20, "one job done")
        before = samples(request(address, "GET", "/metrics")[1])
        amqp.publish_jobs([f"distinct-{n}" for n in range(1000)], exchange="", routing_key=QUEUE)
        done_key = ("rbit_jobs_total", (("outcome", "done"), ("queue", QUEUE)))
        after = wait_until(
            lambda: (lambda found: found if found.get(done_key) == 1001 else None)(
                samples(request(address, "GET", "/metrics")[1])), 60, "1,001 jobs counted")
    assert set(after) == set(before)
    assert not any("distinct" in str(labels) for _name, labels in after)


def test_logconfig_needs_the_token_and_then_changes_the_level(
        tmp_path, rabbit, vhost, out):
    config = _config(tmp_path, rabbit, vhost, out, "succeed", token=TOKEN)
    target = logging.getLogger("rbit.test.observed")
    target.setLevel(logging.WARNING)
    document = json.dumps({"version": 1, "incremental": True,
                           "loggers": {"rbit.test.observed": {"level": "DEBUG"}}}).encode()
    with observed_worker(config) as (_observation, address):
        assert request(address, "POST", "/logconfig", document)[0] == 401
        assert request(address, "POST", "/logconfig", document, token="wrong")[0] == 401
        assert target.level == logging.WARNING  # a refused request changes nothing

        assert request(address, "POST", "/logconfig", document, token=TOKEN)[0] == 204
        assert target.level == logging.DEBUG

        status, body = request(address, "POST", "/logconfig", b'{"loggers": {}}', token=TOKEN)
        assert status == 400
        assert b"version" in body
        assert request(address, "POST", "/logconfig", b"not json", token=TOKEN)[0] == 400
        big = b'{"version": 1, "x": "' + b"a" * 70_000 + b'"}'
        assert request(address, "POST", "/logconfig", big, token=TOKEN)[0] == 413

        for path in ("/healthz", "/metrics", "/stats"):  # a set token guards every path
            assert request(address, "GET", path)[0] == 401
            assert request(address, "GET", path, token=TOKEN)[0] == 200


def _endpoint(token: str | None = None, healthy=(True, "fine")) -> ObserveServer:
    server = ObserveServer(HttpSettings(port=0, token=token), Endpoints(
        healthy=lambda: healthy, metrics=lambda: (b"", "text/plain")))
    server.start()
    return server


def test_a_post_without_a_configured_token_is_refused():
    server = _endpoint()
    try:
        status, body = request(server.address, "POST", "/logconfig", b'{"version": 1}')
        assert status == 403
        assert b"set [http] token" in body
        assert request(server.address, "GET", "/healthz")[0] == 200  # GETs need none
    finally:
        server.close()


def test_healthz_is_503_with_the_reason_when_unhealthy():
    server = _endpoint(healthy=(False, "not connected to the broker"))
    try:
        assert request(server.address, "GET", "/healthz") == (
            503, b"not connected to the broker\n")
    finally:
        server.close()


def test_the_endpoint_listens_on_loopback_unless_told_otherwise(tmp_path):
    path = tmp_path / "w.ini"
    path.write_text("[rbit]\nname = w\n[amqp]\nhost = localhost\n[http]\nbind = 127.0.0.1:9100\n")
    assert load_config(str(path)).http == HttpSettings("127.0.0.1", 9100, None)
    path.write_text("[rbit]\nname = w\n[amqp]\nhost = localhost\n")
    assert load_config(str(path)).http is None  # off by default
    assert HttpSettings().host == "127.0.0.1"


def test_without_http_the_pools_count_nothing_for_metrics(tmp_path, rabbit, vhost, out):
    """Metrics no one can scrape cost the job path nothing: only [http] attaches them."""
    from rbit.worker import Worker

    with_http = _config(tmp_path, rabbit, vhost, out, "succeed")
    without = tmp_path / "plain.ini"
    without.write_text(with_http.read_text().split("\n[http]")[0] + "\n")
    for path, counted in ((without, False), (with_http, True)):
        worker = Worker(load_config(str(path)))
        observation = WorkerObservation(worker)
        worker.start(timeout=20)
        try:
            assert [pool.metrics is not None for pool in worker.pools] == [counted]
            assert (observation.server is not None) is counted
            assert "0 jobs running" in observation.status_line()
        finally:
            worker.shutdown(threading.Event(), grace=15)
            observation.close()
