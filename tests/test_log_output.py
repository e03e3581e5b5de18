"""The worker's log: batched lines, none lost or reordered, the operator's config obeyed."""

from __future__ import annotations

import io
import logging
import re
import signal
import sys
import threading

import pytest
from worker_helpers import Amqp, WorkerProcess, wait_until, write_config

from rbit import logsetup
from rbit.cli import ExitCode
from rbit.logsetup import BatchingStreamHandler, LineFormatter
from rbit.outcome import Status
from rbit.status import log_status

QUEUE = "logged"
JOBS = 2000
STEPS = ["Building step 1", "Building step 2", "Done"]


def _record(msg: str, level: int = logging.INFO, created: float | None = None) -> logging.LogRecord:
    record = logging.LogRecord("rbit.test", level, __file__, 1, msg, None, None)
    if created is not None:
        record.created = created
        record.msecs = (created - int(created)) * 1000
    return record


def test_buffered_lines_from_many_threads_are_all_written_in_their_order():
    stream = io.StringIO()
    handler = BatchingStreamHandler(stream, delay=3600, max_lines=10**6)

    def log_lines(thread: int) -> None:
        for n in range(500):
            handler.handle(_record(f"t{thread} {n}"))

    threads = [threading.Thread(target=log_lines, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stream.getvalue() == ""  # all waiting for one write
    handler.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2000
    for thread in range(4):
        assert [line for line in lines if line.startswith(f"t{thread} ")] == [
            f"t{thread} {n}" for n in range(500)]


def test_a_warning_is_written_at_once_after_the_lines_before_it():
    stream = io.StringIO()
    handler = BatchingStreamHandler(stream, delay=3600)
    handler.handle(_record("first"))
    handler.handle(_record("trouble", logging.WARNING))
    assert stream.getvalue() == "first\ntrouble\n"
    handler.close()


def test_buffered_lines_are_written_after_the_delay():
    stream = io.StringIO()
    handler = BatchingStreamHandler(stream, delay=0.01)
    handler.handle(_record("soon"))
    wait_until(lambda: stream.getvalue() == "soon\n", 5, "the line to be written")
    handler.close()


@pytest.mark.parametrize("created", [0.0, 1_700_000_000.0005, 1_700_000_000.999, 1_700_000_001.25])
def test_line_formatter_writes_what_the_default_formatter_writes(created):
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    ours, theirs = LineFormatter(fmt), logging.Formatter(fmt)
    for when in (created, created + 0.5, created + 1.0):
        record = _record("x", created=when)
        assert ours.format(record) == theirs.format(record)


def test_status_lines_keep_their_format_and_levels(caplog):
    caplog.set_level(logging.DEBUG, logger="rbit.status")
    log_status("j1", "q", Status.BUILDING, "")
    log_status("j1", "q", Status.BUILDING, "chapter\n  3")
    log_status("j1", "q", Status.DONE, "")
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("rbit.status", logging.DEBUG, "job j1 q: Building"),
        ("rbit.status", logging.INFO, "job j1 q: Building chapter 3"),
        ("rbit.status", logging.INFO, "job j1 q: Done"),
    ]


def test_no_status_line_is_lost_or_reordered_when_the_worker_stops(tmp_path, rabbit, vhost):
    runner = {"runner": "python!worker_runners:two_steps", "concurrency": 3, "prefetch": 100}
    config = write_config(tmp_path, rabbit.url(vhost), {QUEUE: runner})
    amqp = Amqp(rabbit.url(vhost))
    worker = WorkerProcess(config)
    try:
        wait_until(lambda: QUEUE in rabbit.list_queues(vhost), 20, "the worker's queue")
        amqp.publish_jobs([f"job{n}" for n in range(JOBS)], exchange="", routing_key=QUEUE)
        wait_until(lambda: rabbit.list_queues(vhost)[QUEUE] == (0, 0), 120, "every job acked")
        worker.signal(signal.SIGTERM)  # at once: the last lines may still be buffered
        assert worker.wait(timeout=30) == ExitCode.OK, worker.output[-2000:]
    finally:
        amqp.close()
        worker.kill()
    lines = worker.output.splitlines()
    per_job: dict[str, list[str]] = {}
    status_line = re.compile(r"^\S+ \S+ INFO rbit\.status: job (\S+) " + QUEUE + r": (.*)$")
    for line in lines:
        match = status_line.match(line)
        if match:
            per_job.setdefault(match[1], []).append(match[2])
    assert len(per_job) == JOBS
    wrong = {job: seen for job, seen in per_job.items() if seen != STEPS}
    assert not wrong, list(wrong.items())[:5]
    assert lines[-1].endswith("INFO rbit: stopped"), lines[-3:]


def test_the_operators_logging_sections_still_decide_where_lines_go(tmp_path, rabbit, vhost):
    logfile = tmp_path / "status.log"
    runner = {"runner": "python!worker_runners:two_steps"}
    config = write_config(tmp_path, rabbit.url(vhost), {QUEUE: runner})
    config.write_text(config.read_text() + f"""
[loggers]
keys = root

[handlers]
keys = file

[formatters]
keys = plain

[logger_root]
level = INFO
handlers = file

[handler_file]
class = FileHandler
formatter = plain
args = ({str(logfile)!r},)

[formatter_plain]
format = %(levelname)s|%(name)s|%(message)s
""")
    amqp = Amqp(rabbit.url(vhost))
    worker = WorkerProcess(config)
    try:
        wait_until(lambda: QUEUE in rabbit.list_queues(vhost), 20, "the worker's queue")
        amqp.publish_jobs(["one"], exchange="", routing_key=QUEUE)
        wait_until(lambda: logfile.exists() and "job one" in logfile.read_text(), 20,
                   "the status lines in the operator's file")
        worker.signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == ExitCode.OK, worker.output
    finally:
        amqp.close()
        worker.kill()
    text = logfile.read_text()
    assert "INFO|rbit.status|job one logged: Building step 1\n" in text
    assert "INFO|rbit.status|job one logged: Done\n" in text
    assert "rbit.status" not in worker.output  # nothing went to the default handler


def test_line_formatter_adds_a_traceback_as_the_default_formatter_does():
    fmt = "%(levelname)s %(message)s"
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", None,
                                   sys.exc_info())
    assert LineFormatter(fmt).format(record) == logging.Formatter(fmt).format(record)


