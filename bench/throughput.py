"""Throughput of rbit against hand-written pika loops, Celery and Dramatiq.

Run from the repository root with the benchmark's virtualenv::

    python3 bench/throughput.py --setup           # creates bench/.venv once
    bench/.venv/bin/python bench/throughput.py    # N=20000, 3 interleaved rounds

Each contender is a separate worker process. Per round and contender: a fresh vhost
(or fresh queue names on an ``--amqp-url`` broker) is filled with N persistent ~200-byte
JSON jobs (not timed), the worker is started, and the clock runs from its start to
its N-th job. Rounds are interleaved (round-robin over the contenders, the order
reversed every other round) and the table shows medians. See bench/README.rst.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
VENV = BENCH / ".venv"
QUEUE = "bench_jobs"
CPU_JOBS = 400  # jobs per run of the ~20 ms CPU-bound rows
POLL = 0.01  # seconds between checks for "first" / "done"
CLK_TCK = os.sysconf("SC_CLK_TCK")

sys.path.insert(0, str(ROOT))
# Where the rbit package under test is imported from (--rbit-ref sets a snapshot).
RBIT_SRC = {"path": ROOT, "ref": "working tree"}


# ------------------------------------------------------------------------- the jobs


def job_body(index: int) -> bytes:
    """A JSON job of about 200 bytes, shaped like a PyBit-ish build request."""
    doc = {
        "job": {"id": index, "suite": "latex", "format": "pdf", "distribution": "cnx"},
        "package": {"name": "col%05d" % (index % 100000), "version": "1.%d" % (index % 97)},
        "requested_by": "bench@example.org",
        "pad": "",
    }
    raw = json.dumps(doc, separators=(",", ":"))
    doc["pad"] = "x" * max(0, 200 - len(raw))
    return json.dumps(doc, separators=(",", ":")).encode()


def publish_raw(url: str, queue: str, count: int, window: int = 1000,
                sign: Callable[[str, bytes], dict[str, Any]] | None = None) -> None:
    """Publish ``count`` persistent jobs to ``queue`` with pipelined publisher confirms.

    ``sign(message_id, body)``, when given, returns each job's headers (a signature).
    """
    import pika

    state = {"sent": 0, "confirmed": 0, "error": None}
    props = pika.BasicProperties(delivery_mode=2, content_type="application/json")

    def fill(channel) -> None:
        while state["sent"] < count and state["sent"] - state["confirmed"] < window:
            state["sent"] += 1
            props.message_id = "job-%d" % state["sent"]
            body = job_body(state["sent"])
            if sign is not None:
                props.headers = sign(props.message_id, body)
            channel.basic_publish("", queue, body, props)

    def on_confirm(frame) -> None:
        method = frame.method
        if not isinstance(method, pika.spec.Basic.Ack):
            state["error"] = "publish nacked"
        state["confirmed"] = method.delivery_tag if method.multiple else state["confirmed"] + 1
        if state["confirmed"] >= count:
            connection.close()
        else:
            fill(channel_box[0])

    channel_box: list[Any] = []

    def on_channel(channel) -> None:
        channel_box.append(channel)
        channel.confirm_delivery(on_confirm, callback=lambda _f: fill(channel))

    connection = pika.SelectConnection(
        pika.URLParameters(url),
        on_open_callback=lambda conn: conn.channel(on_open_callback=on_channel),
        on_open_error_callback=lambda _c, err: state.update(error=str(err)),
        on_close_callback=lambda *_: connection.ioloop.stop(),
    )
    connection.ioloop.start()
    if state["error"] or state["confirmed"] < count:
        raise RuntimeError("publishing failed: %s" % (state["error"] or "connection closed"))


def ready_count(url: str, queue: str) -> int:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


class QueueWatch:
    """A connection kept open to poll a queue's ready count with passive declares."""

    def __init__(self, url: str, queue: str) -> None:
        import pika

        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.queue = queue

    def ready(self) -> int:
        return self.channel.queue_declare(self.queue, passive=True).method.message_count

    def close(self) -> None:
        self.connection.close()


