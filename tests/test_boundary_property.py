"""Property: any header table and any body a publisher sends ends settled exactly once.

Hypothesis draws header tables (every AMQP field type pika encodes, nested, large,
odd values under the keys rbit reads, a table nested too deep for pika to decode)
and bodies, and sends them to one real worker process on the real node. Each job
must end exactly once: run and acked, or dead-lettered (after its tries, or at once
when its headers could not be decoded), and the worker must keep serving its other
queue without ever reconnecting.
"""

from __future__ import annotations

import collections
import itertools
from datetime import UTC, datetime

import pika
import pytest
from fault_helpers import WorkerProcess, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_boundary import (
    DEAD,
    OTHER,
    QUEUE,
    Broker,
    RawProperties,
    nested_table,
    runs,
    write_config,
)

from rbit.message import MAX_ATTEMPTS

RBIT_KEYS = ["x-rbit-attempts", "x-rbit-last-error", "x-rbit-undecodable-headers",
             "x-rbit-held-by", "x-rbit-hold-id", "x-rbit-dead-reason", "x-rbit-replayed"]

scalars = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.decimals(min_value=-10**5, max_value=10**5, places=3,
                allow_nan=False, allow_infinity=False),
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 1, 1),
                 timezones=st.just(UTC)),
    st.none(),
)
keys = st.one_of(st.sampled_from(RBIT_KEYS), st.text(max_size=20))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12)
tables = st.dictionaries(keys, values, max_size=6)
# Shapes beyond what the recursive strategy reaches: a header too large to copy with
# rbit's headers added, and a table too deep for pika to decode.
shapes = st.sampled_from(["table", "table", "table", "table", "big", "deep"])
bodies = st.tuples(st.sampled_from([b"", b"fail"]), st.binary(max_size=200)).map(
    lambda parts: parts[0] + parts[1])


def _expected_tries(headers: dict, body: bytes) -> range:
    """How many tries the job may get (max_retries = 1 in the config)."""
    if "x-rbit-undecodable-headers" in headers:
        return range(1)
    if not body.startswith(b"fail"):
        return range(1, 2)
    claimed = headers.get("x-rbit-attempts", 0)
    claimed = min(max(claimed, 0), MAX_ATTEMPTS) if claimed.__class__ is int else 0
    return range(1, 2) if claimed >= 1 else range(2, 3)


@pytest.mark.timeout(240)
def test_any_headers_and_body_are_settled_exactly_once(tmp_path, rabbit, vhost):
    config = write_config(tmp_path, rabbit, vhost)
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    wait_until(lambda: OTHER in rabbit.list_queues(vhost), 30, "the worker's queues")
    broker = Broker(rabbit.url(vhost))
    numbers = itertools.count()
    dead: collections.Counter[str] = collections.Counter()
    expected_dead: set[str] = set()
    expected_runs: dict[str, range] = {}

    def drain_dead() -> None:
        while (got := broker.get(DEAD)) is not None:
            dead[got[0].message_id] += 1

    def ended(job_id: str) -> bool:
        drain_dead()
        tries = len([run for run in runs(tmp_path) if run[0] == job_id])
        if job_id in expected_dead:
            return dead[job_id] >= 1
        return tries in expected_runs[job_id]

    @settings(max_examples=30, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(shape=shapes, headers=tables, body=bodies)
    def check(shape: str, headers: dict, body: bytes) -> None:
        job_id = f"hyp-{next(numbers)}"
        if shape == "deep":
            broker.publish(QUEUE, body, RawProperties(nested_table(3000), job_id))
            headers = {"x-rbit-undecodable-headers": "deep"}
        else:
            if shape == "big":
                headers = {**headers, "big": "x" * 129_000}
            broker.publish(QUEUE, body, pika.BasicProperties(
                delivery_mode=2, message_id=job_id, headers=headers))
        expected_runs[job_id] = _expected_tries(headers, body)
        if "x-rbit-undecodable-headers" in headers or body.startswith(b"fail"):
            expected_dead.add(job_id)
        wait_until(lambda: ended(job_id), 20, f"the end of {job_id}")
        probe = f"probe-{job_id}"
        broker.job(OTHER, probe)
        wait_until(lambda: (probe, 1) in runs(tmp_path), 15, f"the probe {probe}")

    try:
        check()
        wait_until(lambda: all(counts == (0, 0) for name, counts in
                               rabbit.list_queues(vhost).items()
                               if name in (QUEUE, OTHER)), 30, "every job settled")
        drain_dead()
    finally:
        broker.close()
        worker.stop()
    tries = collections.Counter(run[0] for run in runs(tmp_path))
    for job_id, allowed in expected_runs.items():
        assert tries[job_id] in allowed, (job_id, tries[job_id], allowed)
        assert dead[job_id] == (1 if job_id in expected_dead else 0), job_id
    assert len(set(runs(tmp_path))) == len(runs(tmp_path))  # no try ran twice
    text = worker.text()
    assert worker.proc.returncode == 0, text
    assert "connection lost" not in text, text
    assert "reconnecting" not in text, text
    assert "internal error" not in text, text
    assert "Exception in thread" not in text, text
