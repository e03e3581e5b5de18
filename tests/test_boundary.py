"""The message boundary: whatever a publisher puts in a message ends settled.

Headers pika cannot decode, copies that no longer fit a frame, header values of any
type or range, job ids that are unsafe as paths or arguments, text that would forge
log lines or drive the terminal: each is sent through a real worker process on the
real node, which must dead-letter (or run) the job and keep serving its other queue
without ever reconnecting.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pika
import pytest
from fault_helpers import ROOT_DIR, TESTS_DIR, WorkerProcess, wait_until

from rbit import decoding
from rbit.amqp.frames import TRIMMED_HEADER, fit, unfit
from rbit.amqp.records import Delivery, Publish
from rbit.config import RetryPolicy, RunnerSettings
from rbit.fate import blocked_delay, decide
from rbit.message import MAX_ATTEMPTS, Message, safe_job_id
from rbit.outcome import Outcome
from rbit.safetext import escape

QUEUE = "boundary"
OTHER = "boundary_other"
DEAD = f"{QUEUE}.dead"


# ------------------------------------------------------------------ the worker


def write_config(tmp_path: Path, rabbit, vhost: str, **keys: object) -> Path:
    """A worker serving QUEUE and OTHER with boundary_runners:record_or_fail."""
    sections = {
        "rbit": {"name": "boundary-worker", "polling_time": 5, "shutdown_grace": 5},
        "amqp": {"host": f"{rabbit.host}:{rabbit.port}", "virtual_host": vhost,
                 "connect_timeout": 2, "reconnect_delay": 0.2, "reconnect_max_delay": 1},
    }
    for queue in (QUEUE, OTHER):
        sections[f"runner:{queue}"] = {
            "runner": "python!boundary_runners:record_or_fail", "routing_key": queue,
            "record": tmp_path / "record", "max_retries": 1, "retry_delay": 0.05,
            "retry_max_delay": 1, **keys}
    text = "".join(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in section.items())
                   for name, section in sections.items())
    path = tmp_path / "worker.ini"
    path.write_text(text)
    return path


def runs(tmp_path: Path) -> list[tuple[str, int]]:
    """(job id, attempt) of every try recorded so far."""
    path = tmp_path / "record"
    if not path.exists():
        return []
    return [(line.split("\t")[1], int(line.split("\t")[2]))
            for line in path.read_text().splitlines()]


class Broker:
    """The test's own blocking connection: publishes raw frames, reads queues."""

    def __init__(self, url: str) -> None:
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def publish(self, queue: str, body: bytes, properties: pika.BasicProperties) -> None:
        self.channel.basic_publish("", queue, body, properties, mandatory=True)

    def job(self, queue: str, job_id: str, body: bytes = b"{}", **headers: object) -> None:
        props = pika.BasicProperties(delivery_mode=2, message_id=job_id,
                                     headers=headers or None)
        self.publish(queue, body, props)

    def count(self, queue: str) -> int:
        return self.channel.queue_declare(queue, passive=True).method.message_count

    def get(self, queue: str):
        method, props, body = self.channel.basic_get(queue, auto_ack=True)
        return None if method is None else (props, body)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


@pytest.fixture
def setup(tmp_path, rabbit, vhost):
    """A running worker process and the test's broker connection."""
    config = write_config(tmp_path, rabbit, vhost)
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    broker = None
    try:
        wait_until(lambda: OTHER in rabbit.list_queues(vhost), 30, "the worker's queues")
        broker = Broker(rabbit.url(vhost))
        yield worker, broker, config
    finally:
        if broker is not None:
            broker.close()
        worker.stop()


def assert_keeps_serving(tmp_path: Path, broker: Broker, worker: WorkerProcess,
                         probe: str) -> None:
    """A job on the other queue runs once, and the worker never reconnected."""
    broker.job(OTHER, probe)
    wait_until(lambda: (probe, 1) in runs(tmp_path), 15, f"the probe job {probe}")
    assert [run for run in runs(tmp_path) if run[0] == probe] == [(probe, 1)]
    text = worker.text()
    assert worker.alive, text
    assert "connection lost" not in text, text
    assert "reconnecting" not in text, text


# ------------------------------------------------------- raw content headers


def short(text: str) -> bytes:
    data = text.encode()
    return bytes([len(data)]) + data


def table(*fields: bytes) -> bytes:
    """An encoded field table from encoded ``name + type + value`` fields."""
    content = b"".join(fields)
    return struct.pack(">I", len(content)) + content


