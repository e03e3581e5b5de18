"""A runner for the watch and listen tests: each run leaves one JSON file per job id.

Also the workers' config (:func:`worker_config`), which both tests share.

The file holds the body, the ``x-schedule-file`` header and, for a watched file, its
size when the job ran (a job fired before its file was complete would see less). A
second run of the same job id leaves a ``.again`` file beside the first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def record(message, set_status, settings) -> None:
    """Write ``<out>/<job id>`` (``<job id>.again.<random>`` when it exists already)."""
    out = Path(settings["out"])
    path = (message.headers or {}).get("x-schedule-file")
    if isinstance(path, bytes):
        path = path.decode("utf-8")
    size = os.path.getsize(path) if path and os.path.exists(path) else None
    data = json.dumps({"body": message.body.decode("utf-8", "replace"), "file": path,
                       "size": size}).encode()
    # Written aside, then linked in: a reader never sees a half-written record.
    temporary = out / f".{message.job_id}.{os.urandom(4).hex()}"
    temporary.write_bytes(data)
    try:
        os.link(temporary, out / message.job_id)
    except FileExistsError:
        os.link(temporary, out / f"{message.job_id}.again.{os.urandom(4).hex()}")
    os.unlink(temporary)


def worker_config(tmp_path: Path, url: str, out: Path, queue: str, schedule: str,
                  trigger: str) -> Path:
    """``tmp_path/worker.ini``: a worker running :func:`record` for ``queue``, with the
    schedule ``[schedule:<schedule>]`` firing into it on ``trigger`` (its lines)."""
    path = tmp_path / "worker.ini"
    path.write_text(f"""
[rbit]
name = {schedule}-worker
polling_time = 1
shutdown_grace = 10
state_dir = {tmp_path / "state"}

[amqp]
url = {url}
connect_timeout = 2

[runner:{queue}]
runner = python!local_schedule_runners:record
routing_key = {queue}
concurrency = 4
out = {out}

[schedule:{schedule}]
queue = {queue}
{trigger}
""")
    return path
