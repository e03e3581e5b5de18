"""Property: no value of a numeric key can get past the config and break a computation.

For every numeric key, any text either loads or is a :class:`ConfigError`; and every
value that loads keeps the computations made from it in range: retry delays and the
delay queues they name, reconnect and sink backoff, and the timers (``poll`` takes at
most 2**31-1 ms, locks ``threading.TIMEOUT_MAX`` s, RabbitMQ TTLs 2**32-1 ms).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rbit import backoff
from rbit.config import Settings, load_config
from rbit.credit.settings import load_credit_config
from rbit.errors import ConfigError
from rbit.fate import retry_delay
from rbit.topology import runner_queues

POLL_MAX_S = (2**31 - 1) / 1000  # select.poll's timeout is a C int of milliseconds
TTL_MAX_MS = 2**32 - 1  # RabbitMQ's largest message TTL
AMQP_NAME_MAX = 255

NUMERIC_KEYS = [
    ("rbit", key) for key in
    ("polling_time", "concurrency", "prefetch", "shutdown_grace", "consumer_timeout")
] + [
    ("amqp", key) for key in
    ("port", "heartbeat", "connect_timeout", "reconnect_delay", "reconnect_max_delay")
] + [
    ("status", key) for key in ("http_timeout", "retry_max_delay", "max_pending")
] + [
    ("runner:q", key) for key in
    ("concurrency", "prefetch", "timeout", "delivery_limit", "max_retries", "retry_delay",
     "retry_backoff", "retry_max_delay", "retry_jitter", "kill_grace", "batch_size")
]

# Text that survives as one ini value: no line breaks of any kind.
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters=_LINE_BREAKS),
                max_size=40)
_NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(["1e308", "-1e308", "1e-308", "0", "-0", "inf", "nan", "9" * 5000,
                     "1_000", " 5 ", "0x10", "1e6", "2147483.648", "4294967.296"]),
)
VALUES = st.one_of(_NUMBERS, _TEXT)


def config_text(section: str, key: str, value: str) -> str:
    sections = {
        "rbit": ["name = w1"],
        "amqp": ["host = localhost"],
        "status": [],
        "runner:q": ["runner = shell!true", "queue_type = quorum"],
    }
    sections[section].append(f"{key} = {value}")
    return "".join(
        f"[{name}]\n" + "".join(f"{line}\n" for line in lines) for name, lines in sections.items()
    )


def load_or_config_error(path: Path, text: str) -> Settings | None:
    path.write_text(text, encoding="utf-8")
    try:
        return load_config(str(path), environ={})
    except ConfigError:
        return None


def assert_in_range(loaded: Settings) -> None:
    """Every computation rbit makes from these numbers, made, and checked in range."""
    worker, amqp, status = loaded.worker, loaded.amqp, loaded.status
    timers = [worker.polling_time, worker.shutdown_grace, amqp.connect_timeout,
              (amqp.connect_timeout * 2 + 5) * len(amqp.hosts), status.http_timeout]
    if worker.consumer_timeout is not None:
        timers.append(worker.consumer_timeout / 2)
    for first, cap in ((amqp.reconnect_delay, amqp.reconnect_max_delay),
                       (1.0, status.retry_max_delay)):
        for attempt in (1, 2, 64, 10**6):
            timers.append(backoff.delay(attempt, first, cap))
    assert 0 < amqp.heartbeat + 1 <= 65536
    for runner in loaded.runners:
        assert runner.prefetch <= 65535
        assert runner.concurrency <= 1000
        timers.append(float(runner.settings.get("kill_grace", 0)))
        if runner.timeout is not None:
            timers.append(runner.timeout)
        for attempt in sorted({1, 2, 3, runner.retry.max_retries, runner.retry.max_retries + 1}):
            for draw in (0.0, 0.999999):
                base_ms, wait_ms = retry_delay(runner.retry, attempt, lambda d=draw: d)
                assert base_ms >= 0
                assert 1 <= wait_ms <= TTL_MAX_MS
        for queue in runner_queues(runner, worker.exchange):
            assert len(queue.name.encode("utf-8")) <= AMQP_NAME_MAX
        assert len(runner_queues(runner, worker.exchange)) <= 102
    for timer in timers:
        assert 0 <= timer <= min(POLL_MAX_S, threading.TIMEOUT_MAX), timers


@pytest.mark.parametrize(("section", "key"), NUMERIC_KEYS)
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=VALUES)
def test_any_value_of_a_numeric_key_loads_in_range_or_is_a_config_error(
    tmp_path: Path, section: str, key: str, value: str
) -> None:
    loaded = load_or_config_error(tmp_path / "rbit.ini", config_text(section, key, value))

    if loaded is not None:
        assert_in_range(loaded)


# Decreasing; each documented maximum is among them.
_CANDIDATES = ("1e308", "1e15", "1e9", "10000000", "4294967", "2147483", "1209600",
               "1000000", "100000", "86400", "65535", "3600", "1000", "100", "1")


def largest_accepted(path: Path, section: str, key: str) -> str:
    for value in _CANDIDATES:
        if load_or_config_error(path, config_text(section, key, value)) is not None:
            return value
    raise AssertionError(f"[{section}] {key}: not even 1 is accepted")


def test_every_key_at_its_largest_accepted_value_at_once_stays_in_range(
    tmp_path: Path
) -> None:
    path = tmp_path / "rbit.ini"
    largest = {(section, key): largest_accepted(path, section, key)
               for section, key in NUMERIC_KEYS}
    lines = {"rbit": ["name = w1"], "amqp": ["host = localhost"], "status": [],
             "runner:q": ["runner = shell!true", "queue_type = quorum"]}
    for (section, key), value in largest.items():
        lines[section].append(f"{key} = {value}")
    text = "".join(f"[{name}]\n" + "".join(f"{line}\n" for line in body)
                   for name, body in lines.items())

    loaded = load_or_config_error(path, text)

    assert loaded is not None
    assert loaded.runners[0].retry.max_retries == 100_000
    assert_in_range(loaded)


# --- rbit-credit's config ------------------------------------------------------------------

CREDIT_KEYS = [("server", key) for key in
               ("idle_timeout", "reply_timeout", "line_timeout", "max_connections", "loglevel")
               ] + [("api", "flush_interval"), ("server", "bind")]


@pytest.mark.parametrize(("section", "key"), CREDIT_KEYS)
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.one_of(VALUES, st.sampled_from(["²", "１２", "127.0.0.1:²", "h:" + "9" * 5000,
                                                "-5", "99999999999999999999"])))
def test_any_value_of_a_credit_daemon_key_loads_in_range_or_is_a_config_error(
    tmp_path: Path, section: str, key: str, value: str
) -> None:
    lines = {"server": [f"bind = {tmp_path}/c.sock"], "api": [], "amqp": ["host = localhost"]}
    if key == "bind":
        lines["server"] = ["socket = tcp"]
    lines[section].append(f"{key} = {value}")
    path = tmp_path / "credit.ini"
    path.write_text("".join(f"[{name}]\n" + "".join(f"{line}\n" for line in body)
                            for name, body in lines.items()), encoding="utf-8")
    try:
        loaded = load_credit_config(str(path), environ={})
    except ConfigError:
        return

    for timer in (loaded.idle_timeout or 0, loaded.reply_timeout, loaded.line_timeout,
                  loaded.api.flush_interval):
        assert 0 <= timer <= min(POLL_MAX_S, threading.TIMEOUT_MAX)
    assert 1 <= loaded.max_connections <= 1_000_000
    assert 0 <= loaded.loglevel <= 50
    assert loaded.port is None or 0 < loaded.port < 65536
