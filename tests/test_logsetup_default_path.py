"""A status line under the default logging skips logging's machinery, and only then.

``rbit.logsetup.emit_default`` writes the line straight into the batching handler's
buffer when the logging configuration is the one ``rbit CONFIG`` installs; anything
else sends the record down logging's own path. Which path a line took is seen from
the handler's ``format``: logging's path calls it, the direct one does not.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rbit import logsetup
from rbit import status as status_module
from rbit.observe.http import apply_logconfig
from rbit.outcome import Status
from rbit.status import log_status

ROOT = Path(__file__).resolve().parent.parent
# 2023-11-14 22:13:20 UTC and a few fractions of a second: msecs from 0 to 999.
INSTANTS = [1_700_000_000_000_000_000, 1_700_000_000_000_500_000, 1_700_000_000_999_999_999,
            1_700_000_001_250_000_000]
NOW = INSTANTS[2]


class Logging:
    """The default logging of a worker, its stderr a string, its path observed."""

    def __init__(self, stream: io.StringIO, handler: logsetup.BatchingStreamHandler) -> None:
        self.stream = stream
        self.handler = handler
        self.formatted = 0  # records that went through logging's path to our handler
        original = handler.format

        def counting(record: logging.LogRecord) -> str:
            self.formatted += 1
            return original(record)

        handler.format = counting  # on the instance: the handler's class is unchanged

    def lines(self) -> list[str]:
        self.handler.flush()
        return self.stream.getvalue().splitlines()


@pytest.fixture
def default_logging(monkeypatch):
    """Starts ``logsetup.configure(None, False)`` as the CLI calls it; all restored after.

    Called in the test itself: pytest attaches its own handlers to the root logger and
    its own ``sys.stderr`` for the test's call, which the default configuration replaces
    (they come back after).
    """
    root, status_logger, rbit_logger = (logging.getLogger(name) for name in ("", "rbit.status",
                                                                             "rbit"))
    pika = logging.getLogger("pika")
    saved = (root.handlers[:], root.level, pika.level, logging.logThreads,
             logging.logProcesses, logging.logMultiprocessing, root.filters[:])
    monkeypatch.setattr(status_module, "_now_ns", lambda: NOW)

    def start() -> Logging:
        stream = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)  # pytest's capture set its own
        root.handlers[:] = []  # pytest's: not closed by basicConfig's force
        logsetup.configure(None, debug=False)
        return Logging(stream, root.handlers[0])

    try:
        yield start
    finally:
        for handler in root.handlers:
            if isinstance(handler, logsetup.BatchingStreamHandler):
                handler.close()
        root.handlers[:], root.level = saved[0], saved[1]
        pika.setLevel(saved[2])
        logging.logThreads, logging.logProcesses, logging.logMultiprocessing = saved[3:6]
        root.filters[:] = saved[6]
        for logger in (status_logger, rbit_logger):
            logger.setLevel(logging.NOTSET)
            logger.filters[:] = []
            logger.handlers[:] = []
            logger.propagate = True
        logging.disable(logging.NOTSET)


def _reference(level: int, args: tuple, now: int, formatter: logging.Formatter) -> str:
    """The line the standard library writes for the record, made at ``now``."""
    record = logging.LogRecord("rbit.status", level, __file__, 1, "job %s %s: %s%s", args, None)
    record.created = now / 1e9
    record.msecs = (now % 1_000_000_000) // 1_000_000 + 0.0
    return formatter.format(record)


@pytest.mark.parametrize("now", INSTANTS)
def test_the_direct_line_is_the_one_logging_writes(default_logging, monkeypatch, now):
    observed = default_logging()
    monkeypatch.setattr(status_module, "_now_ns", lambda: now)
    log_status("j1", "q", Status.DONE, "")
    log_status("j1", "q", Status.FAILED, "exit 3:\n  no such\tfile")
    assert observed.formatted == 0  # both came the direct way
    logging.getLogger("rbit.status").addFilter(lambda record: True)  # logging's path now
    log_status("j1", "q", Status.DONE, "")
    log_status("j1", "q", Status.FAILED, "exit 3:\n  no such\tfile")
    assert observed.formatted == 2
    stdlib = logging.Formatter(logsetup.FORMAT)
    expected = [_reference(logging.INFO, ("j1", "q", "Done", ""), now, stdlib),
                _reference(logging.INFO, ("j1", "q", "Failed", " exit 3: no such file"), now,
                           stdlib)]
    assert observed.lines() == expected * 2


@pytest.mark.parametrize("change", [
    pytest.param(lambda f: setattr(f, "datefmt", "%d/%m %H:%M:%S"), id="datefmt"),
    pytest.param(lambda f: setattr(f, "default_msec_format", None), id="no msecs"),
    pytest.param(lambda f: setattr(f, "default_msec_format", "%s.%03d"), id="msecs with a dot"),
])
def test_the_direct_line_honours_the_formatter_s_time_settings(default_logging, change):
    observed = default_logging()
    formatter = observed.handler.formatter
    stdlib = logging.Formatter(logsetup.FORMAT)
    change(formatter)
    change(stdlib)
    log_status("j1", "q", Status.DONE, "")
    assert observed.formatted == 0
    assert observed.lines() == [
        _reference(logging.INFO, ("j1", "q", "Done", ""), NOW, stdlib)]


def test_lines_keep_their_order_whichever_path_each_took(default_logging):
    observed = default_logging()
    status_logger = logging.getLogger("rbit.status")
    keep = logging.Filter()  # lets every record through
    for n in range(300):
        if n % 3 == 0:
            status_logger.addFilter(keep)
        log_status(f"j{n}", "q", Status.DONE, "")
        status_logger.removeFilter(keep)
    assert observed.formatted == 100
    lines = observed.lines()
    assert [line.split(" ")[5] for line in lines] == [f"j{n}" for n in range(300)]


SWITCHES = {
    "filter on the logger": lambda: logging.getLogger("rbit.status").addFilter(
        logging.Filter()),
    "filter on a parent": lambda: logging.getLogger("rbit").addFilter(logging.Filter()),
    "filter on the root": lambda: logging.getLogger().addFilter(logging.Filter()),
    "filter on the handler": lambda: logging.getLogger().handlers[0].addFilter(
        logging.Filter()),
    "handler on a parent": lambda: logging.getLogger("rbit").addHandler(logging.NullHandler()),
    "another handler on the root": lambda: logging.getLogger().addHandler(
        logging.NullHandler()),
    "the standard formatter": lambda: logging.getLogger().handlers[0].setFormatter(
        logging.Formatter(logsetup.FORMAT)),
    "the formatter of --debug": lambda: logging.getLogger().handlers[0].setFormatter(
        logsetup.LineFormatter(logsetup.DEBUG_FORMAT)),
    "a record factory": lambda: logging.setLogRecordFactory(
        lambda *args, **kwargs: logging.LogRecord(*args, **kwargs)),
}


@pytest.mark.parametrize("switch", list(SWITCHES.values()), ids=list(SWITCHES))
def test_any_change_to_the_default_path_sends_the_line_through_logging(default_logging,
                                                                       switch):
    observed = default_logging()
    factory = logging.getLogRecordFactory()
    try:
        switch()
        log_status("j1", "q", Status.DONE, "")
    finally:
        logging.setLogRecordFactory(factory)
    assert observed.formatted == 1
    assert "job j1 q: Done" in observed.lines()[0]


def test_a_handler_added_at_run_time_gets_the_line_and_when_removed_the_direct_path_returns(
        default_logging):
    observed = default_logging()
    root = logging.getLogger()
    other = io.StringIO()
    extra = logging.StreamHandler(other)
    extra.setFormatter(logging.Formatter("%(levelname)s|%(name)s|%(message)s"))
    root.addHandler(extra)  # root.handlers changed in place
    log_status("j1", "q", Status.DONE, "")
    root.removeHandler(extra)
    log_status("j2", "q", Status.DONE, "")
    assert other.getvalue() == "INFO|rbit.status|job j1 q: Done\n"
    assert observed.formatted == 1  # j1 only
    assert [line.split(" ", 2)[2] for line in observed.lines()] == [
        "INFO rbit.status: job j1 q: Done", "INFO rbit.status: job j2 q: Done"]


def test_levels_set_at_run_time_are_obeyed_and_the_direct_path_returns(default_logging):
    observed = default_logging()
    status_logger = logging.getLogger("rbit.status")
    status_logger.setLevel(logging.WARNING)  # rbit ctl loglevel rbit.status WARNING
    log_status("hidden1", "q", Status.DONE, "")
    status_logger.setLevel(logging.NOTSET)
    logging.getLogger().handlers[0].setLevel(logging.ERROR)
    log_status("hidden2", "q", Status.DONE, "")
    logging.getLogger().handlers[0].setLevel(logging.NOTSET)
    logging.disable(logging.INFO)
    log_status("hidden3", "q", Status.DONE, "")
    logging.disable(logging.NOTSET)
    apply_logconfig({"version": 1, "incremental": True,  # POST /logconfig
                     "loggers": {"rbit.status": {"level": "DEBUG"}}})
    log_status("j1", "q", Status.BUILDING, "")  # a DEBUG line, now written
    log_status("j1", "q", Status.DONE, "")
    status_logger.setLevel(logging.NOTSET)
    log_status("j2", "q", Status.BUILDING, "")  # at DEBUG again: not written
    log_status("j2", "q", Status.DONE, "")
    assert observed.formatted == 0  # hidden2: logging's path, stopped at the level
    assert [line.split(" ", 2)[2] for line in observed.lines()] == [
        "DEBUG rbit.status: job j1 q: Building", "INFO rbit.status: job j1 q: Done",
        "INFO rbit.status: job j2 q: Done"]


def test_a_warning_through_logging_writes_the_direct_lines_before_it(default_logging):
    observed = default_logging()
    log_status("j1", "q", Status.DONE, "")
    logging.getLogger("rbit.status").warning("trouble")
    assert observed.stream.getvalue().splitlines()[0].endswith("job j1 q: Done")
    assert observed.stream.getvalue().splitlines()[1].endswith("trouble")


def test_direct_lines_are_written_by_close(default_logging):
    observed = default_logging()
    for n in range(50):
        log_status(f"j{n}", "q", Status.DONE, "")
    assert observed.stream.getvalue() == ""  # still in the buffer
    observed.handler.close()
    assert len(observed.stream.getvalue().splitlines()) == 50
    log_status("late", "q", Status.DONE, "")  # after close: written at once
    assert observed.stream.getvalue().splitlines()[-1].endswith("job late q: Done")


SCRIPT = """
import logging, sys
from rbit import logsetup
from rbit.observe.http import apply_logconfig
from rbit.outcome import Status
from rbit.status import log_status

