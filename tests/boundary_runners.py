"""Runners for the message-boundary tests: each try leaves one line in a record file.

A line is ``run<TAB>job id<TAB>attempt``, written with one ``write`` on an
``O_APPEND`` file. A job whose body starts with ``fail`` raises after recording.
"""

from __future__ import annotations

import os


def record_or_fail(message, set_status, settings):
    line = f"run\t{message.job_id}\t{message.attempt}\n"
    fd = os.open(settings["record"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    if message.body.startswith(b"fail"):
        raise RuntimeError("failing as asked")