def nested_table(depth: int) -> bytes:
    inner = b""
    for _ in range(depth):  # built from the inside out: no recursion here
        inner = short("n") + b"F" + struct.pack(">I", len(inner)) + inner
    return struct.pack(">I", len(inner)) + inner


def nested_array(depth: int) -> bytes:
    """An encoded array field (type and value) holding arrays ``depth`` deep."""
    value = b"A" + struct.pack(">I", 0)
    for _ in range(depth - 1):
        value = b"A" + struct.pack(">I", len(value)) + value
    return value


class RawProperties(pika.BasicProperties):
    """Basic properties whose header table is sent exactly as given."""

    def __init__(self, encoded_table: bytes, message_id: str) -> None:
        super().__init__(delivery_mode=2, message_id=message_id)
        self._table = encoded_table

    def encode(self) -> list[bytes]:
        flags = (self.FLAG_HEADERS | self.FLAG_DELIVERY_MODE | self.FLAG_MESSAGE_ID)
        return [struct.pack(">H", flags), self._table, b"\x02", short(self.message_id)]


UNDECODABLE = {
    "nested 3000 tables deep": nested_table(3000),
    "arrays nested 3000 deep": table(short("a") + nested_array(3000)),
    "a timestamp past year 9999": table(short("t") + b"T" + struct.pack(">Q", 2**62)),
}


@pytest.mark.parametrize("encoded", UNDECODABLE.values(), ids=UNDECODABLE.keys())
def test_headers_pika_cannot_decode_go_to_the_dead_letters_with_the_body(
        setup, tmp_path, encoded):
    worker, broker, _config = setup
    broker.publish(QUEUE, b"the body", RawProperties(encoded, "undecodable-1"))
    wait_until(lambda: broker.count(DEAD) == 1, 20, "the dead letter")
    props, body = broker.get(DEAD)
    assert body == b"the body"
    assert props.message_id == "undecodable-1"
    assert props.headers["x-rbit-dead-reason"].startswith("headers cannot be decoded")
    assert "x-rbit-undecodable-headers" not in props.headers
    assert runs(tmp_path) == []  # no runner saw it
    assert broker.count(QUEUE) == 0
    assert_keeps_serving(tmp_path, broker, worker, "probe-1")


def test_dead_letters_list_shows_a_message_whose_headers_cannot_be_decoded(setup):
    _worker, broker, config = setup
    broker.publish(DEAD, b"kept", RawProperties(nested_table(3000), "deep-dead"))
    result = dead_letters(config, "list")
    assert result.returncode == 0, result.stderr
    assert "deep-dead" in result.stdout
    assert "headers cannot be decoded: RecursionError" in result.stdout
    assert "1 dead job(s)" in result.stdout


def dead_letters(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rbit", "dead-letters", str(config), *args, QUEUE],
        capture_output=True, text=True, timeout=60, cwd=ROOT_DIR,
        env={"PYTHONPATH": f"{TESTS_DIR}:{ROOT_DIR}", "PATH": "/usr/bin:/bin"})


# ----------------------------------------------------- copies that do not fit


def test_copy_too_large_for_a_frame_is_published_trimmed_without_reconnecting(
        setup, tmp_path):
    worker, broker, _config = setup
    # Fits the publisher's frame (131072 bytes), not once rbit's headers are added.
    big = "x" * 130_000
    broker.job(QUEUE, "too-big", b"fail: always", big=big)
    wait_until(lambda: broker.count(DEAD) == 1, 20, "the dead letter")
    props, body = broker.get(DEAD)
    assert body == b"fail: always"
    headers = props.headers
    assert "big" not in headers
    assert "more than a frame" in headers["x-rbit-trimmed"]
    assert headers["x-rbit-dead-reason"].startswith("failed after 2 tries")
    assert [run for run in runs(tmp_path) if run[0] == "too-big"] == [
        ("too-big", 1), ("too-big", 2)]
    assert_keeps_serving(tmp_path, broker, worker, "probe-2")


# ------------------------------------------------------------ header values


@pytest.mark.parametrize("attempts", [-500, "-500", 2.5, True, 10**15, {"n": 1}, [3],
                                      Decimal("-1.5"), None, b"\xff"],
                         ids=repr)