formatted = []
original = logsetup.BatchingStreamHandler.format
def counting(self, record):
    formatted.append(record.args[0])
    return original(self, record)
logsetup.BatchingStreamHandler.format = counting

logsetup.configure(None, False)
for n in range(100):
    log_status("a%d" % n, "q", Status.DONE, "")
apply_logconfig({"version": 1,
                 "formatters": {"f": {"format": "%(levelname)s|%(name)s|%(message)s"}},
                 "handlers": {"h": {"class": "logging.StreamHandler", "formatter": "f",
                                    "stream": "ext://sys.stdout"}},
                 "root": {"level": "INFO", "handlers": ["h"]}})
log_status("b", "q", Status.DONE, "")
logsetup.configure(None, False)
for n in range(500):
    log_status("c%d" % n, "q", Status.DONE, "")
print("formatted", formatted)
"""  # ends with lines in the buffer: logging.shutdown at exit writes them


def test_a_dictconfig_at_run_time_takes_over_and_nothing_buffered_is_lost(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "INFO|rbit.status|job b q: Done\nformatted []\n"
    jobs = [line.split(" ")[5] for line in done.stderr.splitlines()]
    assert jobs == [f"a{n}" for n in range(100)] + [f"c{n}" for n in range(500)]


def test_a_filter_added_at_run_time_decides_and_once_removed_the_direct_path_returns(
        default_logging):
    observed = default_logging()
    status_logger = logging.getLogger("rbit.status")
    no_failures = logging.Filter()
    no_failures.filter = lambda record: "Failed" not in record.getMessage()
    status_logger.addFilter(no_failures)
    log_status("j1", "q", Status.FAILED, "boom")
    log_status("j2", "q", Status.DONE, "")
    status_logger.removeFilter(no_failures)
    log_status("j3", "q", Status.FAILED, "boom")
    assert observed.formatted == 1  # j2; j1 dropped by the filter, j3 direct
    assert [line.split(" ", 2)[2] for line in observed.lines()] == [
        "INFO rbit.status: job j2 q: Done", "INFO rbit.status: job j3 q: Failed boom"]
