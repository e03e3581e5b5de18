"""python! runners for the broadcast tests (importable in workers and their children)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def describe(message, set_status, settings):
    """Return who ran the copy, and what it was: the caller gets it back."""
    Path(settings["outdir"], f"{settings['tag']}-{message.job_id}").touch()
    return {"tag": settings["tag"], "pid": os.getpid(), "body": message.text(),
            "broadcast": message.broadcast}


def unserialisable(message, set_status, settings):
    """Return something JSON cannot carry."""
    return {"when": object()}


def failing(message, set_status, settings):
    raise RuntimeError(f"no luck on {settings['tag']}")


def slow(message, set_status, settings):
    """Mark the start, then run well past any test's timeout."""
    Path(settings["outdir"], f"started-{settings['tag']}").touch()
    time.sleep(120)  # the job's work: longer than any test waits
