"""Instructions and cache misses per job of the real worker, counted by cachegrind.

``bench/.venv/bin/python bench/instructions.py [--only A,B] [--n 5000] [--rbit-ref REV]``
runs each row of bench/throughput.py named (default: ``rbit-python-nostatus`` and
``rbit-python-nohistory``, the job history on and off) under
``valgrind --tool=cachegrind``, against a private RabbitMQ node, once with N jobs and
once with 3N, and prints what the N jobs between the two runs cost per job: machine
instructions, first-level instruction and data cache misses (32 KB simulated caches).
The start and the stop are the same in both runs and cancel out. ``--rbit-ref REV``
runs the rbit of commit REV instead of the working tree (as bench/throughput.py does).

These are counts, not seconds: they repeat whatever else the machine does, so a
difference of 1% between two rows shows in one run, where bench/throughput.py needs
a hundred paired rounds. They do not see what the simulation leaves out (second-level
caches, branch prediction, two cores), and they move by a few hundred instructions
per job with the process's memory layout alone (CPython's method cache is indexed by
addresses): a difference that small is not a finding.

The worker runs about 50 times slower under cachegrind. So that the history's writer
thread does per job what it does at full speed (one flush per some thousand jobs, not
one per few dozen), its flush interval is stretched by ``--flush-scale`` (40).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

EVENTS = ("Ir", "I1mr", "D1mr", "D1mw")


def _child(config: str, flush_scale: float) -> int:
    """The worker itself, its history's flush interval stretched (under valgrind)."""
    from rbit.cli import main as rbit_main
    from rbit.control import state

    state.FLUSH_INTERVAL *= flush_scale
    return rbit_main([config])


def _totals(path: Path) -> dict[str, int]:
    """The summary line of a cachegrind output file, by event name."""
    events: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("summary:"):
            return dict(zip(events, (int(x) for x in line.split()[1:]), strict=True))
    raise SystemExit(f"{path}: no cachegrind summary")


def _run(broker, contender, n: int, out: Path, flush_scale: float) -> dict[str, int]:
    from bench import throughput

    url, cleanup = broker.scope(contender.name)
    workdir = Path(tempfile.mkdtemp(prefix="instructions-"))
    run = throughput.Run(workdir, url, n)
    try:
        contender.prepare(run)
        command = ["valgrind", "--tool=cachegrind", "--cache-sim=yes",
                   f"--cachegrind-out-file={out}", sys.executable, __file__,
                   "--child", str(workdir / "rbit.ini"), "--flush-scale", str(flush_scale)]
        with open(out.with_suffix(".log"), "w") as log:
            proc = subprocess.Popen(command, env=contender.env(run), cwd=ROOT, stdout=log,
                                    stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 60 + n * 0.05
            while not (workdir / "done").exists():  # the runner's tick: the N-th job ran
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise SystemExit(f"{contender.name}: the worker did not run {n} jobs "
                                     f"(see {out.with_suffix('.log')})")
                time.sleep(0.2)  # polling interval of a wait bounded by the deadline
            # Its ack follows at once; then the graceful stop.
            time.sleep(1.0)  # under valgrind: let the last ack go out before SIGTERM
            proc.terminate()
            proc.wait(120)
        return _totals(out)
    finally:
        cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="rbit-python-nostatus,rbit-python-nohistory")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--flush-scale", type=float, default=40.0)
    parser.add_argument("--out", default=None, help="where cachegrind's files go")
    parser.add_argument("--rbit-ref", default=None, metavar="REV")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # the rbit under test comes first on PYTHONPATH
        sys.exit(_child(args.child, args.flush_scale))
    sys.path.insert(0, str(ROOT))
    from bench import throughput

    if args.rbit_ref:
        throughput._snapshot_rbit(args.rbit_ref)  # noqa: SLF001 (the bench's own helper)

    everything = throughput.contenders()
    names = [name for name in args.only.split(",") if name]
    unknown = [name for name in names if name not in everything or
               not name.startswith("rbit-python")]
    if unknown:
        raise SystemExit(f"not an in-thread rbit row of bench/throughput.py: {unknown}")
    out = Path(args.out or tempfile.mkdtemp(prefix="instructions-out-"))
    out.mkdir(parents=True, exist_ok=True)
    broker = throughput.BrokerHandle(None, None)
    per_job: dict[str, dict[str, float]] = {}
    try:
        for name in names:
            small = _run(broker, everything[name], args.n, out / f"{name}-1.out",
                         args.flush_scale)
            large = _run(broker, everything[name], 3 * args.n, out / f"{name}-3.out",
                         args.flush_scale)
            per_job[name] = {e: (large[e] - small[e]) / (2 * args.n) for e in EVENTS}
            print(f"{name} done", file=sys.stderr, flush=True)
    finally:
        broker.close()
    print(f"rbit: {throughput.RBIT_SRC['ref']}; per job, from {args.n} and {3 * args.n} "
          f"jobs under cachegrind (flush interval x{args.flush_scale:g}; files in {out})")
    print(f"{'row':<24}" + "".join(f"{e:>10}" for e in EVENTS))
    first = names[0]
    for name in names:
        print(f"{name:<24}" + "".join(f"{per_job[name][e]:10.0f}" for e in EVENTS))
    for name in names[1:]:
        print(f"{first} - {name}: " + ", ".join(
            f"{e} {per_job[first][e] - per_job[name][e]:+.0f} "
            f"({per_job[first][e] / per_job[name][e] - 1:+.1%})" for e in EVENTS))


if __name__ == "__main__":
    main()