def test_attempts_header_of_any_type_or_range_cannot_bypass_the_retry_limit(
        setup, tmp_path, attempts):
    worker, broker, _config = setup
    if isinstance(attempts, float):
        attempts = Decimal(attempts)  # pika has no float encoder; a decimal is the wire's
    broker.job(QUEUE, "counted", b"fail: always", **{"x-rbit-attempts": attempts})
    wait_until(lambda: broker.count(DEAD) == 1, 20, "the dead letter")
    tries = [run for run in runs(tmp_path) if run[0] == "counted"]
    # max_retries = 1: at most two tries, whatever the header claimed.
    assert 1 <= len(tries) <= 2
    assert all(1 <= attempt <= 2 for _id, attempt in tries)
    props, _body = broker.get(DEAD)
    assert props.headers["x-rbit-attempts"] in (1, 2)
    assert_keeps_serving(tmp_path, broker, worker, "probe-3")


# ---------------------------------------------------------------- job ids


def test_unsafe_message_ids_reach_shell_runners_as_digests(tmp_path, rabbit, vhost):
    outdir = tmp_path / "out"
    outdir.mkdir()
    escape_target = tmp_path / "x"
    escape_target.mkdir()
    config = write_config(tmp_path, rabbit, vhost)
    text = config.read_text().replace(
        "runner = python!boundary_runners:record_or_fail",
        "runner = shell!touch {outdir}/%ID.epub\noutdir = " + str(outdir), 1)
    config.write_text(text)
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    broker = None
    try:
        wait_until(lambda: OTHER in rabbit.list_queues(vhost), 30, "the worker's queues")
        broker = Broker(rabbit.url(vhost))
        traversal = "../" * 12 + str(escape_target).lstrip("/") + "/TRAVERSED"
        for job_id in (traversal, "-rf", "safe-id.1"):
            broker.job(QUEUE, job_id)
        wait_until(lambda: len(list(outdir.iterdir())) == 3, 20, "three files")
    finally:
        if broker is not None:
            broker.close()
        worker.stop()
    names = sorted(path.name for path in outdir.iterdir())
    assert not list(escape_target.iterdir())
    assert "safe-id.1.epub" in names
    digests = [name for name in names if name.startswith("id-sha256:")]
    assert len(digests) == 2
    assert all(len(name) == len("id-sha256:") + 16 + len(".epub") for name in digests)


def test_newline_in_a_message_id_cannot_forge_a_log_line(setup, tmp_path):
    worker, broker, _config = setup
    broker.job(QUEUE, "evil\nERROR forged line\x1b[2J", b"fail: log it")
    wait_until(lambda: broker.count(DEAD) == 1, 20, "the dead letter")
    lines = worker.text().splitlines()
    assert not any(line.startswith("ERROR forged") for line in lines)
    assert "\x1b" not in worker.text()


def test_dead_letters_list_escapes_what_came_from_the_network(setup, tmp_path):
    _worker, broker, config = setup
    props = pika.BasicProperties(message_id="id\x1b]0;pwned\x07", headers={
        "x-rbit-dead-reason": "bad\x1b[31m red\rover", "x-rbit-dead-worker": "w\nFORGED",
        "x-rbit-attempts": "\x1b[2J"})
    broker.publish(DEAD, b"\x1b[5mblink\nline", props)
    result = dead_letters(config, "list")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout
    assert "\x07" not in result.stdout
    assert "\r" not in result.stdout
    assert not any(line.startswith("FORGED") for line in result.stdout.splitlines())
    assert "reason: bad\\x1b[31m red\n" in result.stdout  # first line of the reason


# ------------------------------------------------- the rules, without a broker


@pytest.mark.parametrize("job_id", ["42", "job-1", "a.b_c:d@e+f=g", "sha256:0123abcd",
                                    "x" * 200])
def test_safe_job_ids_are_kept(job_id):
    assert safe_job_id(job_id) == job_id


@pytest.mark.parametrize("job_id", [
    "../../../../tmp/x/TRAVERSED", "a/b", "..", ".hidden", "-rf", "--help", "a b",
    "tab\there", "new\nline", "nul\0", "esc\x1b[2J", "caf\u00e9", "x" * 201, ""])
def test_unsafe_job_ids_become_a_stable_digest(job_id):
    safe = safe_job_id(job_id)
    assert re.fullmatch(r"id-sha256:[0-9a-f]{16}", safe)
    assert safe == safe_job_id(job_id)
    assert safe != safe_job_id(job_id + "!")


def test_message_keeps_the_unsafe_id_it_replaced():
    message = Message(b"{}", "q", message_id="../etc/passwd")
    assert message.job_id.startswith("id-sha256:")
    assert message.raw_job_id == "../etc/passwd"
    assert Message(b"{}", "q", message_id="fine").raw_job_id is None


