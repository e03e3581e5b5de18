"""Test helper for the shell! runner: records what the command received.

Usage: shell_probe.py REPORT [ARG...]

Writes REPORT as JSON: argv, stdin, the RBIT_* environment variables, the body file's
content and mode, and the working directory. When the body (stdin) is a JSON object it
then plays a job: ``status`` lines go to RBIT_STATUS_FD, ``stderr`` to stderr, and
``exit`` is the exit status.
"""

import json
import os
import stat
import sys


def record(report: str, stdin: bytes) -> None:
    body_file = os.environ.get("RBIT_BODY_FILE", "")
    data = {
        "argv": sys.argv,
        "stdin": stdin.decode("utf-8", "replace"),
        "env": {k: v for k, v in os.environ.items() if k.startswith("RBIT_")},
        "cwd": os.getcwd(),
    }
    if body_file and os.path.exists(body_file):
        with open(body_file, "rb") as file:
            data["body_file"] = file.read().decode("utf-8", "replace")
        data["body_mode"] = stat.S_IMODE(os.stat(body_file).st_mode)
    with open(report + ".tmp", "w") as file:
        json.dump(data, file)
    os.replace(report + ".tmp", report)


def play(stdin: bytes) -> int:
    try:
        job = json.loads(stdin)
    except ValueError:
        return 0
    if not isinstance(job, dict):
        return 0
    for line in job.get("status", []):
        os.write(int(os.environ["RBIT_STATUS_FD"]), (line + "\n").encode())
    sys.stderr.write(job.get("stderr", ""))
    return int(job.get("exit", 0))


def main() -> int:
    stdin = sys.stdin.buffer.read()
    record(sys.argv[1], stdin)
    return play(stdin)


if __name__ == "__main__":
    sys.exit(main())