def wait_ready_count(url: str, queue: str, count: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while (have := ready_count(url, queue)) != count:
        if time.monotonic() > deadline:
            raise RuntimeError("queue %s holds %d jobs, expected %d" % (queue, have, count))
        time.sleep(0.2)


# ------------------------------------------------------------------ /proc readings


def cpu_seconds(pid: int | None, children: bool = False) -> float:
    """utime+stime of a process (all threads), plus its reaped children if asked."""
    if not pid:
        return 0.0
    try:
        text = Path("/proc/%d/stat" % pid).read_text()
    except OSError:
        return float("nan")
    fields = text[text.rindex(")") + 2:].split()
    # After "pid (comm) ": state is field 3 of stat(5); utime is 14, stime 15, cutime 16.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def thread_cpu_us_per_job(workdir: Path, jobs: int) -> dict[str, float]:
    """CPU of each worker thread between the first and the N-th job, per job.

    From the ``threads-first`` / ``threads-done`` files that ``bench_runners.tick``
    writes (rbit rows only); numbers at the end of thread names are folded to ``<n>``.
    """
    def read(name: str) -> dict[str, float]:
        seconds: dict[str, float] = {}
        text = _read(workdir / name) or ""
        for line in text.splitlines():
            thread, _, value = line.rpartition("\t")
            key = re.sub(r"\d+$", "<n>", thread)
            seconds[key] = seconds.get(key, 0.0) + float(value)
        return seconds

    first, done = read("threads-first"), read("threads-done")
    return {name: round((cpu - first.get(name, 0.0)) / jobs * 1e6, 1)
            for name, cpu in sorted(done.items()) if cpu - first.get(name, 0.0) > 0}


def tree_pids(pid: int) -> list[int]:
    """``pid`` and every live descendant (a worker and its warm or prefork children)."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                text = Path("/proc/%s/stat" % name).read_text()
            except OSError:
                continue
            parents[int(name)] = int(text[text.rindex(")") + 2:].split()[1])
    tree, grew = {pid}, True
    while grew:
        found = {child for child, parent in parents.items() if parent in tree}
        grew = not found <= tree
        tree |= found
    return sorted(tree)


def tree_cpu_seconds(pid: int) -> float:
    """CPU of ``pid`` and its live descendants, plus the children they reaped."""
    return sum(cpu_seconds(each, True) for each in tree_pids(pid))


def tree_rss_kb(pid: int) -> int:
    return sum(status_kb(each, "VmRSS") for each in tree_pids(pid))


def status_kb(pid: int, key: str) -> int:
    try:
        for line in Path("/proc/%d/status" % pid).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------- the broker


class BrokerHandle:
    """A private RabbitMQ node (tests.rabbit.RabbitNode) or an external broker URL."""

    def __init__(self, amqp_url: str | None, broker_pid: int | None) -> None:
        self.node = None
        self.external_url = amqp_url
        self._tmp = None
        if amqp_url is None:
            from tests.rabbit import RabbitNode

            self._tmp = tempfile.mkdtemp(prefix="rbit-bench-node-")
            self.node = RabbitNode(Path(self._tmp), name="rbit-bench-%d@localhost" % os.getpid())
            print("starting a private RabbitMQ node in %s ..." % self._tmp, flush=True)
            self.node.start()
            broker_pid = broker_pid or int(self.node.ctl("eval", "os:getpid().").strip().strip('"'))
        self.pid = broker_pid or _single_beam_pid()

    def scope(self, tag: str) -> tuple[str, Callable[[], None]]:
        """A URL for a fresh vhost (private node) and a cleanup callable."""
        if self.node is not None:
            vhost = self.node.new_vhost()
            return self.node.url(vhost), lambda: self.node.delete_vhost(vhost)
        return self.external_url, lambda: None

    def unacked(self, url: str, queue: str) -> int | None:
        if self.node is None:
            return None
        vhost = urllib.parse.unquote(urllib.parse.urlsplit(url).path[1:]) or "/"
        return self.node.list_queues(vhost).get(queue, (0, 0))[1]

    def version(self) -> str:
        import pika

        url = self.node.url() if self.node is not None else self.external_url
        connection = pika.BlockingConnection(pika.URLParameters(url))
        try:
            props = connection._impl.server_properties  # pika keeps them only here
            version = props.get("version", b"?")
            return version.decode() if isinstance(version, bytes) else str(version)
        finally:
            connection.close()

    def close(self) -> None:
        if self.node is not None:
            self.node.stop()
            shutil.rmtree(self._tmp, ignore_errors=True)


def _single_beam_pid() -> int | None:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip().startswith("beam"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids[0] if len(pids) == 1 else None


# ------------------------------------------------------------------- contenders


@dataclasses.dataclass
class Run:
    """Everything one contender run needs: its scratch dir, broker URL, job count."""

    workdir: Path
    url: str
    n: int
    marks: tuple[int, ...] = ()

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PYTHONPATH=os.pathsep.join([str(RBIT_SRC["path"]), str(ROOT),
                                        env.get("PYTHONPATH", "")]),
            BENCH_N=str(self.n),
            BENCH_DIR=str(self.workdir),
            BENCH_MARKS=",".join(str(m) for m in self.marks),
            BENCH_URL=self.url,
            BENCH_QUEUE=QUEUE,
        )
        env.update(extra)
        return env


@dataclasses.dataclass
class Contender:
    """A worker to measure.

    ``detect`` is ``"tick"`` (the job function reports first/done from inside the
    worker) or ``"poll"`` (ready count of the queue, for workers that run /bin/true).
    """

    name: str
    reference: str  # the contender its ratio is taken against
    prepare: Callable[[Run], None]  # declare and fill the queue (not timed)
    command: Callable[[Run], list[str]]
    detect: str = "tick"
    env: Callable[[Run], dict[str, str]] = lambda run: run.env()
    needs: str | None = None  # a module that must import (celery, dramatiq)
    jobs: int | None = None  # a fixed job count instead of --n (slow jobs)


def _declare_plain(run: Run) -> None:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(run.url))
    connection.channel().queue_declare(QUEUE, durable=True)
    connection.close()


def _fill_raw(run: Run) -> None:
    publish_raw(run.url, QUEUE, run.n)


def _prepare_baseline(run: Run) -> None:
    _declare_plain(run)
    _fill_raw(run)


RBIT_INI = """\
[rbit]
name = bench
polling_time = 60
concurrency = 1
prefetch = {prefetch}
state_dir = {state_dir}
history_depth = {history_depth}

[amqp]
url = {url}

[status]
sinks = {sinks}

[runner:{queue}]
runner = {runner}
max_retries = 0
{extra}
"""


#: A child runner's environment keeps only what env_keep names (rbit.runners.environment).
CHILD_ENV = "env_keep = PATH, HOME, LANG, PYTHONPATH, VIRTUAL_ENV, BENCH_*"


def _rbit_ini(run: Run, runner: str, sinks: str, prefetch: int, extra: str = "",
              history_depth: int = 100) -> Path:
    path = run.workdir / "rbit.ini"
    path.write_text(RBIT_INI.format(prefetch=prefetch, url=run.url, sinks=sinks,
                                    queue=QUEUE, runner=runner, extra=extra,
                                    state_dir=run.workdir / "state",
                                    history_depth=history_depth))
    return path


def _declare_rbit(run: Run) -> None:
    """Declare what the rbit worker will declare, exactly as it would."""
    import pika

    from rbit.config import load_config
    from rbit.topology import worker_topology

    topology = worker_topology(load_config(str(run.workdir / "rbit.ini")))
    connection = pika.BlockingConnection(pika.URLParameters(run.url))
    channel = connection.channel()
    for exchange in topology.exchanges:
        channel.exchange_declare(exchange.name, exchange.type, durable=exchange.durable)
    for queue in topology.queues:
        channel.queue_declare(queue.name, durable=queue.durable, arguments=dict(queue.arguments))
        for exchange, key in queue.bindings:
            channel.queue_bind(queue.name, exchange, key)
    connection.close()


def rbit_contender(name: str, reference: str, runner: str, sinks: str, prefetch: int,
                   detect: str = "tick", extra: str = "", jobs: int | None = None,
                   history_depth: int = 100) -> Contender:
    def prepare(run: Run) -> None:
        _rbit_ini(run, runner, sinks, prefetch, extra, history_depth)
        _declare_rbit(run)
        _fill_raw(run)

    def command(run: Run) -> list[str]:
        return [sys.executable, "-m", "rbit", str(run.workdir / "rbit.ini")]

    return Contender(name, reference, prepare, command, detect, jobs=jobs)


def _signed_fill(run: Run) -> None:
    """Keys in the run's directory, [security] in its rbit.ini, signed jobs."""
    from rbit.security import keys
    from rbit.security.signing import Signer

    trusted = run.workdir / "trusted"
    keys.generate("publisher", trusted)
    signer = Signer(keys.load_private(trusted / "publisher.key"))
    (trusted / "publisher.key").rename(run.workdir / "publisher.key")
    with open(run.workdir / "rbit.ini", "a") as ini:
        # max_skew: the queue is filled before the worker starts, and drained later.
        ini.write(f"\n[security]\ntrusted_keys = {trusted}\nrequire_signed = yes\n"
                  f"max_skew = 86400\nreplay_file = {run.workdir / 'replay.sqlite'}\n")
    _declare_rbit(run)
    publish_raw(run.url, QUEUE, run.n, sign=lambda job_id, body: signer.sign(
        "", QUEUE, job_id, "application/json", {}, body))


def _framework_fill(module: str) -> Callable[[Run], None]:
    def prepare(run: Run) -> None:
        subprocess.run([sys.executable, "-m", module, "publish", str(run.n),
                        job_body(0).decode()], env=run.env(), check=True, cwd=ROOT)
        wait_ready_count(run.url, QUEUE, run.n)

    return prepare


def _celery_command(run: Run, pool: str = "solo") -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "bench.celery_app", "worker",
            "--pool", pool, "--concurrency", "1", "--queues", QUEUE,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", "WARNING"]


def _dramatiq_command(threads: int) -> Callable[[Run], list[str]]:
    def command(run: Run) -> list[str]:
        return [sys.executable, "-m", "dramatiq", "bench.dramatiq_app",
                "--processes", "1", "--threads", str(threads)]

    return command


def contenders() -> dict[str, Contender]:
    baseline = "baseline-pika"
    spawn = "raw-spawn-loop"
    items = [
        Contender(baseline, baseline, _prepare_baseline,
                  lambda run: [sys.executable, "-m", "bench.baselines", "consume",
                               run.url, QUEUE]),
        rbit_contender("rbit-python-nostatus", baseline,
                       "python!bench.bench_runners:noop", "", 100),
        rbit_contender("rbit-python-logsink", baseline,
                       "python!bench.bench_runners:noop", "log", 100),
        # The same with every job Ed25519-signed and verified (and its replay record).
        Contender("rbit-python-signed", baseline,
                  lambda run: (_rbit_ini(run, "python!bench.bench_runners:noop", "", 100),
                               _signed_fill(run)),
                  lambda run: [sys.executable, "-m", "rbit", str(run.workdir / "rbit.ini")],
                  "tick"),
        # The same with the HTTP endpoint on (its metrics count every job).
        rbit_contender("rbit-python-http", baseline,
                       "python!bench.bench_runners:noop", "", 100,
                       extra="\n[http]\nbind = 127.0.0.1:0\n"),
        # The job history off ([rbit] history_depth = 0): the rows above keep it on,
        # as a worker does by default; compare with rbit-python-nostatus.
        rbit_contender("rbit-python-nohistory", baseline,
                       "python!bench.bench_runners:noop", "", 100, history_depth=0),
        Contender(spawn, spawn, _prepare_baseline,
                  lambda run: [sys.executable, "-m", "bench.baselines", "spawn",
                               run.url, QUEUE], detect="poll"),
        rbit_contender("rbit-shell-true", spawn, "shell!/bin/true", "", 1, detect="poll"),
        # The same runner told to keep one more job at hand (prefetch = 2, still one
        # job at a time): the next job waits locally instead of an AMQP round trip.
        rbit_contender("rbit-shell-true-p2", spawn, "shell!/bin/true", "", 2, detect="poll"),
        Contender("celery-solo", baseline, _framework_fill("bench.celery_app"),
                  _celery_command, needs="celery"),
        # Jobs in child processes: Celery's prefork pool with one child against
        # rbit's warm children (a section with a timeout), one at a time.
        Contender("celery-prefork-c1", baseline, _framework_fill("bench.celery_app"),
                  lambda run: _celery_command(run, "prefork"), needs="celery"),
        # (env_keep: the children see BENCH_*, which tells them where to count.)
        rbit_contender("rbit-python-child-c1", baseline, "python!bench.bench_runners:noop",
                       "", 100, extra=f"timeout = 60\n{CHILD_ENV}"),
        # A pure-Python job of ~20 ms of CPU: children use both cores, threads cannot.
        rbit_contender("rbit-cpu20-child-c1", "rbit-cpu20-child-c1",
                       "python!bench.bench_runners:cpu20", "", 2,
                       extra=f"timeout = 60\nconcurrency = 1\n{CHILD_ENV}", jobs=CPU_JOBS),
        rbit_contender("rbit-cpu20-child-c2", "rbit-cpu20-child-c1",
                       "python!bench.bench_runners:cpu20", "", 2,
                       extra=f"timeout = 60\nconcurrency = 2\n{CHILD_ENV}", jobs=CPU_JOBS),
        rbit_contender("rbit-cpu20-thread-c2", "rbit-cpu20-child-c1",
                       "python!bench.bench_runners:cpu20", "", 2,
                       extra="concurrency = 2", jobs=CPU_JOBS),
        Contender("dramatiq-t1", baseline, _framework_fill("bench.dramatiq_app"),
                  _dramatiq_command(1), needs="dramatiq",
                  env=lambda run: run.env(dramatiq_queue_prefetch="100")),
    ]
    return {c.name: c for c in items}


# --------------------------------------------------------------------- one run


class RunFailed(RuntimeError):
    pass


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _tail(path: Path, lines: int = 30) -> str:
    text = _read(path) or ""
    return "\n".join(text.splitlines()[-lines:])


def measure(contender: Contender, broker: BrokerHandle, n: int, *, marks: tuple[int, ...] = (),
            command_prefix: list[str] | None = None, keep_dir: Path | None = None,
            stop_worker_pid: bool = False) -> dict[str, Any]:
    """Fill a fresh queue, start the contender's worker, time it to the N-th job."""
    workdir = Path(tempfile.mkdtemp(prefix="rbit-bench-run-"))
    url, cleanup = broker.scope(contender.name)
    run = Run(workdir, url, n, marks)
    proc = None
    try:
        contender.prepare(run)
        wait_ready_count(url, QUEUE, n)
        time.sleep(0.5)  # let the broker finish writing the persistent jobs
        log_path = workdir / "worker.log"
        argv = (command_prefix or []) + contender.command(run)
        with open(log_path, "wb") as log:
            t_spawn = time.time()
            proc = subprocess.Popen(argv, env=contender.env(run), cwd=workdir, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        load = os.getloadavg()[0]
        result = _watch(contender, broker, run, proc, t_spawn, log_path)
        result["loadavg_1m_at_start"] = load
        result["marks"] = result.pop("sampled_marks") or _progress(workdir)
        result["log_bytes"] = log_path.stat().st_size
        _stop(proc, result["pid"] if stop_worker_pid else proc.pid)
        if keep_dir is not None:
            for item in workdir.iterdir():
                if item.suffix in (".prof", ".txt", ".json"):
                    shutil.copy(item, keep_dir / item.name)
        return result
    finally:
        if proc is not None and proc.poll() is None:
            _stop(proc, proc.pid)
        cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


def _watch(contender: Contender, broker: BrokerHandle, run: Run, proc: subprocess.Popen,
           t_spawn: float, log_path: Path) -> dict[str, Any]:
    deadline = time.monotonic() + max(120.0, run.n / 50)
    watch = QueueWatch(run.url, QUEUE) if contender.detect == "poll" else None
    first = done = None
    pid = proc.pid
    cpu0 = bcpu0 = 0.0
    sampled: list[dict[str, float]] = []  # marks of "poll" workers, which do not tick()
    try:
        while done is None:
            if proc.poll() is not None:
                raise RunFailed("%s exited with %s:\n%s" % (contender.name, proc.returncode,
                                                            _tail(log_path)))
            if time.monotonic() > deadline:
                raise RunFailed("%s timed out:\n%s" % (contender.name, _tail(log_path)))
            if first is None:
                first = _first(contender, run, watch, proc)
                if first is not None:
                    pid = first[0]
                    cpu0, bcpu0 = cpu_seconds(pid, True), cpu_seconds(broker.pid)
                    own0, tree0 = cpu_seconds(pid), tree_cpu_seconds(proc.pid)
            else:
                if watch is not None and run.marks:
                    _sample_marks(run, watch, pid, sampled)
                done = _done(contender, run, watch)
            if done is None:
                time.sleep(POLL)
        if watch is not None and run.marks:  # the last mark, passed within the last poll
            _sample_marks(run, watch, pid, sampled)
        cpu1, bcpu1, own1 = cpu_seconds(pid, True), cpu_seconds(broker.pid), cpu_seconds(pid)
        tree1, tree_rss = tree_cpu_seconds(proc.pid), tree_rss_kb(proc.pid)
        hwm, rss = status_kb(pid, "VmHWM"), status_kb(pid, "VmRSS")
    finally:
        if watch is not None:
            watch.close()
    if contender.detect == "poll":
        _await_unacked_zero(broker, run.url)
    t_first = first[1]
    jobs = run.n - 1  # the first job's own time is not in the interval
    return {
        "contender": contender.name,
        "n": run.n,
        "pid": pid,
        "startup_s": t_first - t_spawn,
        "elapsed_s": done - t_spawn,
        "steady_s": done - t_first,
        "jobs_per_s": run.n / (done - t_spawn),
        "steady_jobs_per_s": jobs / (done - t_first),
        "worker_cpu_us_per_job": (own1 - own0) / jobs * 1e6,
        "worker_cpu_with_children_us_per_job": (cpu1 - cpu0) / jobs * 1e6,
        # The whole process tree (worker + children), for workers whose jobs run in
        # child processes; its RSS is the sum at the N-th job.
        "tree_cpu_us_per_job": (tree1 - tree0) / jobs * 1e6,
        "tree_rss_mb": tree_rss / 1024,
        "worker_thread_cpu_us_per_job": thread_cpu_us_per_job(run.workdir, jobs),
        "broker_cpu_us_per_job": (bcpu1 - bcpu0) / jobs * 1e6 if broker.pid else None,
        "peak_rss_mb": hwm / 1024,
        "rss_mb": rss / 1024,
        "sampled_marks": sampled,
    }


def _sample_marks(run: Run, watch: QueueWatch, pid: int, sampled: list) -> None:
    """VmRSS of the worker when the jobs handed out pass the next mark."""
    taken = run.n - watch.ready()
    while len(sampled) < len(run.marks) and taken >= run.marks[len(sampled)]:
        sampled.append({"count": run.marks[len(sampled)], "time": time.time(),
                        "vmrss_mb": status_kb(pid, "VmRSS") / 1024})


def _first(contender: Contender, run: Run, watch: QueueWatch | None,
           proc: subprocess.Popen) -> tuple[int, float] | None:
    if watch is None:
        text = _read(run.workdir / "first")
        if text is None:
            return None
        pid, stamp = text.split()
        return int(pid), float(stamp)
    # prefetch 1: the ready count drops by one when the first job is handed out
    return (proc.pid, time.time()) if watch.ready() < run.n else None


def _done(contender: Contender, run: Run, watch: QueueWatch | None) -> float | None:
    if watch is None:
        text = _read(run.workdir / "done")
        return float(text) if text is not None else None
    # prefetch 1: at most one job (a /bin/true, about a millisecond) is still running
    return time.time() if watch.ready() == 0 else None


def _await_unacked_zero(broker: BrokerHandle, url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = broker.unacked(url, QUEUE)
        if not left:
            return
        time.sleep(0.2)
    raise RunFailed("jobs still unacked %.0f s after the queue emptied" % timeout)


def _progress(workdir: Path) -> list[dict[str, float]]:
    text = _read(workdir / "progress") or ""
    marks = []
    for line in text.splitlines():
        count, stamp, rss = line.split()
        marks.append({"count": int(count), "time": float(stamp), "vmrss_mb": int(rss) / 1024})
    return marks


def _stop(proc: subprocess.Popen, pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


# ----------------------------------------------------------------------- reports


def machine_info(broker: BrokerHandle) -> dict[str, str]:
    info = {"nproc": str(os.cpu_count()), "python": platform.python_version(),
            "kernel": platform.release()}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            info["cpu"] = line.split(":", 1)[1].strip()
            break
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            info["ram"] = "%.1f GiB" % (int(line.split()[1]) / 1024 / 1024)
    from importlib import metadata

    for package in ("pika", "jsonpickle", "celery", "kombu", "dramatiq"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = "not installed"
    info["rabbitmq"] = broker.version()
    info["rbit"] = RBIT_SRC["ref"]
    return info


def summarize(results: list[dict[str, Any]], table: dict[str, Contender]) -> list[dict[str, Any]]:
    rows = []
    by_name: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        by_name.setdefault(result["contender"], []).append(result)
    medians = {name: statistics.median(r["jobs_per_s"] for r in runs)
               for name, runs in by_name.items()}
    steady = {name: statistics.median(r["steady_jobs_per_s"] for r in runs)
              for name, runs in by_name.items()}
    by_round = {(r["contender"], r.get("round")): r["jobs_per_s"] for r in results}
    for name, runs in by_name.items():
        ref = table[name].reference
        # Each round runs the contenders back to back: the ratio within a round shares
        # the machine's state of that moment, which the medians across rounds do not.
        paired = [r["jobs_per_s"] / by_round[(ref, r.get("round"))] for r in runs
                  if (ref, r.get("round")) in by_round]

        def median(key: str) -> float | None:
            values = [r[key] for r in runs if r[key] is not None]
            return statistics.median(values) if values else None

        rows.append({
            "contender": name,
            "reference": ref,
            "rounds": len(runs),
            "jobs_per_s": medians[name],
            "jobs_per_s_min": min(r["jobs_per_s"] for r in runs),
            "jobs_per_s_max": max(r["jobs_per_s"] for r in runs),
            "ratio": medians[name] / medians[ref] if ref in medians else None,
            "round_ratios": paired,
            "steady_jobs_per_s": steady[name],
            "steady_ratio": steady[name] / steady[ref] if ref in steady else None,
            "startup_s": median("startup_s"),
            "worker_cpu_us_per_job": median("worker_cpu_us_per_job"),
            "worker_cpu_with_children_us_per_job": median("worker_cpu_with_children_us_per_job"),
            "broker_cpu_us_per_job": median("broker_cpu_us_per_job"),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "tree_cpu_us_per_job": median("tree_cpu_us_per_job"),
            "tree_rss_mb": max(r["tree_rss_mb"] for r in runs),
        })
    return rows


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern % value


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("contender", "jobs/s median [min-max]", "ratio", "steady jobs/s", "ratio",
              "start s", "worker us/job", "broker us/job", "peak RSS MB", "tree us/job",
              "tree RSS MB")
    lines = [header]
    for row in rows:
        lines.append((
            row["contender"],
            "%.0f [%.0f-%.0f]" % (row["jobs_per_s"], row["jobs_per_s_min"], row["jobs_per_s_max"]),
            _fmt(row["ratio"], "%.2fx"),
            "%.0f" % row["steady_jobs_per_s"],
            _fmt(row["steady_ratio"], "%.2fx"),
            "%.2f" % row["startup_s"],
            _fmt(row["worker_cpu_us_per_job"], "%.0f"),
            _fmt(row["broker_cpu_us_per_job"], "%.0f"),
            "%.1f" % row["peak_rss_mb"],
            _fmt(row.get("tree_cpu_us_per_job"), "%.0f"),
            _fmt(row.get("tree_rss_mb"), "%.1f"),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for index, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(line, widths))))
        if index == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


GOALS = [
    ("rbit-python-nostatus", "baseline-pika", 0.9),
    ("rbit-python-logsink", "baseline-pika", 0.8),
    ("rbit-shell-true", "raw-spawn-loop", 0.9),
    ("rbit-python-child-c1", "baseline-pika", 0.2),
    ("rbit-cpu20-child-c2", "rbit-cpu20-child-c1", 1.6),
]
#: (row, other row): the row must move at least as many jobs/s as the other.
VERSUS = [("rbit-python-child-c1", "celery-prefork-c1")]
#: (row, other row, goal): a feature's cost, judged round by round. The two rows differ
#: by one setting, so their difference is smaller than the noise between rounds on a
#: shared machine; each round's ratio shares that round's state, and the goal is judged
#: on the geometric mean of those ratios, printed with its ~95% interval.
PAIRED = [("rbit-python-nostatus", "rbit-python-nohistory", 0.95)]

# Student's t at 97.5% by degrees of freedom (1.96 from 60 on).
_T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31,
         9: 2.26, 10: 2.23, 12: 2.18, 15: 2.13, 20: 2.09, 30: 2.04, 40: 2.02, 60: 1.96}


def t975(df: int) -> float:
    """Student's t quantile for a two-sided 95% interval (rounded up between rows)."""
    return _T975[min((k for k in _T975 if k >= df), default=60)]


def paired_ratio(results: list[dict[str, Any]], name: str, other: str,
                 key: str = "jobs_per_s") -> dict[str, Any] | None:
    """``name``/``other`` round by round: geometric mean, ~95% interval, the ratios."""
    by_round: dict[Any, dict[str, float]] = {}
    for result in results:
        by_round.setdefault(result.get("round"), {})[result["contender"]] = result[key]
    ratios = [pair[name] / pair[other] for pair in by_round.values()
              if pair.get(name) and pair.get(other)]
    if len(ratios) < 2:
        return None
    logs = [math.log(ratio) for ratio in ratios]
    mean = statistics.mean(logs)
    half = t975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return {"ratio": math.exp(mean), "low": math.exp(mean - half),
            "high": math.exp(mean + half), "rounds": ratios}


def format_paired(results: list[dict[str, Any]]) -> str:
    lines = []
    for name, other, goal in PAIRED:
        jobs = paired_ratio(results, name, other)
        if jobs is None:
            continue
        cpu = paired_ratio(results, name, other, "worker_cpu_us_per_job")
        lines.append("%s >= %.2fx %s, round by round: %.3fx (95%% interval %.3f-%.3f, "
                     "%d rounds; worker CPU per job %.3fx) -> %s"
                     % (name, goal, other, jobs["ratio"], jobs["low"], jobs["high"],
                        len(jobs["rounds"]), cpu["ratio"] if cpu else float("nan"),
                        "met" if jobs["ratio"] >= goal else "NOT met"))
    return "\n".join(lines)


def format_goals(rows: list[dict[str, Any]]) -> str:
    by_name = {row["contender"]: row for row in rows}
    lines = []
    for name, ref, goal in GOALS:
        row = by_name.get(name)
        if row is None or row["ratio"] is None:
            continue
        met = "met" if row["ratio"] >= goal else "NOT met"
        rounds = " ".join("%.2f" % ratio for ratio in row["round_ratios"])
        lines.append("%s >= %.1fx %s: %.2fx (steady-state %.2fx; rounds %s) -> %s"
                     % (name, goal, ref, row["ratio"], row["steady_ratio"], rounds, met))
    for name, other in VERSUS:
        if name in by_name and other in by_name:
            mine, theirs = by_name[name]["jobs_per_s"], by_name[other]["jobs_per_s"]
            lines.append("%s >= %s: %.0f vs %.0f jobs/s -> %s"
                         % (name, other, mine, theirs, "met" if mine >= theirs else "NOT met"))
    for name in ("rbit-python-nostatus", "rbit-python-logsink", "rbit-shell-true"):
        if name in by_name:
            rss = by_name[name]["peak_rss_mb"]
            lines.append("%s peak RSS <= 40 MB: %.1f MB -> %s"
                         % (name, rss, "met" if rss <= 40 else "NOT met"))
    return "\n".join(lines)


def format_machine(info: dict[str, str]) -> str:
    return "\n".join("%-12s %s" % (key + ":", value) for key, value in info.items())


# ------------------------------------------------------------------------ modes


def run_rounds(broker: BrokerHandle, chosen: list[Contender], n: int, rounds: int) -> list[dict]:
    results = []
    for round_no in range(1, rounds + 1):
        # Reversed every other round: no row always runs just after the same one.
        for contender in (chosen if round_no % 2 else chosen[::-1]):
            print("round %d/%d: %s ..." % (round_no, rounds, contender.name), end=" ", flush=True)
            result = measure(contender, broker, contender.jobs or n)
            result["round"] = round_no
            results.append(result)
            threads = ", ".join("%s %.0f" % item
                                for item in result["worker_thread_cpu_us_per_job"].items())
            print("%.0f jobs/s (steady %.0f), worker %.0f us/job [%s], RSS %.1f MB; "
                  "tree %.0f us/job, %.1f MB"
                  % (result["jobs_per_s"], result["steady_jobs_per_s"],
                     result["worker_cpu_us_per_job"], threads, result["peak_rss_mb"],
                     result["tree_cpu_us_per_job"], result["tree_rss_mb"]),
                  flush=True)
    return results


def run_rss_long(broker: BrokerHandle, table: dict[str, Contender], n: int) -> str:
    marks = (1000, 20_000, 50_000, 100_000, 150_000, n)
    lines = ["rbit python! noop (statuses off), %d jobs; VmRSS when the count passed:" % n]
    data = {}
    for name in ("rbit-python-nostatus", "rbit-python-logsink", "rbit-shell-true"):
        print("rss-long: %s with %d jobs ..." % (name, n), flush=True)
        result = measure(table[name], broker, n, marks=marks)
        data[name] = result
        lines.append("")
        lines.append("%s (%.0f jobs/s, peak RSS %.1f MB)" % (name, result["jobs_per_s"],
                                                           result["peak_rss_mb"]))
        by_count = {m["count"]: m["vmrss_mb"] for m in result["marks"]}
        for mark in result["marks"]:
            lines.append("  %7d jobs: VmRSS %.1f MB" % (mark["count"], mark["vmrss_mb"]))
        if 20_000 in by_count and n in by_count:
            growth = by_count[n] / by_count[20_000] - 1
            lines.append("  growth %d -> %d: %+.1f%% -> goal (within 10%%) %s" % (
                20_000, n, growth * 100, "met" if abs(growth) <= 0.10 else "NOT met"))
    lines[0] = "RSS over a long run (N=%d)" % n
    (RESULTS / "rss-long.json").write_text(json.dumps(data, indent=2))
    return "\n".join(lines)


PROFILE_WRAPPER = BENCH / "profile_rbit.py"


PROFILED = ("rbit-python-nostatus", "rbit-python-logsink", "rbit-shell-true")


def run_profile(broker: BrokerHandle, table: dict[str, Contender], n: int,
                names: tuple[str, ...] = PROFILED) -> str:
    out = []
    # /bin/true jobs are slow: a shorter run profiles them well enough.
    for name in names:
        jobs = min(n, 5000) if "shell" in name else n
        contender = table[name]
        prof_path = RESULTS / ("profile-%s.txt" % name)
        wrapped = dataclasses.replace(
            contender,
            command=lambda run, prof_path=prof_path: [
                sys.executable, str(PROFILE_WRAPPER), str(prof_path), str(run.n),
                str(run.workdir / "rbit.ini")])
        print("profile (cProfile, CPU clock per thread): %s ..." % name, flush=True)
        result = measure(wrapped, broker, jobs)
        out.append("%s under cProfile: %.0f jobs/s -> %s" % (name, result["jobs_per_s"], prof_path))
    py_spy = shutil.which("py-spy") or (str(VENV / "bin" / "py-spy")
                                         if (VENV / "bin" / "py-spy").exists() else None)
    if py_spy:
        for name in [x for x in ("rbit-python-nostatus", "rbit-python-logsink") if x in names]:
            flame = RESULTS / ("py-spy-%s.txt" % name)
            print("profile (py-spy): %s ..." % name, flush=True)
            try:
                result = measure(table[name], broker, n, stop_worker_pid=True,
                                 command_prefix=[py_spy, "record", "--format", "raw",
                                                 "--rate", "1000", "--output", str(flame),
                                                 "--"])
            except RunFailed as exc:
                out.append("py-spy failed: %s" % str(exc).splitlines()[-1:])
                continue
            summary = RESULTS / ("py-spy-%s-top.txt" % name)
            summary.write_text(py_spy_top(flame, n))
            out.append("%s under py-spy: %.0f jobs/s -> %s" % (name, result["jobs_per_s"], summary))
    return "\n".join(out)


def py_spy_top(raw: Path, n: int, rate: int = 1000, top: int = 40) -> str:
    """Self and inclusive samples per function from py-spy's collapsed stacks."""
    self_samples: dict[str, int] = {}
    incl: dict[str, int] = {}
    threads: dict[str, int] = {}
    total = 0
    if not raw.exists():
        return "no py-spy output\n"
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        samples = int(count)
        total += samples
        threads[frames[0]] = threads.get(frames[0], 0) + samples
        self_samples[frames[-1]] = self_samples.get(frames[-1], 0) + samples
        for frame in set(frames[1:]):
            incl[frame] = incl.get(frame, 0) + samples
    us = 1e6 / rate / n
    lines = ["py-spy, %d samples at %d Hz (active threads only), N=%d" % (total, rate, n),
             "", "per thread (us/job):"]
    for name, count in sorted(threads.items(), key=lambda kv: -kv[1]):
        lines.append("  %8.1f  %s" % (count * us, name))
    lines += ["", "inclusive (us/job):"]
    for name, count in sorted(incl.items(), key=lambda kv: -kv[1])[:top]:
        lines.append("  %8.1f  %s" % (count * us, name))
    lines += ["", "self (us/job):"]
    for name, count in sorted(self_samples.items(), key=lambda kv: -kv[1])[:top]:
        lines.append("  %8.1f  %s" % (count * us, name))
    return "\n".join(lines) + "\n"


def setup_venv() -> int:
    if not (VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "pip"), "install", "-q", "-r",
                    str(BENCH / "requirements.txt")], check=True)
    print("ready: %s/bin/python bench/throughput.py" % VENV)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="jobs per run (default 20000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--only", default="", help="comma list of contenders (default: all)")
    parser.add_argument("--list", action="store_true", help="list the contenders and exit")
    parser.add_argument("--rss-long", action="store_true",
                        help="run rbit with 200000 jobs and report VmRSS at 20000 and 200000")
    parser.add_argument("--long-n", type=int, default=200_000, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true",
                        help="profile rbit (cProfile per thread; py-spy too if installed)")
    parser.add_argument("--amqp-url", default=None,
                        help="use this running broker instead of starting a private node")
    parser.add_argument("--broker-pid", type=int, default=None,
                        help="pid of the broker's beam.smp, for broker CPU with --amqp-url")
    parser.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"),
                        help="name of the result files (default: the time)")
    parser.add_argument("--rbit-ref", default=None, metavar="REV",
                        help="measure rbit as committed at REV (e.g. HEAD) instead of the "
                             "working tree")
    parser.add_argument("--setup", action="store_true",
                        help="create bench/.venv with bench/requirements.txt and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.setup:
        return setup_venv()
    table = contenders()
    if args.list:
        print("\n".join(table))
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        print("unknown contenders: %s (see --list)" % ", ".join(unknown), file=sys.stderr)
        return 2
    chosen = []
    for name in names:
        needs = table[name].needs
        if needs and _missing(needs):
            print("skipping %s: %s is not installed (run --setup and use %s/bin/python)"
                  % (name, needs, VENV), file=sys.stderr)
            continue
        chosen.append(table[name])
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.rbit_ref:
        _snapshot_rbit(args.rbit_ref)
    _byte_compile()
    broker = BrokerHandle(args.amqp_url, args.broker_pid)
    try:
        return _run_modes(args, broker, table, chosen)
    finally:
        broker.close()


def _snapshot_rbit(ref: str) -> None:
    """Export rbit/ and rbitext/ at ``ref`` to a temporary directory and use that."""
    target = Path(tempfile.mkdtemp(prefix="rbit-bench-src-"))
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "rbit", "rbitext"], cwd=ROOT,
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    RBIT_SRC.update(path=target, ref="commit %s" % commit)
    sys.path.insert(0, str(target))


