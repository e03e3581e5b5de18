"""CPU time of one in-thread python! job on its job thread, with each hook on or off.

``python bench/job_path.py [--n 20000] [--rounds 5] [--rbit-ref REV] [--only A,B]``
builds a :class:`rbit.dispatch.ThreadPool` (concurrency 1) the way the worker wires it
(:mod:`rbit.worker`, :mod:`rbit.control.plane`), with a stub broker (no network: acks
are counted), pushes N deliveries of ~200-byte bodies to it before its thread starts,
and reports the CPU time of the job thread (``time.thread_time``) from the first job
to the N-th ack, per job. Each variant runs in a process of its own, the rounds are
interleaved, and the table shows the best round (the machine is shared: the minimum
is the least disturbed) and the median.

Variants (each adds to ``bare``, which has no observer, no statuses, no tracker):

``bare``          the pool and the runner alone (usage metering included, as always)
``nousage``       ``bare`` with the thread's usage metering stubbed out
``observer``      the control plane's observer, history off (``history_depth = 0``):
                  what ``rbit-python-nohistory`` runs
``nohistory``     ``observer`` with the usage metering stubbed out
``history``       the observer with the history (SQLite writer thread, a temp dir):
                  what ``rbit-python-nostatus`` runs; against ``observer``, what the
                  history costs a job
``hist-nousage``  ``history`` with the usage metering stubbed out; against
                  ``nohistory``, the same without the metering's noise
``tracker``       ``history`` plus PyBit's job tracker (``pybit_commands = yes``)
``metrics``       ``history`` plus the job metrics (``[http]`` configured)
``logsink``       ``history`` plus ``[status] sinks = log``, the log to a file:
                  what ``rbit-python-logsink`` runs

``--rbit-ref REV`` runs the same variants on ``git archive REV`` (hooks that version
lacks are left out of its row), e.g. ``--rbit-ref ae9f52a``, the first release.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("bare", "nousage", "observer", "nohistory", "history", "hist-nousage", "tracker",
            "metrics", "logsink")
BODY = b'{"job":{"id":1,"suite":"latex","format":"pdf","distribution":"cnx"},' + b'"p":"' \
    + b"x" * 120 + b'"}'

_first: list[float] = []


def noop(message, set_status, settings):  # noqa: ARG001 (the runner's signature)
    """The job: nothing, but the first one notes the thread's CPU time."""
    if not _first:
        _first.append(time.thread_time())


class StubBroker:
    """Counts acks; the N-th notes the job thread's CPU time and wakes the main thread."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.acked = 0
        self.cpu_done = 0.0
        self.done = threading.Event()

    def is_current(self, delivery) -> bool:  # noqa: ARG002
        return True

    def ack(self, delivery) -> None:  # noqa: ARG002
        self.acked += 1
        if self.acked == self.n:
            self.cpu_done = time.thread_time()
            self.done.set()

    def requeue(self, delivery) -> None:  # noqa: ARG002
        raise AssertionError("nothing is requeued here")

    def publish_then_ack(self, delivery, publish) -> None:  # noqa: ARG002
        raise AssertionError("every job here is Done")


def _child(variant: str, n: int) -> dict:
    """Run ``variant`` in this process (imports the rbit on sys.path)."""
    from rbit import dispatch
    from rbit.config import load_config
    from rbit.message import Message
    from rbit.runners import python as python_runner
    try:
        from rbit.amqp.records import Delivery
    except ImportError:  # the first release
        from rbit.broker import Delivery
    tmp = Path(tempfile.mkdtemp(prefix="job-path-"))
    sinks = "log" if variant == "logsink" else ""
    depth = "0" if variant in ("bare", "nousage", "observer", "nohistory") else "100"
    ini = tmp / "rbit.ini"
    ini.write_text(
        "[rbit]\nname = jp\nstate_dir = %s\nhistory_depth = %s\n"
        "[amqp]\nhost = 127.0.0.1\n[status]\nsinks = %s\n"
        "[runner:q]\nrunner = python!bench.job_path:noop\nprefetch = 100\n"
        % (tmp / "state", depth, sinks))
    settings = load_config(str(ini))
    runner = settings.runners[0]
    if variant in ("nousage", "nohistory", "hist-nousage") and hasattr(python_runner, "thread_usage"):
        python_runner.thread_mark = lambda: None
        python_runner.thread_usage = lambda mark: None
    from rbit.status import StatusReporter
    if variant == "logsink":
        _log_to_file(settings, tmp / "worker.log")
    reporter = StatusReporter(settings.status, "jp")
    job_runner = python_runner.load_python_runner(runner)
    broker = StubBroker(n)
    pool_class = getattr(dispatch, "ThreadPool", None) or dispatch.JobPool
    pool = pool_class(runner, job_runner, broker, reporter.report, worker="jp")
    hooks = _hooks(variant, settings, pool, reporter)
    if hooks is None:
        return {"variant": variant, "missing": True}
    for tag in range(1, n + 1):
        message = Message(BODY, "q", message_id="job-%d" % tag)
        if hooks.get("tracker") is not None:
            hooks["tracker"].arrived(message)  # on the I/O thread, in the worker
        pool.on_delivery(Delivery(message, tag, 1))
    wall = time.monotonic()
    pool.start()
    if not broker.done.wait(600):
        raise SystemExit("the pool did not settle every job")
    wall = time.monotonic() - wall
    store = hooks.get("store")
    if store is not None:
        store.close()
    first = sys.modules["bench.job_path"]._first[0]  # the runner's module, not __main__
    return {"variant": variant, "cpu_us": (broker.cpu_done - first) / (n - 1) * 1e6,
            "wall_us": wall / n * 1e6}


def _log_to_file(settings, path: Path) -> None:
    """The worker's default logging, its stderr going to a file (as in a deployment)."""
    stream = open(path, "w")  # noqa: SIM115 (lives as long as the process)
    sys.stderr = stream
    try:
        from rbit import logsetup
        logsetup.configure(settings, False)
    except ImportError:  # the first release configured logging in its CLI
        import logging
        logging.basicConfig(level=logging.INFO, force=True, stream=stream)


