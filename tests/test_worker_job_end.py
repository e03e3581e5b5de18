"""How a job ends, whatever its runner does: real node, in-process worker.

An in-thread runner raising ``BaseException`` (``KeyboardInterrupt``, ``SystemExit``)
fails its job and leaves its worker thread serving; a status reported after a job was
settled is dropped, so a watcher never sees one after the final status.
"""

from __future__ import annotations

import json

import pytest
from worker_helpers import running_worker, wait_until, write_config

QUEUE = "jobends"


def _config(tmp_path, rabbit, vhost, out, func):
    runner = {"runner": f"python!end_runners:{func}", "outdir": out, "max_retries": 0}
    return write_config(tmp_path, rabbit.url(vhost), {QUEUE: runner},
                        status={"sinks": "log, amqp"})


@pytest.mark.parametrize("kind", ["keyboard", "exit", "base"])
def test_base_exception_in_a_thread_runner_fails_the_job_and_the_next_job_runs(
        tmp_path, rabbit, vhost, amqp, out, kind):
    watcher = amqp.watch("rbit.status", "#")
    with running_worker(_config(tmp_path, rabbit, vhost, out, "raise_base")):
        amqp.publish(json.dumps({"raise": kind}).encode(), exchange="", routing_key=QUEUE,
                     message_id="bad")
        events = watcher.wait_for("bad", "Failed")
        amqp.publish(b"{}", exchange="", routing_key=QUEUE, message_id="next")
        wait_until((out / "next.done").exists, 15, "the next job on the same thread")
        watcher.wait_for("next", "Done")
        wait_until(lambda: rabbit.list_queues(vhost)[QUEUE] == (0, 0), 10, "both settled")

    name = {"keyboard": "KeyboardInterrupt", "exit": "SystemExit",
            "base": "BaseException"}[kind]
    assert f"failed after 1 try: {name}" in events[-1]["message"]
    assert rabbit.list_queues(vhost)[f"{QUEUE}.dead"] == (1, 0)  # no retries: dead letter


def test_status_set_after_the_job_was_settled_is_not_published(
        tmp_path, rabbit, vhost, amqp, out):
    watcher = amqp.watch("rbit.status", "#")
    with running_worker(_config(tmp_path, rabbit, vhost, out, "late_status")):
        amqp.publish(b"{}", exchange="", routing_key=QUEUE, message_id="early")
        watcher.wait_for("early", "Done")
        (out / "early.settled").touch()  # the runner's thread reports only now
        wait_until((out / "early.late").exists, 10, "the late set_status call")
        # A later job's Done is reported after the late call: once it is seen, the late
        # status would have been seen too.
        amqp.publish(b"{}", exchange="", routing_key=QUEUE, message_id="later")
        watcher.wait_for("later", "Done")

    assert [e["status"] for e in watcher.for_job("early")] == ["Building", "Done"]
