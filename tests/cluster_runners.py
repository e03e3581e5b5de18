"""The runners of the cluster tests: each run of a job appends a line to a file of its own.

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
        time.sleep(seconds)  # the job's work
    line = f"{settings['worker']}\t{time.time():.3f}\n"
    path = os.path.join(settings["outdir"], message.job_id)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def record_fire(message, set_status, settings):
    """Records the run of a schedule's fire in ``outdir/<job id>``, with its flag.

    The line is ``<worker>\\t<unix time>\\t<redelivered 0|1>``: a fire published twice
    shows as two first deliveries, a job redelivered after a node loss as one first
    delivery and a redelivery.
    """
    line = f"{settings['worker']}\t{time.time():.3f}\t{int(bool(message.redelivered))}\n"
    path = os.path.join(settings["outdir"], message.job_id)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
