"""Runners for the fault tests: each run leaves one line in a record file.

The file named by the section's ``record`` setting is opened with ``O_APPEND`` and
written with one ``write`` per line, so lines from several threads or processes never
interleave and a SIGKILL never leaves half a line behind: a line is there if and only if
the job's effect happened. A line is ``event<TAB>job id<TAB>attempt<TAB>redelivered<TAB>
last error``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from rbit.errors import Reject


def _write(settings, event: str, message) -> None:
    last = (message.last_error or "").splitlines()[0] if message.last_error else ""
    line = f"{event}\t{message.job_id}\t{message.attempt}\t{int(message.redelivered)}\t{last}\n"
    fd = os.open(settings["record"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _pause(settings) -> None:
    """Sleeps ``sleep`` seconds, or waits (up to 120 s) for the file ``gate``."""
    if "gate" in settings:
        _wait_for(Path(settings["gate"]))
        return
    seconds = float(settings.get("sleep", 0))
    if seconds:
        time.sleep(seconds)  # the job's work


def _wait_for(gate: Path) -> None:
    deadline = time.monotonic() + 120
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a file the test creates


def record(message, set_status, settings):
    """Does the job: sleeps ``sleep`` seconds, then records ``done``."""
    _pause(settings)
    _write(settings, "done", message)


def long_job(message, set_status, settings):
    """Records ``start``, sleeps ``sleep`` seconds (or waits for ``gate``), records
    ``end``."""
    _write(settings, "start", message)
    _pause(settings)
    _write(settings, "end", message)


def poison(message, set_status, settings):
    """Jobs whose id starts with ``poison`` always raise; the others are recorded."""
    if message.job_id.startswith("poison"):
        _write(settings, "poisoned", message)
        raise RuntimeError(f"cannot digest {message.job_id}")
    record(message, set_status, settings)


def fail_first(message, set_status, settings):
    """The first try of every job fails; later tries are recorded."""
    if message.attempt == 1:
        _write(settings, "failed", message)
        raise RuntimeError("first try always fails")
    record(message, set_status, settings)


def gated(message, set_status, settings):
    """Records ``start``, waits for the ``gate`` file, then fails a first try (a retry
    must be republished) or records ``done``. With ``first_try = reject`` every try is
    rejected instead (a dead-letter copy must be published)."""
    _write(settings, "start", message)
    _wait_for(Path(settings["gate"]))
    if settings.get("first_try") == "reject":
        _write(settings, "failed", message)
        raise Reject("rejected at the gate")
    if message.attempt == 1:
        _write(settings, "failed", message)
        raise RuntimeError("first try always fails")
    _write(settings, "done", message)


def decode_body(message, set_status, settings):
    """Decodes the body (a DecodeError escapes for garbage), then records ``done``."""
    message.decode()
    _write(settings, "done", message)


def reject_unless_replayed(message, set_status, settings):
    """Rejects a job until it was replayed from the dead letters."""
    if "x-rbit-replayed" not in message.headers:
        _write(settings, "rejected", message)
        raise Reject("not yet")
    _write(settings, "done", message)


def kill_worker(message, set_status, settings):
    """Kills the whole worker process (SIGKILL) for the job named ``kill_id``."""
    if message.job_id == settings["kill_id"]:
        _write(settings, "killing", message)
        os.kill(os.getpid(), signal.SIGKILL)
    record(message, set_status, settings)


def sleep_long(message, set_status, settings):
    """Sleeps far beyond any timeout the tests set."""
    _write(settings, "start", message)
    time.sleep(600)  # the job's work: longer than any timeout


def slow_when_redelivered(message, set_status, settings):
    """Like :func:`long_job`, but sleeps ``sleep_redelivered`` on a redelivery."""
    _write(settings, "start", message)
    key = "sleep_redelivered" if message.redelivered else "sleep"
    time.sleep(float(settings[key]))  # the job's work
    _write(settings, "end", message)


def gated_each(message, set_status, settings):
    """Like :func:`gated`, with one gate per job: the file ``<gate>/<job id>``; with
    ``first_try = pass`` every try is ``done``."""
    _write(settings, "start", message)
    _wait_for(Path(settings["gate"]) / message.job_id)
    if settings.get("first_try") == "reject":
        _write(settings, "failed", message)
        raise Reject("rejected at the gate")
    if message.attempt == 1 and settings.get("first_try") != "pass":
        _write(settings, "failed", message)
        raise RuntimeError("first try always fails")
    _write(settings, "done", message)
