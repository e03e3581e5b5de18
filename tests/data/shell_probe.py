"""Test helper for the shell! runner: records what the command received.

Usage: shell_probe.py REPORT [ARG...]

Writes REPORT as JSON: argv, stdin, the RBIT_* and PROBE_* environment variables, the
body file's content and mode, its directory's mode, the working directory and the open
file descriptors above 2. When the body (stdin) is a JSON object it
then plays a job: ``status`` lines go to RBIT_STATUS_FD, ``stderr`` to stderr, and
``exit`` is the exit status.
"""

import json
import os
import stat
import sys


def open_fds() -> list[int]:
    fds = []
    for fd in range(3, 1024):
        try:
            os.fstat(fd)
        except OSError:
            continue
        fds.append(fd)
    return fds


def record(report: str, stdin: bytes, fds: list[int]) -> None:
    body_file = os.environ.get("RBIT_BODY_FILE", "")
    data = {
        "argv": sys.argv,
        "stdin": stdin.decode("utf-8", "replace"),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("RBIT_", "PROBE_"))},
        "cwd": os.getcwd(),
        "fds": fds,
    }
    if body_file and os.path.exists(body_file):
        with open(body_file, "rb") as file:
            data["body_file"] = file.read().decode("utf-8", "replace")
        data["body_mode"] = stat.S_IMODE(os.stat(body_file).st_mode)
        data["body_dir_mode"] = stat.S_IMODE(os.stat(os.path.dirname(body_file)).st_mode)
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
    fds = open_fds()
    stdin = sys.stdin.buffer.read()
    record(sys.argv[1], stdin, fds)
    return play(stdin)


if __name__ == "__main__":
    sys.exit(main())
