"""shell! jobs are supervised from the connection's own loop: no thread per job.

The worker starts each command on the AMQP I/O thread and settles it there when it
ends. These tests check what that must not change: the connection stays alive while
commands run, no more than ``concurrency`` commands run at once however large the
prefetch window, and every job is acked once.
"""

from __future__ import annotations

import threading

from worker_helpers import (
    run_long_job_on_one_connection,
    running_worker,
    wait_until,
    write_config,
)

QUEUE = "shelljobs"

# Records when each job's command starts and ends, one file per job id.
RECORD = (
    "shell!sh -c 'echo $(date +%s.%N) > \"$0/$RBIT_JOB_ID.start\"; sleep \"$1\"; "
    "echo $(date +%s.%N) > \"$0/$RBIT_JOB_ID.end\"' {outdir} {seconds}"
)


def _spans(out):
    spans = []
    for start in out.glob("*.start"):
        end = start.with_suffix(".end")
        spans.append((float(start.read_text()), float(end.read_text())))
    return spans


def _most_at_once(spans) -> int:
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def test_no_more_commands_at_once_than_concurrency_whatever_the_prefetch(
        tmp_path, rabbit, vhost, amqp, out):
    runner = {"runner": RECORD, "seconds": 1, "concurrency": 2, "prefetch": 6,
              "outdir": out}
    config = write_config(tmp_path, rabbit.url(vhost), {QUEUE: runner})
    with running_worker(config):
        threads_before = {t.name for t in threading.enumerate()}
        amqp.publish_jobs([f"j{n}" for n in range(6)], exchange="", routing_key=QUEUE)
        wait_until(lambda: len(list(out.glob("*.end"))) == 6, 20, "six jobs")
        wait_until(lambda: rabbit.list_queues(vhost)[QUEUE] == (0, 0), 10,
                   "every job acked")
        threads_after = {t.name for t in threading.enumerate()}
    spans = _spans(out)
    assert len(spans) == 6
    assert _most_at_once(spans) == 2, spans  # two at once, never three
    assert not any(name.startswith(QUEUE) for name in threads_before | threads_after)


def test_connection_lives_while_a_long_command_runs_and_the_job_is_acked_once(
        tmp_path, rabbit, vhost, amqp, out):
    # Heartbeat 2 s: a connection whose I/O thread stalled would be dropped within
    # about 4 s, long before the 8 s command ends.
    runner = {"runner": RECORD, "seconds": 8, "outdir": out}
    config = write_config(tmp_path, rabbit.url(vhost), {QUEUE: runner},
                          amqp={"heartbeat": 2})
    run_long_job_on_one_connection(config, rabbit, vhost, amqp, QUEUE, out / "long.start", 20)
    assert (out / "long.end").exists()
