"""Job functions for the throughput benchmark: they do nothing but count.

Every contender's "work" calls :func:`tick`, which tells the benchmark when the first
and the N-th job ran, from inside the worker process, at the cost of one counter
increment per job. The environment set by ``bench/throughput.py`` drives it:

* ``BENCH_N``: the job count that means "done".
* ``BENCH_DIR``: where to write ``first`` (``pid time``), ``done`` (``time``) and
  ``progress`` (one ``count time vmrss_kb`` line per mark).
* ``BENCH_MARKS``: comma-separated counts at which to record the worker's VmRSS.

At the first and the N-th job it also writes ``threads-first`` and ``threads-done``:
the CPU seconds of each Python thread of the worker (``name seconds`` lines), which
the kernel cannot name by itself.

``noop`` is an rbit ``python!`` runner: ``runner = python!bench.bench_runners:noop``.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

_N = int(os.environ.get("BENCH_N", "0"))
# Unset outside the benchmark (a test running these jobs, say): no files are written.
_DIR = Path(os.environ["BENCH_DIR"]) if os.environ.get("BENCH_DIR") else None
_MARKS = frozenset(int(m) for m in os.environ.get("BENCH_MARKS", "").split(",") if m)
# next() on itertools.count is atomic under the GIL: safe from several worker threads.
_counter = itertools.count(1)


def _write(name: str, text: str) -> None:
    if _DIR is None:
        return
    # Write then rename, so the benchmark never reads a half-written file.
    tmp = _DIR / (name + ".tmp")
    tmp.write_text(text)
    tmp.rename(_DIR / name)


def _vmrss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _thread_cpu() -> str:
    lines = []
    for thread in threading.enumerate():
        try:
            stat = Path("/proc/self/task/%d/stat" % thread.native_id).read_text()
        except (OSError, TypeError):
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        lines.append("%s\t%.6f\n" % (thread.name, seconds))
    return "".join(lines)


def tick(count: int | None = None) -> bool:
    """Count one finished job; True when it was the N-th."""
    if count is None:
        count = next(_counter)
    if count == 1:
        _write("threads-first", _thread_cpu())
        _write("first", "%d %.6f\n" % (os.getpid(), time.time()))
    if count in _MARKS and _DIR is not None:
        with open(_DIR / "progress", "a") as out:
            out.write("%d %.6f %d\n" % (count, time.time(), _vmrss_kb()))
    if count == _N:
        _write("threads-done", _thread_cpu())
        _write("done", "%.6f\n" % time.time())
        return True
    return False


def noop(message, set_status, settings) -> None:
    """Rbit ``python!`` runner: count the job and return (Done)."""
    tick()


#: Loop turns of :func:`cpu20`: about 20 ms of pure-Python CPU on the 2-core
#: benchmark machine when it is otherwise idle.
CPU20_TURNS = 300_000


def cpu20(message, set_status, settings) -> None:
    """An rbit ``python!`` runner: ~20 ms of pure-Python CPU (holds the GIL), then count."""
    total = 0
    for turn in range(CPU20_TURNS):
        total += turn * turn
    tick(_shared_count())


_shared: list[int] = []


def _shared_count() -> int:
    """A job count shared by a worker's processes (each child has its own module copy).

    One byte is appended per job; this process's offset after its own append is that
    job's number.
    """
    if not _shared:
        _shared.append(os.open(_DIR / "count", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    os.write(_shared[0], b"x")
    return os.lseek(_shared[0], 0, os.SEEK_CUR)