def _expanding_pybit_body(levels: int) -> bytes:
    # Each level is a list holding the previous one twice (py/id references): the body
    # stays small, the id's text would double with every level.
    nodes: list[object] = [["0123456789"]]
    for level in range(1, levels):
        ref = {"py/id": 2 + level - 1}  # the record, the job, then the lists in order
        nodes.append([ref, ref])
    job = {"py/object": "pybit.models.Job", "id": {"py/tuple": nodes}}
    document = {"py/object": "pybit.models.BuildRequest", "job": job}
    return json.dumps(document).encode()


def test_a_pybit_job_id_cannot_expand_beyond_its_body():
    body = _expanding_pybit_body(30)  # 2**30 copies of ten characters, were it expanded
    assert len(body) < 2000
    assert decoding.pybit_job_id(body) is None
    assert Message(body, "q").job_id.startswith("sha256:")


def test_a_long_pybit_job_id_becomes_a_digest():
    long_id = "7" * 5000
    document = {"py/object": "pybit.models.BuildRequest",
                "job": {"py/object": "pybit.models.Job", "id": long_id}}
    message = Message(json.dumps(document).encode(), "q")
    assert message.job_id.startswith("id-sha256:")


@pytest.mark.parametrize(("value", "attempt"), [
    (None, 1), (0, 1), (2, 3), (-500, 1), (10**30, MAX_ATTEMPTS + 1), ("5", 1), (True, 1),
    (2.5, 1), (Decimal(3), 1), ({"n": 1}, 1), ([1], 1), (b"3", 1)])
def test_the_attempts_header_is_an_integer_clamped_to_a_range(value, attempt):
    headers = {} if value is None else {"x-rbit-attempts": value}
    assert Message(b"", "q", headers).attempt == attempt


def test_a_try_count_beyond_the_policy_dead_letters_after_the_last_try():
    delivery = Delivery(Message(b"", "q", {"x-rbit-attempts": 10**30}), 1, 0)
    runner = RunnerSettings(queue="q", runner="python!x:y", kind="python", target="x:y",
                            routing_key="q",
                            retry=RetryPolicy(max_retries=3))
    settlement = decide(Outcome.failed("boom"), delivery, runner, worker="w")
    assert settlement.publish.routing_key == "q.dead"
    assert settlement.publish.headers["x-rbit-attempts"] == 4


def test_blocked_delays_are_clamped_and_share_few_delay_queues():
    policy = RetryPolicy(max_delay=3600)
    delays = [0, -5, 1e-9, float("inf"), float("nan"), 1e308, *(n / 7 for n in range(10**4))]
    queues = {blocked_delay(policy, delay)[0] for delay in delays}
    waits = [blocked_delay(policy, delay)[1] for delay in delays]
    assert len(queues) <= 23
    assert all(1 <= wait <= 3_600_000 for wait in waits)
    assert all(base >= wait or base == 3_600_000
               for base, wait in (blocked_delay(policy, d) for d in delays))


def test_a_copy_too_large_is_trimmed_to_rbits_own_headers():
    own = {"x-rbit-dead-reason": "failed", "x-rbit-attempts": 2}
    copy = Publish("", "q.dead", b"body", headers={"big": "x" * 200_000, **own},
                   trimmed_headers=own)
    message, props = fit(copy, {"headers": copy.headers, "message_id": "m"}, 131_072)
    assert set(props.headers) == {*own, TRIMMED_HEADER}
    assert props.message_id == "m"
    assert message.body == b"body"
    assert unfit(props, 131_072) is None


def test_a_copy_pika_cannot_encode_is_trimmed():
    own = {"x-rbit-attempts": 1}
    deep: dict = {}
    for _ in range(5000):
        deep = {"n": deep}
    copy = Publish("", "q.retry.1", b"", headers={"deep": deep, "odd": object(), **own},
                   trimmed_headers=own)
    _message, props = fit(copy, {"headers": copy.headers}, 131_072)
    assert props.headers[TRIMMED_HEADER].startswith("headers cannot be encoded")


def test_escape_keeps_one_line_and_no_control_characters():
    shown = escape("a\nb\r\x1b[31m\x00\u202e\\" + "z" * 1000, 50)
    assert "\n" not in shown
    assert "\x1b" not in shown
    assert "\u202e" not in shown
    assert shown.startswith("a\\nb\\r\\x1b[31m\\x00\\u202e\\\\")
    assert shown.endswith("...")
    assert len(shown) < 100
