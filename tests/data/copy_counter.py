"""A long job that records, as it starts, which earlier copies of itself still run.

Usage: copy_counter.py OUTDIR SECONDS

Appends to OUTDIR/seen a JSON line: the pids (from OUTDIR/pids) of earlier copies and
their grandchildren that are alive, more than zombies, at this copy's start. Then
records its own pid and that of a grandchild (``sleep``, same process group) in
OUTDIR/pids, its body file in OUTDIR/bodies, and sleeps.
"""

import json
import os
import subprocess
import sys
import time


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def main() -> None:
    out, seconds = sys.argv[1], float(sys.argv[2])
    pids_file = os.path.join(out, "pids")
    earlier = []
    if os.path.exists(pids_file):
        with open(pids_file) as file:
            earlier = [int(word) for word in file.read().split()]
    with open(os.path.join(out, "seen"), "a") as file:
        file.write(json.dumps([pid for pid in earlier if alive(pid)]) + "\n")
    grandchild = subprocess.Popen(["sleep", str(seconds)])
    with open(os.path.join(out, "bodies"), "a") as file:
        file.write(os.environ["RBIT_BODY_FILE"] + "\n")
    with open(pids_file, "a") as file:
        file.write(f"{os.getpid()} {grandchild.pid}\n")
    time.sleep(seconds)  # the job's work


if __name__ == "__main__":
    main()