def _hooks(variant: str, settings, pool, reporter) -> dict | None:
    """Attach what the worker would attach for ``variant``; None if this rbit lacks it."""
    hooks: dict = {}
    if variant in ("bare", "nousage"):
        return hooks
    try:
        from rbit.control.observer import JobObserver
        from rbit.control.state import StateStore
    except ImportError:
        return None if variant != "logsink" else hooks
    state = settings.state
    store = StateStore(state.state_dir, state.history_depth)
    store.start()
    hooks["store"] = store
    keeper = getattr(store, "keeper", None)
    if keeper is None:  # before the observer took a queue's keeper
        keeper = store.record
    pool.observer = JobObserver(keeper if state.history_depth else None)
    if variant == "tracker":
        from rbit import pybit
        try:
            tracker = pybit.JobTracker(reporter.report, pool.observer)
        except TypeError:  # before the tracker kept its jobs in the observer
            tracker = pybit.JobTracker(reporter.report)
        hooks["tracker"] = pool.tracker = tracker
    elif variant == "metrics":
        from rbit.observe.metrics import JobMetrics
        pool.metrics = JobMetrics(["q"])
    return hooks


def _run_child(variant: str, n: int, src: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), str(ROOT)]))
    done = subprocess.run([sys.executable, __file__, "--child", variant, "--n", str(n)],
                          env=env, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode:
        raise SystemExit(f"{variant} ({src}) failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _snapshot(ref: str) -> Path:
    target = Path(tempfile.mkdtemp(prefix="job-path-ref-"))
    archive = subprocess.run(["git", "archive", ref, "rbit"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rbit-ref", default=None, metavar="REV")
    parser.add_argument("--only", default=",".join(VARIANTS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, os.environ["PYTHONPATH"].split(os.pathsep)[0])
        print(json.dumps(_child(args.child, args.n)))
        return
    variants = [v for v in args.only.split(",") if v]
    sources = [("working tree", ROOT)]
    if args.rbit_ref:
        sources.append((f"commit {args.rbit_ref}", _snapshot(args.rbit_ref)))
    runs: dict[tuple[str, str], list[float]] = {}
    for round_no in range(args.rounds):
        for label, src in sources:
            for variant in variants:
                result = _run_child(variant, args.n, src)
                if result.get("missing"):
                    continue
                runs.setdefault((label, variant), []).append(result["cpu_us"])
        print(f"round {round_no + 1}/{args.rounds} done", file=sys.stderr)
    load = os.getloadavg()
    print(f"job thread CPU us/job, N={args.n}, {args.rounds} interleaved rounds, "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"{'rbit':<20} {'variant':<12} {'best':>6} {'median':>7}")
    for (label, variant), values in runs.items():
        print(f"{label:<20} {variant:<12} {min(values):6.1f} {statistics.median(values):7.1f}")


if __name__ == "__main__":
    main()
