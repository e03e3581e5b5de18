"""Runners for the schedule tests: each run leaves one file named after its job id.

A second run of the same job id leaves a ``.again`` file beside the first, so a test
counts fires and doubles without reading any log.
"""

from __future__ import annotations

import os
from pathlib import Path

from rbit.schedule import RunNext


def record(message, set_status, settings) -> None:
    """Write ``<out>/<job id>`` (``<job id>.again.<pid>`` when it exists already)."""
    out = Path(settings["out"])
    try:
        fd = os.open(out / message.job_id, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        fd = os.open(out / f"{message.job_id}.again.{os.getpid()}.{os.urandom(4).hex()}",
                     os.O_CREAT | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(message.body)


def record_then_next(message, set_status, settings) -> RunNext:
    """Record the run and name the next one ``next_delay`` seconds from now."""
    record(message, set_status, settings)
    return RunNext(delay=float(settings["next_delay"]))
