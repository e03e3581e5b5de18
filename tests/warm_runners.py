"""python! runners for the warm-children tests: each job says which child ran it.

A job's body is JSON: ``{"action": ..., ...}``. Every job first appends one JSON line
to the file named by the section's ``record`` key: its id, the child's pid, how many
jobs this child has run (a module global) and the ``mark`` a previous job left in
another module global.
"""

from __future__ import annotations

import json
import os
import signal
import time

_state = {"jobs": 0, "mark": None}
_ballast: list[bytes] = []


def job(message, set_status, settings):
    request = json.loads(message.body or b"{}")
    action = request.get("action", "record")
    _state["jobs"] += 1
    if action == "set":
        _state["mark"] = request["mark"]
    line = {"job": message.job_id, "pid": os.getpid(), "jobs": _state["jobs"],
            "mark": _state["mark"], "at": time.time(), "action": action}
    with open(settings["record"], "a") as record:
        record.write(json.dumps(line) + "\n")
    if action == "hang":
        time.sleep(3600)  # a job that hangs until it is killed
    elif action == "sleep":
        time.sleep(float(request["seconds"]))  # the job's work
        with open(settings["record"], "a") as record:
            record.write(json.dumps({"job": message.job_id, "finished": True}) + "\n")
    elif action == "grow":
        _ballast.append(b"x" * int(request["bytes"]))
    elif action == "exit":
        os._exit(4)
    elif action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
