"""Shared fixtures: a private RabbitMQ node, a fresh vhost per test, an HTTP server.

``tests/`` is not a package: pytest puts it on ``sys.path``, so test modules import the
helpers as ``from rabbit import CONSUMER_TIMEOUT_MS`` and ``from httpserver import
HttpServer, Response``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import Cluster
from httpserver import HttpServer
from rabbit import ExternalBroker, RabbitNode, RabbitUnavailable, find_binary


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI a skipped test fails: a skip there may hide a missing feature."""
    report = yield
    if _in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = "skipped under CI=%s, which counts as a failure: %s" % (
            os.environ.get("CI"), reason)
    return report


@pytest.fixture(scope="session")
def rabbit() -> Iterator[RabbitNode | ExternalBroker]:
    """The session's RabbitMQ node, started once on free loopback ports.

    Without a ``rabbitmq-server`` binary the fixture fails, except outside CI when
    ``RBIT_TEST_AMQP_URL`` names a broker to use instead (node control is then missing).
    """
    if find_binary("rabbitmq-server") is None:
        url = os.environ.get("RBIT_TEST_AMQP_URL")
        if url and not _in_ci():
            yield ExternalBroker(url)
            return
        pytest.fail(
            "rabbitmq-server is not installed: run scripts/test (it installs Debian's "
            "rabbitmq-server) or `apt-get install rabbitmq-server`"
            + ("" if _in_ci() else "; or set RBIT_TEST_AMQP_URL to use a running broker"),
            pytrace=False,
        )
    # Not under pytest's basetemp: concurrent test runs prune each other's old basetemps.
    base = Path(tempfile.mkdtemp(prefix="rbit-rabbit-"))
    node = RabbitNode(base)
    try:
        node.start()
    except RabbitUnavailable as exc:
        pytest.fail(
            "could not start a private RabbitMQ node (files kept in %s): %s" % (base, exc),
            pytrace=False,
        )
    try:
        yield node
    finally:
        node.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """Three clustered RabbitMQ nodes on loopback (tests/cluster.py), started once.

    A cluster that does not form fails the tests that use it; it is never skipped.
    """
    base = Path(tempfile.mkdtemp(prefix="rbit-cluster-"))
    nodes = Cluster(base)
    try:
        nodes.start()
    except RabbitUnavailable as exc:
        nodes.stop(remove=False)
        pytest.fail("the three-node cluster did not form (files kept in %s): %s"
                    % (base, exc), pytrace=False)
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
def vhost(rabbit: RabbitNode | ExternalBroker) -> Iterator[str]:
    """A fresh, empty vhost on the session node (guest has full rights); deleted after."""
    name = rabbit.new_vhost()
    yield name
    # Also repairs an outage or alarm a failing test left behind, for the tests after it.
    rabbit.reset(name)


@pytest.fixture
def http_server() -> Iterator[HttpServer]:
    """A started :class:`HttpServer` on 127.0.0.1 (free port); stopped after the test."""
    server = HttpServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def amqp(rabbit, vhost):
    """A plain pika client on the test's vhost (publish jobs, watch statuses)."""
    from worker_helpers import Amqp

    client = Amqp(rabbit.url(vhost))
    yield client
    client.close()


@pytest.fixture
def out(tmp_path):
    """A directory where test runners record what they did."""
    path = tmp_path / "out"
    path.mkdir()
    return path
