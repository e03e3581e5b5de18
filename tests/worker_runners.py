"""Runner callables for the end-to-end worker tests.

Each writes what it saw into the directory named by its section's ``outdir`` key, so
that a test (or a test driving a worker process) can read it back. Files are written
whole and renamed into place: a test never reads half a record.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rbit import Blocked


def _write(settings, name: str, data) -> None:
    path = Path(settings["outdir"]) / name
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _append(settings, name: str, line: str) -> None:
    with open(Path(settings["outdir"]) / name, "a") as stream:
        stream.write(line + "\n")


def record_pybit(message, set_status, settings):
    """Decodes a PyBit BuildRequest and records what it says."""
    request = message.decode()
    _write(settings, f"{message.job_id}.json", {
        "job_id": message.job_id,
        "queue": message.queue,
        "package": request.get_package(),
        "version": request.get_version(),
        "dist": request.get_dist(),
        "arch": request.get_arch(),
        "suite": request.get_suite(),
        "format": request.get_format(),
        "uri": request.transport.uri,
        "redelivered": message.redelivered,
    })


def count_and_sleep(message, set_status, settings):
    """Counts its runs in ``runs``, then sleeps ``seconds``."""
    _append(settings, "runs", message.job_id)
    time.sleep(float(settings["seconds"]))  # the job's work


def record_times(message, set_status, settings):
    """Sleeps ``seconds`` and records when it started and ended."""
    start = time.time()
    time.sleep(float(settings["seconds"]))  # the job's work
    _write(settings, f"{message.job_id}.times", {"start": start, "end": time.time()})


def wait_for_release(message, set_status, settings):
    """Marks itself started, then waits (bounded) until the test creates ``release``."""
    _write(settings, f"{message.job_id}.started", {})
    release = Path(settings["outdir"]) / "release"
    deadline = time.monotonic() + 30
    while not release.exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the test never released the job")
        time.sleep(0.02)  # the polling interval of a bounded wait
    _write(settings, f"{message.job_id}.done", {})


def succeed(message, set_status, settings):
    _append(settings, "runs", message.job_id)


def explode(message, set_status, settings):
    raise KeyError("no such thing")


def bad_status(message, set_status, settings):
    set_status("Exploded", "no such status")


def blocked_once(message, set_status, settings):
    """Blocked on the first try (1 s), done on the next, recording its headers."""
    _append(settings, "runs", f"{message.job_id} {message.attempt}")
    if message.attempt == 1:
        raise Blocked("waiting for a dependency", delay=1)
    headers = {k: v if isinstance(v, (int, str)) else str(v)
               for k, v in message.headers.items()}
    _write(settings, f"{message.job_id}.second", {
        "attempt": message.attempt, "headers": headers, "last_error": message.last_error})


def sleep_then_finish(message, set_status, settings):
    """Marks itself started, sleeps ``seconds``, then writes ``finished``."""
    _append(settings, "started", message.job_id)
    time.sleep(float(settings["seconds"]))  # the job's work
    _write(settings, f"{message.job_id}.finished", "finished")


def upload(message, set_status, settings):
    set_status("Done", "built")
    set_status("Uploaded", "copied to the archive")


def two_steps(message, set_status, settings):
    """Reports two numbered progress statuses, then returns (Done)."""
    set_status("Building", "step 1")
    set_status("Building", "step 2")


def say_body_then_wait(message, set_status, settings):
    """Reports its body as a Building status, then waits (bounded) for ``release``."""
    set_status("Building", message.body.decode("utf-8", "replace"))
    wait_for_release(message, set_status, settings)
