"""How a job ends decides its fate on the broker: ack, delayed retry, dead letters."""

from __future__ import annotations

import json

import pytest
from worker_helpers import running_worker, wait_until, write_config

QUEUE = "outcomes"
DEAD = f"{QUEUE}.dead"


def _config(tmp_path, rabbit, vhost, out, runner, mode="consume", **keys):
    section = {"runner": runner, "outdir": out, **keys}
    return write_config(tmp_path, rabbit.url(vhost), {QUEUE: section},
                        status={"sinks": "log, amqp"}, rbit={"mode": mode})


def _python(func):
    return f"python!worker_runners:{func}"


def test_done_job_is_acked_and_gone(tmp_path, rabbit, vhost, amqp, out):
    watcher = amqp.watch("rbit.status")
    with running_worker(_config(tmp_path, rabbit, vhost, out, _python("succeed"))):
        amqp.publish_jobs(["ok"], exchange="", routing_key=QUEUE)
        watcher.wait_for("ok", "Done")
        wait_until(lambda: rabbit.list_queues(vhost)[QUEUE] == (0, 0), 10, "the ack")
    assert rabbit.list_queues(vhost)[DEAD] == (0, 0)


def test_job_is_acked_only_after_its_runner_ended(tmp_path, rabbit, vhost, amqp, out):
    with running_worker(_config(tmp_path, rabbit, vhost, out, _python("wait_for_release"))):
        amqp.publish_jobs(["held"], exchange="", routing_key=QUEUE)
        wait_until(lambda: (out / "held.started").exists(), 10, "the job to start")
        assert rabbit.list_queues(vhost)[QUEUE] == (0, 1)  # delivered, not acked
        (out / "release").touch()
        wait_until(lambda: rabbit.list_queues(vhost)[QUEUE] == (0, 0), 10, "the ack")
    assert (out / "held.done").exists()


def test_exception_fails_the_job_into_the_dead_letters_with_its_traceback(
        tmp_path, rabbit, vhost, amqp, out):
    watcher = amqp.watch("rbit.status")
    config = _config(tmp_path, rabbit, vhost, out, _python("explode"), max_retries=0)
    with running_worker(config):
        amqp.publish_jobs(["boom"], exchange="", routing_key=QUEUE)
        events = watcher.wait_for("boom", "Failed")
        wait_until(lambda: rabbit.list_queues(vhost)[DEAD] == (1, 0), 10, "a dead letter")
    assert rabbit.list_queues(vhost)[QUEUE] == (0, 0)
    message = events[-1]["message"]
    assert "KeyError: 'no such thing'" in message
    assert "Traceback (most recent call last)" in message
    assert "worker_runners.py" in message

    method, props, body = amqp.get(DEAD)
    assert body == b'{"job": "boom"}'
    assert props.message_id == "boom"
    headers = props.headers
    assert "KeyError" in headers["x-rbit-dead-reason"]
    assert headers["x-rbit-dead-queue"] == QUEUE
    assert headers["x-rbit-dead-worker"] == "test-worker"
    assert headers["x-rbit-attempts"] == 1
    assert headers["x-rbit-dead-time"]


def test_failed_job_is_retried_then_dead_lettered(tmp_path, rabbit, vhost, amqp, out):
    watcher = amqp.watch("rbit.status")
    config = _config(tmp_path, rabbit, vhost, out, _python("explode"), max_retries=1,
                     retry_delay=0.3)
    with running_worker(config):
        amqp.publish_jobs(["twice"], exchange="", routing_key=QUEUE)
        events = watcher.wait_for("twice", "Failed")
        wait_until(lambda: rabbit.list_queues(vhost)[DEAD] == (1, 0), 10, "a dead letter")
    assert [e["status"] for e in events] == ["Building", "Waiting", "Building", "Failed"]
    assert "next try in" in events[1]["message"]
    assert events[-1]["message"].startswith("failed after 2 tries: KeyError")
    _method, props, _body = amqp.get(DEAD)
    assert props.headers["x-rbit-attempts"] == 2


def _once(events: list[dict]) -> list[dict]:
    """The status events without their re-sends.

    The amqp sink sends again what a lost connection left unconfirmed (documented; poll
    mode ends its connection at each pass): a re-sent event is the same event, its time
    included.
    """
    first: dict[tuple, dict] = {}
    for event in events:
        first.setdefault((event["status"], event["time"]), event)
    return list(first.values())


@pytest.mark.parametrize("mode", ["consume", "poll"])
def test_blocked_job_waits_in_a_delay_queue_and_comes_back(
        tmp_path, rabbit, vhost, amqp, out, mode):
    watcher = amqp.watch("rbit.status")
    config = _config(tmp_path, rabbit, vhost, out, _python("blocked_once"), mode)
    with running_worker(config, poll_time=1):
        amqp.publish_jobs(["later"], exchange="", routing_key=QUEUE)
        events = _once(watcher.wait_for("later", "Done"))
        wait_until(lambda: rabbit.list_queues(vhost)[QUEUE] == (0, 0), 10, "the ack")
    assert [e["status"] for e in events] == ["Building", "Blocked", "Building", "Done"]
    assert "waiting for a dependency" in events[1]["message"]
    assert (out / "runs").read_text().splitlines() == ["later 1", "later 2"]
    second = json.loads((out / "later.second").read_text())
    assert second["attempt"] == 2
    assert second["headers"]["x-rbit-attempts"] == 1
    assert second["last_error"] == "waiting for a dependency"
    queues = rabbit.list_queues(vhost)
    assert queues[f"{QUEUE}.retry.1000"] == (0, 0)  # the way it went back
    assert queues[DEAD] == (0, 0)


SCRIPT = """#!/bin/sh
echo "$1" >> "$2/runs"
if [ "$1" = 1 ]; then
    echo "the licence server is busy" >&2
    exit 75
fi
"""


def test_shell_exit_75_blocks_the_job_until_a_later_try(tmp_path, rabbit, vhost, amqp, out):
    script = tmp_path / "build.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    watcher = amqp.watch("rbit.status")
    config = _config(tmp_path, rabbit, vhost, out, f"shell!{script} %ATTEMPT {{outdir}}",
                     retry_delay=0.3)
    with running_worker(config):
        amqp.publish_jobs(["tex"], exchange="", routing_key=QUEUE)
        events = _once(watcher.wait_for("tex", "Done"))
        wait_until(lambda: rabbit.list_queues(vhost)[QUEUE] == (0, 0), 10, "the ack")
    assert [e["status"] for e in events] == ["Building", "Blocked", "Building", "Done"]
    assert "the licence server is busy" in events[1]["message"]
    assert (out / "runs").read_text().split() == ["1", "2"]
