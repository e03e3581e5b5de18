"""The runner of the cluster tests: each run of a job appends a line to a file of its own.

``outdir/<job id>`` gets ``<worker>\t<unix time>`` per run, written with one
``O_APPEND`` write, so a job run twice has two lines and a job never run has no file.
"""

from __future__ import annotations

import os
import time


def record_job(message, set_status, settings):
    """Sleeps ``sleep`` seconds, then records the run in ``outdir/<job id>``."""
    seconds = float(settings.get("sleep", 0))
    if seconds:
        time.sleep(seconds)
    line = f"{settings['worker']}\t{time.time():.3f}\n"
    path = os.path.join(settings["outdir"], message.job_id)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
