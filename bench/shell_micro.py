"""Micro-benchmark of the ``shell!`` runner: ``ShellRunner.run`` against ``subprocess.run``.

No broker is involved: each contender runs ``/bin/true`` N times in a loop in this
process, one job at a time, and we report per job

* wall: elapsed time;
* cpu: this process's CPU (``time.process_time``, every thread) plus the CPU of the
  reaped children (``os.times``), i.e. the cost of spawning included;
* parent: this process's CPU alone, which is what a worker's CPU per job measures in
  ``bench/throughput.py`` (the children's exec of ``/bin/true`` is the same for all);
* ratio: the reference's wall (or cpu, parent) divided by the contender's, so 1.0x
  means as fast as a bare ``subprocess.run(["/bin/true"])`` loop.

Rounds are interleaved (each round runs every contender once) and the medians are
printed; on a shared machine the cpu figures are the steadier ones. As in a
deployment, logging goes to a file at INFO (``--log-level`` changes it).

Run from the repository root::

    python bench/shell_micro.py                  # N=2000, 3 rounds
    python bench/shell_micro.py --ref HEAD~1     # also rbit's shell.py as of a commit
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rbit.config import RunnerSettings  # noqa: E402
from rbit.message import Message  # noqa: E402

COMMAND = "/bin/true"


def _settings() -> RunnerSettings:
    return RunnerSettings(
        queue="bench", runner="shell!" + COMMAND, kind="shell", target=COMMAND,
        routing_key="bench", timeout=60, settings={},
    )


def _shell_module(ref: str | None):
    """rbit.runners.shell, or its text at git ``ref`` loaded under another name."""
    if ref is None:
        from rbit.runners import shell
        return shell
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:rbit/runners/shell.py"],
                            check=True, capture_output=True).stdout
    path = Path(tempfile.mkdtemp(prefix="rbit-micro-")) / "shell_at_ref.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location(f"rbit.runners.shell_at_{len(ref)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _raw_loop(n: int) -> None:
    for _ in range(n):
        subprocess.run([COMMAND], check=True)


def _rbit_loop(module) -> Callable[[int], None]:
    def loop(n: int) -> None:
        runner = module.ShellRunner(_settings())
        body = b'{"job": "' + b"x" * 180 + b'"}'  # ~200 bytes, as in the throughput bench
        for i in range(n):
            outcome = runner.run(Message(body=body, queue="bench", message_id=f"job-{i}"),
                                 lambda status, message="": None)
            assert outcome.kind.value == "done", outcome
        close = getattr(runner, "close", None)
        if close is not None:
            close()
    return loop


def _measure(loop: Callable[[int], None], n: int) -> tuple[float, float, float]:
    """Runs ``loop(n)``; returns (wall, cpu, parent cpu) in microseconds per job."""
    t0, c0, k0 = time.perf_counter(), time.process_time(), os.times()
    loop(n)
    t1, c1, k1 = time.perf_counter(), time.process_time(), os.times()
    children = (k1.children_user - k0.children_user) + (k1.children_system - k0.children_system)
    return (t1 - t0) / n * 1e6, ((c1 - c0) + children) / n * 1e6, (c1 - c0) / n * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=2000, help="jobs per run (default 2000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ref", action="append", default=[],
                        help="also time rbit/runners/shell.py as of this git ref")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)

    log_file = tempfile.NamedTemporaryFile(prefix="rbit-micro-", suffix=".log", delete=False)
    logging.basicConfig(filename=log_file.name, level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    contenders = {"subprocess.run": _raw_loop, "rbit (worktree)": _rbit_loop(_shell_module(None))}
    for ref in args.ref:
        contenders[f"rbit @ {ref}"] = _rbit_loop(_shell_module(ref))

    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in contenders}
    _raw_loop(50)  # warm-up: page cache, first fork
    for rnd in range(args.rounds):
        for name, loop in contenders.items():
            wall, cpu, parent = _measure(loop, args.n)
            results[name].append((wall, cpu, parent))
            print(f"round {rnd + 1}: {name:20s} wall {wall:7.1f}  cpu {cpu:7.1f}  "
                  f"parent {parent:7.1f} us/job", flush=True)

    print(f"\nN={args.n}, {args.rounds} interleaved rounds, medians; load average "
          f"{os.getloadavg()[0]:.2f}; log level {args.log_level}")
    medians = {name: [statistics.median(column) for column in zip(*runs)]
               for name, runs in results.items()}
    ref = medians["subprocess.run"]
    print(f"{'contender':20s} {'wall us':>8s} {'cpu us':>8s} {'parent':>8s} "
          f"{'wall x':>7s} {'cpu x':>7s} {'parent x':>8s}")
    for name, (wall, cpu, parent) in medians.items():
        print(f"{name:20s} {wall:8.1f} {cpu:8.1f} {parent:8.1f} {ref[0] / wall:6.2f}x "
              f"{ref[1] / cpu:6.2f}x {ref[2] / parent:7.2f}x")
    os.unlink(log_file.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