@pytest.mark.parametrize("gathered", [True, False], ids=["names", "no names"])
def test_a_status_record_has_what_a_logging_record_has(caplog, monkeypatch, gathered):
    # rbit.logsetup turns the thread and process names off when its format omits them.
    for switch in ("logThreads", "logProcesses", "logMultiprocessing"):
        monkeypatch.setattr(logging, switch, gathered)
    caplog.set_level(logging.INFO, logger="rbit.status")
    log_status("j2", "q", Status.FAILED, "no")
    ours = caplog.records[-1]
    theirs = logging.getLogger("rbit.status").makeRecord(
        "rbit.status", logging.INFO, ours.pathname, ours.lineno, ours.msg, ours.args, None,
        ours.funcName)
    varying = {"created", "msecs", "relativeCreated", "message", "asctime"}  # + formatting
    assert set(vars(ours)) - varying == set(vars(theirs)) - varying
    assert {k: v for k, v in vars(ours).items() if k not in varying} == {
        k: v for k, v in vars(theirs).items() if k not in varying}
    assert abs(ours.created - theirs.created) < 5
    assert abs(ours.msecs - (ours.created % 1) * 1000) < 1
    assert abs(ours.relativeCreated - theirs.relativeCreated) < 5000


def test_a_record_factory_set_by_the_operator_makes_the_status_records(caplog):
    class Tagged(logging.LogRecord):
        tag = "mine"

    caplog.set_level(logging.INFO, logger="rbit.status")
    previous = logging.getLogRecordFactory()
    logging.setLogRecordFactory(Tagged)
    try:
        log_status("j3", "q", Status.DONE, "")
    finally:
        logging.setLogRecordFactory(previous)
    assert type(caplog.records[-1]) is Tagged
    assert caplog.records[-1].getMessage() == "job j3 q: Done"


def test_records_gather_thread_and_process_names_only_when_the_format_shows_them():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.logThreads, logging.logProcesses,
             logging.logMultiprocessing)
    try:
        logsetup.configure(None, debug=False)  # the default format names neither
        plain = _record("x")
        logsetup.configure(None, debug=True)  # the debug format names the thread
        debug = _record("x")
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level = saved[0], saved[1]
        logging.logThreads, logging.logProcesses, logging.logMultiprocessing = saved[2:]
    assert plain.threadName is None
    assert plain.processName is None
    assert plain.process is None
    assert debug.threadName == threading.current_thread().name
