"""Where the wall time of a one-at-a-time ``shell!`` job goes, step by step.

``bench/.venv/bin/python bench/shell_path.py [--n 3000]`` runs the ``rbit-shell-true``
and ``raw-spawn-loop`` contenders of ``throughput.py`` once each, with a timestamp
(``time.perf_counter``) taken on entry to (and exit from) the functions each job
passes through, and prints the median time between consecutive steps. With prefetch
1 every step is on the job's critical path, except what runs while the command
starts up: the broker sends the next job only when the ack arrived.

The steps are private functions of rbit and pika, so this is a tool for working on
rbit, not a contract; a renamed function shows as a missing step.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_events: list[tuple[str, float]] = []


def _stamp(owner: object, name: str, tag: str, exit_tag: str | None = None) -> None:
    original = getattr(owner, name)
    clock = time.perf_counter
    add = _events.append

    def stamped(*args, **kwargs):
        add((tag, clock()))
        try:
            return original(*args, **kwargs)
        finally:
            if exit_tag is not None:
                add((exit_tag, clock()))

    setattr(owner, name, stamped)


def _write_steps(out: str, n: int) -> None:
    """Median time from each step to the next one, for transitions seen in most jobs."""
    gaps: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for (tag, t), (next_tag, next_t) in zip(_events, _events[1:]):
        gaps[(tag, next_tag)].append(next_t - t)
    lines = ["%-26s -> %-26s %7.1f us" % (a, b, statistics.median(v) * 1e6)
             for (a, b), v in gaps.items() if len(v) >= n // 2]
    Path(out + ".part").write_text("\n".join(sorted(lines)) + "\n")
    os.replace(out + ".part", out)  # whole, for the parent waiting for it


def _rbit_worker(out: str, n: int, config: str) -> int:
    import pika.channel
    from pika.adapters.utils import io_services_utils as transports

    from rbit import dispatch
    from rbit.amqp import loops
    from rbit.runners import shell
    from rbit.runners.shell import bodies, job, spawn

    _stamp(transports._AsyncPlaintextTransport, "_on_socket_readable", "a. socket readable")
    _stamp(dispatch.EventedPool, "on_delivery", "b. delivery to the pool")
    _stamp(shell.ShellRunner, "start_job", "c. start_job")
    _stamp(bodies.BodyFiles, "write", "d. body file", "e. body written")
    _stamp(spawn.Spawner, "start", "f. posix_spawn", "g. spawned")
    _stamp(bodies.Spares, "tidy", "h. tidy up", "i. tidied")
    _stamp(loops.PikaFdLoop, "_dispatch", "j. job fd events", "z. job events done")
    _stamp(job.Job, "_on_exit", "k. command exited")
    _stamp(job.Job, "_finish", "l. outcome")
    _stamp(dispatch.JobPool, "_settle", "m. settle")
    _stamp(pika.channel.Channel, "basic_ack", "n. basic_ack")
    _stamp(loops.EagerConnection, "_adapter_emit_data", "o. send", "p. sent")
    from rbit.cli import main

    try:
        return main([config])
    finally:
        _write_steps(out, n)


def _raw_worker(out: str, n: int, url: str, queue: str) -> None:
    import pika.adapters.blocking_connection as blocking
    from pika.adapters.utils import io_services_utils as transports

    from bench import baselines

    _stamp(transports._AsyncPlaintextTransport, "_on_socket_readable", "a. socket readable")
    _stamp(subprocess, "run", "f. subprocess.run", "g. ran")
    _stamp(blocking.BlockingChannel, "basic_ack", "n. basic_ack", "p. acked")

    def stop(*_: object) -> None:
        _write_steps(out, n)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    baselines.spawn(url, queue)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, out, n, *rest = sys.argv[2:]
        if kind == "rbit":
            return _rbit_worker(out, int(n), rest[0])
        _raw_worker(out, int(n), *rest)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="jobs per run (default 3000)")
    args = parser.parse_args()

    from bench import throughput

    table = throughput.contenders()
    broker = throughput.BrokerHandle(None, None)
    me = str(Path(__file__).resolve())
    try:
        for name, kind in (("raw-spawn-loop", "raw"), ("rbit-shell-true", "rbit")):
            out = throughput.RESULTS / ("shell-path-%s.tmp" % kind)

            def command(run, kind=kind, out=out):
                rest = ([str(run.workdir / "rbit.ini")] if kind == "rbit"
                        else [run.url, throughput.QUEUE])
                return [sys.executable, me, "--worker", kind, str(out), str(run.n), *rest]

            contender = dataclasses.replace(table[name], command=command)
            result = throughput.measure(contender, broker, args.n)
            deadline = time.monotonic() + 10
            while not out.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            print("%s: %.0f jobs/s, %.0f us per job" % (name, result["jobs_per_s"],
                                                        1e6 / result["jobs_per_s"]))
            print(out.read_text())
            out.unlink()
    finally:
        broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
