"""Run ``rbit CONFIG`` with cProfile in every thread; write a per-job summary on exit.

``python bench/profile_rbit.py OUT.txt N CONFIG``. Each thread gets its own profiler
timed by ``time.thread_time`` (CPU time of that thread), so waiting in a queue or in
``select`` costs nothing and the numbers are CPU seconds. The merged statistics are
written to ``OUT.txt`` as microseconds per job (divided by N) and to ``OUT.prof``.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import re
import sys
import threading
import time
from pathlib import Path

_profiles: list[tuple[threading.Thread, cProfile.Profile]] = []
_lock = threading.Lock()
_original_run = threading.Thread.run


def _profiled_run(self: threading.Thread) -> None:
    profile = cProfile.Profile(time.thread_time)
    with _lock:
        _profiles.append((self, profile))
    profile.enable()
    try:
        _original_run(self)
    finally:
        profile.disable()


def _summary(stats: pstats.Stats, n: int, per_thread: list[tuple[str, float]], top: int = 45) -> str:
    lines = ["cProfile (CPU time per thread), N=%d jobs; times in us per job" % n, "",
             "per thread (CPU us/job):"]
    grouped: dict[str, list[float]] = {}
    for name, seconds in per_thread:
        # one thread per job (e.g. rbit-shell-io-<pid>): one line for all of them
        grouped.setdefault(re.sub(r"-\d+$", "-<n>", name), []).append(seconds)
    for name, times in sorted(grouped.items(), key=lambda kv: -sum(kv[1])):
        count = " (%d threads)" % len(times) if len(times) > 1 else ""
        lines.append("  %8.1f  %s%s" % (sum(times) / n * 1e6, name, count))
    rows = []
    for (path, line, func), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():
        where = "%s:%d(%s)" % (_short(path), line, func) if line else func
        rows.append((cumtime, tottime, calls, where))
    for title, key in (("by cumulative time", 0), ("by own time", 1)):
        lines += ["", title + ":", "  %9s %9s %9s  %s" % ("cum us", "own us", "calls/job", "function")]
        for cumtime, tottime, calls, where in sorted(rows, key=lambda r: -r[key])[:top]:
            lines.append("  %9.2f %9.2f %9.2f  %s" % (cumtime / n * 1e6, tottime / n * 1e6,
                                                       calls / n, where))
    return "\n".join(lines) + "\n"


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def main() -> int:
    out, n, config = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    threading.Thread.run = _profiled_run  # type: ignore[method-assign]
    from rbit.cli import main as rbit_main

    main_profile = cProfile.Profile(time.thread_time)
    main_profile.enable()
    try:
        code = rbit_main([config])
    finally:
        main_profile.disable()
    stats = pstats.Stats(main_profile, stream=io.StringIO())
    per_thread = [("MainThread", _total(main_profile))]
    with _lock:
        finished = [(t, p) for t, p in _profiles if not t.is_alive()]
    for thread, profile in finished:
        stats.add(profile)
        per_thread.append((thread.name, _total(profile)))
    stats.dump_stats(str(out.with_suffix(".prof")))
    out.write_text(_summary(stats, n, sorted(per_thread, key=lambda t: -t[1])))
    return code


def _total(profile: cProfile.Profile) -> float:
    stats = pstats.Stats(profile, stream=io.StringIO())
    return sum(tottime for _cc, _nc, tottime, _ct, _callers in stats.stats.values())


if __name__ == "__main__":
    sys.exit(main())
