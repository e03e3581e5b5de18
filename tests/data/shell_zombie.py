"""Test helper for the shell! runner: leaves only a zombie in its process group.

Usage: shell_zombie.py PIDFILE

A helper process forks a child that exits at once and is never reaped, then moves to
a session of its own (taking nothing of the job's output with it) and sleeps. Its
``pid zombie_pid`` go to PIDFILE; the command itself then exits 0, so that the job's
process group holds nothing but the zombie.
"""

import os
import sys
import time


def is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as file:
        return file.read().rsplit(b")", 1)[1].split()[0] == b"Z"


def helper(pidfile: str) -> None:
    zombie = os.fork()
    if zombie == 0:
        os._exit(0)
    deadline = time.monotonic() + 10
    while not is_zombie(zombie) and time.monotonic() < deadline:
        time.sleep(0.01)  # the polling interval of a bounded wait
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, 65536)
    with open(pidfile + ".tmp", "w") as file:
        file.write(f"{os.getpid()} {zombie}\n")
    os.replace(pidfile + ".tmp", pidfile)
    time.sleep(60)  # the helper's life: it outlives the job, left behind in its session
    os._exit(0)


def main() -> int:
    pidfile = sys.argv[1]
    if os.fork() == 0:
        helper(pidfile)
    deadline = time.monotonic() + 10
    while not os.path.exists(pidfile) and time.monotonic() < deadline:
        time.sleep(0.01)  # the polling interval of a bounded wait
    return 0


if __name__ == "__main__":
    sys.exit(main())
