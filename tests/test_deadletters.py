"""Dead letters: what lands there, what its headers say, and the dead-letters verb."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fault_helpers import (
    QUEUE,
    ROOT_DIR,
    TESTS_DIR,
    Publisher,
    Records,
    WorkerProcess,
    all_empty,
    amqp_keys,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.fault
DEAD = f"{QUEUE}.dead"


def _worker(tmp_path, rabbit, vhost, runner: str) -> tuple[WorkerProcess, object]:
    config = write_config(tmp_path / "worker.ini", amqp_keys(rabbit, vhost), {
        "runner": f"python!fault_runners:{runner}", "record": tmp_path / "record",
        "max_retries": 3, "retry_delay": 0.2})
    worker = WorkerProcess(config, tmp_path / "worker.log").start()
    wait_until(lambda: QUEUE in rabbit.list_queues(vhost), 30, "the worker's queue")
    return worker, config


def _dead_count(publisher: Publisher) -> int:
    return publisher.channel.queue_declare(DEAD, passive=True).method.message_count


def _verb(config, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rbit", "dead-letters", str(config), *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT_DIR,
        env={"PYTHONPATH": f"{TESTS_DIR}:{ROOT_DIR}", "PATH": "/usr/bin:/bin"})


def test_undecodable_body_goes_to_the_dead_letters_at_once(tmp_path, rabbit, vhost):
    worker, _config = _worker(tmp_path, rabbit, vhost, "decode_body")
    publisher = Publisher(rabbit.url(vhost))
    try:
        publisher.jobs(["garbage-1"], body=b"\xff{not json")
        wait_until(lambda: _dead_count(publisher) == 1, 30, "the dead letter")
        _method, props, body = publisher.get(DEAD)
    finally:
        worker.stop()
        publisher.close()
    assert body == b"\xff{not json"
    assert props.message_id == "garbage-1"
    assert props.headers["x-rbit-dead-reason"].startswith("undecodable body")
    assert props.headers["x-rbit-attempts"] == 1  # no retries for a body that never decodes
    assert not Records(tmp_path / "record").lines()


def test_dead_letters_list_replay_and_purge_end_to_end(tmp_path, rabbit, vhost):
    worker, config = _worker(tmp_path, rabbit, vhost, "reject_unless_replayed")
    records = Records(tmp_path / "record")
    publisher = Publisher(rabbit.url(vhost))
    try:
        publisher.jobs(["job-1", "job-2"])
        wait_until(lambda: _dead_count(publisher) == 2, 30, "two dead letters")
        assert len(records.events("rejected")) == 2  # rejected: no retries

        listed = _verb(config, "list", QUEUE)
        assert listed.returncode == 0, listed.stderr
        assert "job-1" in listed.stdout
        assert "job-2" in listed.stdout
        assert "reason: not yet" in listed.stdout
        assert "worker=fault-worker" in listed.stdout
        assert "2 dead job(s)" in listed.stdout
        wait_until(lambda: _dead_count(publisher) == 2, 10, "the listed jobs left in place")

        replayed = _verb(config, "replay", QUEUE)
        assert replayed.returncode == 0, replayed.stderr
        assert "replayed 2 job(s)" in replayed.stdout
        wait_until(lambda: set(records.count()) == {"job-1", "job-2"}, 30, "the replayed jobs")
        assert all(fields[2] == "1" for fields in records.events("done"))  # attempts reset
        wait_until(lambda: all_empty(rabbit, vhost), 15, "empty queues")

        publisher.jobs(["job-3"], body=b'{"again": true}')
        wait_until(lambda: _dead_count(publisher) == 1, 30, "a new dead letter")
        purged = _verb(config, "purge", QUEUE)
        assert purged.returncode == 0, purged.stderr
        assert "purged 1 job(s)" in purged.stdout
        assert _dead_count(publisher) == 0
    finally:
        worker.stop()
        publisher.close()


def test_dead_letters_verb_refuses_an_unknown_queue(tmp_path, rabbit, vhost):
    config = write_config(tmp_path / "worker.ini", amqp_keys(rabbit, vhost), {
        "runner": "python!fault_runners:record", "record": tmp_path / "record"})
    result = _verb(config, "list", "no-such-queue")
    assert result.returncode == 78
    assert "no [runner:no-such-queue] section" in result.stderr


@pytest.mark.parametrize("action", ["list", "replay", "purge"])
def test_dead_letters_verb_on_a_queue_with_no_dead_letters_yet_says_so_in_one_line(
        tmp_path, rabbit, vhost, action):
    config = write_config(tmp_path / "worker.ini", amqp_keys(rabbit, vhost), {
        "runner": "python!fault_runners:record", "record": tmp_path / "record"})
    assert DEAD not in rabbit.list_queues(vhost)  # no job ever died: no QUEUE.dead
    result = _verb(config, action, QUEUE)
    assert result.returncode == 66  # ExitCode.NO_QUEUE, documented in README
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"no dead letters for '{QUEUE}' yet" in result.stderr
    assert f"'{DEAD}' does not exist" in result.stderr
    assert result.stdout == ""
