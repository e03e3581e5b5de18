"""Every job metered: usage in the final amqp status event, the history and the metrics.

Real worker processes on the real broker: a ``shell!`` command whose grandchild burns
CPU, a ``python!`` runner in a warm child and one in a worker thread.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from worker_helpers import TESTS_DIR, WorkerProcess, wait_until, write_config

from rbit.control.client import CtlExit
from rbit.control.client import main as ctl_main
from rbit.fate import Settlement
from rbit.observe.metrics import JobMetrics, WorkerMetrics, WorkerSources
from rbit.outcome import Outcome, Status
from rbit.usage import Usage

pytestmark = pytest.mark.slow

SHELL, CHILD, THREAD = "metered_shell", "metered_child", "metered_thread"
BURN = str(TESTS_DIR / "usage_burn.py")


def metered_config(tmp_path: Path, url: str) -> Path:
    return write_config(tmp_path, url, {
        SHELL: {"runner": "shell!{interpreter} {script} grandchild 0.5",
                "interpreter": sys.executable, "script": BURN},
        CHILD: {"runner": "python!usage_burn:burn_in_child", "timeout": 120},
        THREAD: {"runner": "python!usage_burn:burn_in_thread"},
    }, rbit={"name": "meter"}, status={"sinks": "log, amqp"})


def ctl(config: Path, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = ctl_main([str(config), *args, "--timeout", "5"], out=out)
    return code, out.getvalue()


def final_event(watcher, job_id: str) -> dict:
    events = watcher.wait_for(job_id, "Done", timeout=90)
    return next(e for e in events if e["status"] == "Done")


def test_each_runner_kind_reports_its_jobs_usage_with_the_final_status_and_in_history(
        tmp_path, rabbit, vhost, amqp):
    config = metered_config(tmp_path, rabbit.url(vhost))
    watcher = amqp.watch("rbit.status")
    worker = WorkerProcess(config)
    try:
        wait_until(lambda: "consuming" in worker.output, 60, "the worker to consume")
        for queue, job_id, body in ((SHELL, "shell-1", b""), (CHILD, "child-1", b"0.3"),
                                    (THREAD, "thread-1", b"0.3")):
            amqp.publish(body, exchange="pybit", routing_key=queue, message_id=job_id)

        shell = final_event(watcher, "shell-1")["usage"]
        # The grandchild burnt 0.5 s; the shell's child waited for it, so it counts.
        assert shell["cpu_s"] >= 0.4, shell
        assert shell["wall_s"] >= shell["cpu_s"] * 0.9
        assert shell["max_rss_kib"] > 1000  # a Python interpreter's peak, in KiB

        child = final_event(watcher, "child-1")["usage"]
        assert 0.25 <= child["cpu_s"] < 5, child
        assert child["max_rss_kib"] > 1000

        thread = final_event(watcher, "thread-1")["usage"]
        assert 0.25 <= thread["cpu_s"] < 5, thread
        assert thread["max_rss_kib"] is None  # in-thread jobs: memory not metered
        # Only the final status carries the usage.
        assert all("usage" not in e for e in watcher.for_job("thread-1")
                   if e["status"] != "Done")

        code, text = ctl(config, "history", SHELL, "--json")
        assert code == CtlExit.OK, text
        rows = json.loads(text)["replies"][0]["history"]
        assert rows[0]["job_id"] == "shell-1"
        assert rows[0]["usage"]["cpu_s"] >= 0.4
        code, text = ctl(config, "history", THREAD)
        assert code == CtlExit.OK, text
        assert "thread-1" in text
        assert "cpu 0." in text
        assert "KiB" not in text
    finally:
        worker.kill()


def test_cpu_seconds_are_counted_by_queue_in_the_metrics():
    jobs = JobMetrics(["q"])
    for usage in (Usage(1.0, 0.25, 2048), Usage(2.0, 0.5), None):
        jobs.job_started("q")
        jobs.job_settled("q", Outcome.done().with_usage(usage),
                         Settlement(None, Status.DONE, ""), 0.0)
    sources = WorkerSources(connected=lambda: True, reconnects=lambda: 0, renewals=lambda: 0,
                            undecodable=lambda: (), backlog=lambda: 0)
    text = WorkerMetrics(jobs, sources).exposition()[0].decode()
    assert 'rbit_job_cpu_seconds_total{queue="q"} 0.75' in text
