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
    python bench/shell_micro.py --ref HEAD~1     # also rbit as of a commit (own process)
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A --ref contender runs this script again, on the rbit tree as of that ref.
sys.path.insert(0, os.environ.get("RBIT_MICRO_TREE", str(ROOT)))

from rbit.config import RunnerSettings  # noqa: E402
from rbit.message import Message  # noqa: E402

COMMAND = "/bin/true"


def _settings() -> RunnerSettings:
    return RunnerSettings(
        queue="bench", runner="shell!" + COMMAND, kind="shell", target=COMMAND,
        routing_key="bench", timeout=60, settings={},
    )


def _shell_module():
    from rbit.runners import shell
    return shell


def _tree_at(ref: str) -> str:
    """A directory holding rbit/ as of git ``ref``."""
    tree = tempfile.mkdtemp(prefix="rbit-micro-")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "rbit"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
    return tree


def _ref_loop(tree: str, log_level: str) -> Callable[[int], tuple[float, float, float]]:
    """Measures rbit as of another ref in a process of its own (one rbit per process)."""
    def measure(n: int) -> tuple[float, float, float]:
        env = dict(os.environ, RBIT_MICRO_TREE=tree)
        done = subprocess.run([sys.executable, __file__, "--measure-only", "-n", str(n),
                               "--log-level", log_level],
                              env=env, check=True, capture_output=True, text=True)
        return tuple(json.loads(done.stdout.strip().splitlines()[-1]))
    return measure


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
                        help="also time rbit as of this git ref (in a process of its own)")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    log_file = tempfile.NamedTemporaryFile(prefix="rbit-micro-", suffix=".log", delete=False)
    logging.basicConfig(filename=log_file.name, level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.measure_only:
        print(json.dumps(_measure(_rbit_loop(_shell_module()), args.n)))
        os.unlink(log_file.name)
        return 0
    contenders = {"subprocess.run": _raw_loop, "rbit (worktree)": _rbit_loop(_shell_module())}
    measures = {name: functools.partial(_measure, loop) for name, loop in contenders.items()}
    for ref in args.ref:
        measures[f"rbit @ {ref}"] = _ref_loop(_tree_at(ref), args.log_level)

    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in measures}
    _raw_loop(50)  # warm-up: page cache, first fork
    for rnd in range(args.rounds):
        for name, measure in measures.items():
            wall, cpu, parent = measure(args.n)
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
