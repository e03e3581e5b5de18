"""python! runners that test how child processes are stopped (run in a child)."""

import os
import signal
import time
from pathlib import Path


def ignore_sigterm(message, set_status, settings):
    """Ignores SIGTERM, says so in ``pid_file``, then sleeps."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(settings["pid_file"]).write_text(str(os.getpid()))
    time.sleep(3600)  # the job's work: until it is killed


def kill_self(message, set_status, settings):
    os.kill(os.getpid(), signal.SIGKILL)
