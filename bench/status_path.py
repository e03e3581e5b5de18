"""CPU time of one job's statuses with the default log sink, step by step, old and new.

``python bench/status_path.py [--n 50000] [--ref REV]`` times, on this thread
(``time.thread_time``), what a python! job pays for its two statuses (``Building`` at
DEBUG, ``Done`` at INFO) with ``[status] sinks = log`` and the worker's default logging,
stderr going to a file; once with the code of ``--ref`` (default the commit before the
log sink was reworked) set up as its CLI did, once with the working tree's. Each
measure is the best of interleaved repeats (the machine is shared: the minimum is the
least disturbed). Prints microseconds per call.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rbit import logsetup  # noqa: E402
from rbit import status as status_module  # noqa: E402
from rbit.config import StatusSettings  # noqa: E402
from rbit.dispatch import JobStatus  # noqa: E402
from rbit.outcome import Status  # noqa: E402

OLD_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _old_status_module(ref: str):
    source = subprocess.run(["git", "show", f"{ref}:rbit/status.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_status.py"
    path.write_text(source.replace('logging.getLogger(__name__)',
                                   'logging.getLogger("rbit.status")'))
    spec = importlib.util.spec_from_file_location("old_status", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_status"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _old_logging() -> None:
    logging.basicConfig(level=logging.INFO, force=True, format=OLD_FORMAT)


def _new_logging() -> None:
    logsetup.configure(None, False)


def _time(fn, n: int) -> float:
    start = time.thread_time()
    for _ in range(n):
        fn()
    return (time.thread_time() - start) / n * 1e6


def steps(reporter_cls, setup) -> dict[str, Callable[[], object]]:
    """The two statuses of a job, then the parts of the Done line, separately."""
    setup()
    reporter = reporter_cls(StatusSettings(), "w")
    status = JobStatus(reporter.report, "job-1", "q")
    logger = logging.getLogger("rbit.status")
    handler = logging.getLogger().handlers[0]
    args = ("job-1", "q", "Done", "")
    if reporter_cls.__module__ == "old_status":
        def make():
            return logger.makeRecord(logger.name, logging.INFO, "f", 1, "job %s %s: %s%s",
                                     args, None, "f")
    else:
        def make():
            return status_module._record(logging.INFO, args, time.time(), 0.0)
    record = make()
    return {
        "set_status(Building) [DEBUG, not written]": lambda: status(Status.BUILDING, ""),
        "set_status(Done) [INFO line]": lambda: status(Status.DONE, ""),
        "  part: Logger.log(INFO, ...) as a whole": lambda: logger.log(
            logging.INFO, "job %s %s: %s%s", *args),
        "  part: Logger.findCaller": logger.findCaller,
        "  part: make the LogRecord": make,
        "  part: Logger.handle (handlers, lock, emit)": lambda: logger.handle(record),
        "  part: of which Formatter.format": lambda: handler.format(record),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ref", default="ae9f52a")
    args = parser.parse_args()
    old = _old_status_module(args.ref)
    from rbit.status import StatusReporter

    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)  # noqa: SIM115
    os.dup2(log.fileno(), 2)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 - as the CLI's
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for label, cls, setup in (("old", old.StatusReporter, _old_logging),
                                  ("new", StatusReporter, _new_logging)):
            for step, fn in steps(cls, setup).items():
                value = _time(fn, args.n)
                key = (label, step)
                best[key] = min(best.get(key, value), value)
    logging.shutdown()
    names = list(dict.fromkeys(step for _label, step in best))
    out = ["us per call (best of %d rounds of %d calls)" % (args.rounds, args.n), "",
           "%-46s %8s %8s" % ("step", "old", "new")]
    for step in names:
        out.append("%-46s %8.2f %8.2f" % (step, best[("old", step)], best[("new", step)]))
    total_old = sum(v for (label, step), v in best.items() if label == "old" and "part" not in step)
    total_new = sum(v for (label, step), v in best.items() if label == "new" and "part" not in step)
    out.append("%-46s %8.2f %8.2f" % ("a job's two statuses", total_old, total_new))
    print("\n".join(out), file=sys.__stdout__)
    return 0


if __name__ == "__main__":
    sys.exit(main())
