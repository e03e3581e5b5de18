"""python! runners for the PyBit cancel tests: each job appends a JSON line to ``record``.

A line names the job, the process that ran it and what happened (``started``,
``saw-cancel``, ``gave-up``), so that the tests see which child ran a job and whether a
runner noticed its cancel.
"""

from __future__ import annotations

import json
import os
import signal
import time

#: How long a runner waits for its cancel before it gives up (a test's bound).
BOUND = 120.0


def _record(settings, message, event: str) -> None:
    line = {"job": message.job_id, "pid": os.getpid(), "event": event}
    with open(settings["record"], "a") as record:
        record.write(json.dumps(line) + "\n")


def ignore_term(message, set_status, settings):
    """Ignores SIGTERM and loops (a child's main thread): only SIGKILL ends it."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _record(settings, message, "started")
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline:
        time.sleep(0.05)  # a child that runs on until killed (bounded)
    _record(settings, message, "gave-up")


def record(message, set_status, settings):
    """Records that it ran, and where."""
    _record(settings, message, "started")


def in_child(message, set_status, settings):
    """:func:`ignore_term` for a package named ``ignore-term``, else :func:`record`."""
    if b'"ignore-term"' in message.body:
        ignore_term(message, set_status, settings)
    else:
        record(message, set_status, settings)


def until_cancelled(message, set_status, settings):
    """Works in small steps until ``message.cancelled`` is set (bounded), then returns."""
    _record(settings, message, "started")
    deadline = time.monotonic() + BOUND
    while not message.cancelled.is_set():
        if time.monotonic() > deadline:
            _record(settings, message, "gave-up")
            return
        time.sleep(0.02)  # a step of the job's work
    _record(settings, message, "saw-cancel")
