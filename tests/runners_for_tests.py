"""Runner callables used by the tests (imported by name, as rbit imports runners)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rbit.errors import Blocked, Reject


def succeed(message, set_status, settings):
    set_status("Building", "working")
    return "ignored"


def explode(message, set_status, settings):
    raise KeyError("no such thing")


def blocked(message, set_status, settings):
    raise Blocked("disk full", 12.5)


def reject(message, set_status, settings):
    raise Reject("bad job")


def fail_by_status(message, set_status, settings):
    set_status("Failed", "could not build")


def bad_status(message, set_status, settings):
    set_status("Exploded", "no such status")


def done_then_building(message, set_status, settings):
    set_status("Failed", "first try")
    set_status("Building", "second try")


def chatty(message, set_status, settings):
    """Prints on stdout and stderr around its statuses, and echoes what it got."""
    print('noise on stdout {"outcome": "failed"}', flush=True)
    print("noise on stderr", file=sys.stderr, flush=True)
    set_status("building", "started")
    reply = {
        "body": message.body.decode(),
        "job_id": message.job_id,
        "queue": message.queue,
        "headers": dict(message.headers),
        "settings": settings,
        "decoded": message.decode(),
    }
    set_status("Uploaded", json.dumps(reply, sort_keys=True))


def fields(message, set_status, settings):
    """Reports every field of the message it got, and its settings, as one JSON status."""
    reply = {
        "body": message.body.hex(),
        "queue": message.queue,
        "headers": dict(message.headers),
        "redelivered": message.redelivered,
        "message_id": message.message_id,
        "content_type": message.content_type,
        "allowed_classes": sorted(message.allowed_classes),
        "settings": settings,
    }
    set_status("Uploaded", json.dumps(reply, sort_keys=True))


def sleep_forever(message, set_status, settings):
    """Starts a grandchild that also sleeps, writes both pids, then sleeps."""
    # The grandchild's sleep is its work: it lives until it is killed.
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    Path(settings["pid_file"]).write_text(f"{os.getpid()} {grandchild.pid}")
    set_status("Building", "sleeping")
    time.sleep(3600)  # the job's work: until it is killed


def die(message, set_status, settings):
    print("about to die", file=sys.stderr, flush=True)
    os._exit(3)


def noisy_or_die(message, set_status, settings):
    """Writes on stderr; exits without an outcome when the body is ``die``."""
    if message.body == b"die":
        die(message, set_status, settings)
    print("an earlier job's noise", file=sys.stderr, flush=True)


class BatchCollector:
    """A batch runner: settles every message done at once."""

    def __init__(self, settings, status_factory):
        self.settings = settings
        self.status_factory = status_factory

    def submit(self, message, set_status, settle):
        settle(None)

    def close(self, timeout):
        pass


def batch_function(settings, status_factory):
    return BatchCollector(settings, status_factory)


batch_function.rbit_batch = True


class NotABatch:
    def __init__(self, settings, status_factory):
        pass


not_callable = 42
