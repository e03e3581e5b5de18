"""A runner's 10 MB exception text stays bounded in every place the operator looks:
the worker's log (real ``rbit`` process), the AMQP status events and the dead letter.
"""

from __future__ import annotations

import sys

import pytest
from worker_helpers import WorkerProcess, wait_until, write_config

from rbit.status import EVENT_MESSAGE_CHARS, LOG_MESSAGE_CHARS, bounded, one_line

QUEUE = "bounds"
LOG_LINE_MAX = LOG_MESSAGE_CHARS + 300  # the message plus time, level, logger, job id
DEAD_REASON_MAX = 2000  # docs: the reason header keeps the last 2000 characters


@pytest.mark.parametrize("where", ["thread", "child"])
def test_a_huge_exception_text_is_bounded_in_log_status_and_dead_letter(
        tmp_path, rabbit, vhost, amqp, where):
    runner = {"runner": "python!bounded_output_runners:huge_error", "max_retries": 0}
    if where == "child":
        runner["python"] = sys.executable
    config = write_config(tmp_path, rabbit.url(vhost), {QUEUE: runner},
                          status={"sinks": "log, amqp"})
    watcher = amqp.watch("rbit.status", "#")
    worker = WorkerProcess(config)
    try:
        wait_until(lambda: "consuming" in worker.output, 30, "the worker to start")
        amqp.publish_jobs(["big-1"], exchange="", routing_key=QUEUE)
        events = watcher.wait_for("big-1", "Failed", timeout=60)
        dead = wait_until(lambda: amqp.get(f"{QUEUE}.dead"), 30, "the dead letter")
    finally:
        worker.signal(15)
        assert worker.wait(60) == 0
        worker.kill()

    assert all(len(event["message"]) <= EVENT_MESSAGE_CHARS for event in events)
    failed = next(event for event in events if event["status"] == "Failed")
    assert failed["message"].startswith("failed after 1 try: RuntimeError: line 0 of a")
    assert "characters cut" in failed["message"]
    reason = dead[1].headers["x-rbit-dead-reason"]
    assert len(reason) <= DEAD_REASON_MAX
    log = worker.output
    assert len(log) < 50_000, "the log holds the whole error"
    assert max(len(line) for line in log.splitlines()) <= LOG_LINE_MAX


def test_bounded_keeps_head_and_tail_and_the_exact_limit():
    text = "HEAD" + "x" * 100_000 + "TAIL"

    cut = bounded(text, 1000)

    assert len(cut) == 1000
    assert cut.startswith("HEAD")
    assert cut.endswith("TAIL")
    assert bounded("short", 1000) == "short"


def test_one_line_of_a_huge_text_is_cheap_and_cut():
    text = "word\n" * 2_000_000  # 10 MB

    line = one_line(text)

    assert len(line) == LOG_MESSAGE_CHARS
    assert "\n" not in line
    assert line.endswith("\u2026")