def _byte_compile() -> None:
    """Byte-compile the rbit under test and the bench's runners, as ``pip install`` does.

    The contenders from the venv (pika, Celery, Dramatiq) were compiled when pip
    installed them; rbit runs from a source tree. Where ``PYTHONDONTWRITEBYTECODE`` is
    set, every rbit process would compile its ~45 modules again at start (about 0.1 s
    of CPU), a cost no installed worker pays.
    """
    import compileall

    src = Path(RBIT_SRC["path"])
    for tree in (src / "rbit", src / "rbitext"):
        if tree.is_dir():
            compileall.compile_dir(str(tree), quiet=2)
    compileall.compile_dir(str(ROOT / "bench"), maxlevels=0, quiet=2)  # not its .venv


def _missing(module: str) -> bool:
    from importlib.util import find_spec

    return find_spec(module) is None


def _run_modes(args, broker: BrokerHandle, table: dict[str, Contender],
               chosen: list[Contender]) -> int:
    info = machine_info(broker)
    report = ["machine and versions", format_machine(info), ""]
    if not (args.rss_long or args.profile) or args.only:
        results = run_rounds(broker, chosen, args.n, args.rounds)
        rows = summarize(results, table)
        report += ["N=%d jobs per run, %d interleaved rounds; ratios against the reference "
                   "row of the same run (python rows: baseline-pika; shell rows: "
                   "raw-spawn-loop). jobs/s from worker start to the N-th job done; "
                   "steady = from the first job done to the N-th." % (args.n, args.rounds),
                   "", format_table(rows), "", "goals", format_goals(rows)]
        paired = format_paired(results)
        if paired:
            report.append(paired)
        (RESULTS / ("throughput-%s.json" % args.tag)).write_text(
            json.dumps({"machine": info, "rows": rows, "runs": results}, indent=2))
    if args.rss_long:
        report += ["", run_rss_long(broker, table, args.long_n)]
    if args.profile:
        # With --only, the rbit rows chosen are profiled (the child's worker side too).
        names = tuple(c.name for c in chosen if c.name.startswith("rbit-")) if args.only else ()
        report += ["", run_profile(broker, table, args.n, names or PROFILED)]
    text = "\n".join(report) + "\n"
    (RESULTS / ("report-%s.txt" % args.tag)).write_text(text)
    print()
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
