"""Benchmark the credit front door against a real RabbitMQ.

Starts ``rbit-credit run`` on a private unix socket, then:

1. *latency*: 16 concurrent clients, one line per connection (as ``nc -U`` does),
   paced to ``--rate`` lines per second in total (default 1,000) for ``--seconds``;
   p50 / p99 / max reply latency, measured from each line's scheduled send time (so
   a stalled server cannot hide queueing delay);
2. *throughput*: the same clients as fast as they can for ``--seconds``; confirmed
   ``OK`` replies per second and the daemon's CPU time per line.

Both are printed at the end, throughput first.

Every ``OK`` is a message confirmed by the broker. The credit queue (``--queue``,
default ``rbit.bench.credits``) is deleted before the daemon starts, purged between
the two phases and deleted at the end (``--keep-events`` keeps the events of this
run): a queue grown to tens of thousands of messages slows RabbitMQ down and would
skew what follows, while a live front door's queue is kept short by the credit runner.

Usage::

    python bench/credit_frontdoor.py --amqp-url amqp://guest:guest@127.0.0.1:5672/%2F
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLIENTS = 16
PROCESSES = 4


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _delete_queue(args.amqp_url, args.queue)
    with tempfile.TemporaryDirectory(prefix="rbit-bench-", dir="/tmp") as work:
        socket_path = os.path.join(work, "credit.socket")
        daemon = _start_daemon(Path(work), socket_path, args.amqp_url, args.queue)
        try:
            _warm_up(socket_path)
            # The latency phase runs first, on a short queue: see _purge_queue.
            latencies, failed_paced = _paced(socket_path, args.rate, args.seconds)
            if not args.keep_events:
                _purge_queue(args.amqp_url, args.queue)
            cpu_before = _cpu_seconds(daemon.pid)
            ok, failed, elapsed = _throughput(socket_path, args.seconds)
            cpu = _cpu_seconds(daemon.pid) - cpu_before
            print(f"throughput: {ok / elapsed:,.0f} OK/s ({ok} OK, {failed} other, "
                  f"{CLIENTS} clients in {PROCESSES} processes, {elapsed:.1f} s); "
                  f"daemon CPU {cpu / max(ok, 1) * 1e6:.0f} us/line")
            _print_latency(latencies, failed_paced, args.rate)
        finally:
            _stop_daemon(daemon)
    if args.keep_events:
        print(f"events left in queue {args.queue!r}")
    else:
        _delete_queue(args.amqp_url, args.queue)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amqp-url", required=True, help="amqp://user:pass@host:port/vhost")
    parser.add_argument("--queue", default="rbit.bench.credits", help="credit queue name")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--rate", type=float, default=1000.0, help="paced lines per second")
    parser.add_argument("--keep-events", action="store_true",
                        help="leave this run's events in the queue")
    return parser


def _purge_queue(url: str, queue: str) -> None:
    # The throughput phase leaves tens of thousands of events behind; past 32,768 a
    # classic queue flushes its index journal to disk, and the purge of that many
    # messages is disk work too: either would land in a latency phase run after it
    # (the more so the faster the daemon). Hence latency first, then a purge, then
    # throughput. A live front door's queue is kept short by the credit runner.
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_purge(queue)
    finally:
        connection.close()


def _delete_queue(url: str, queue: str) -> None:
    import pika  # the bench talks to RabbitMQ directly only to clean up

    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        connection.channel().queue_delete(queue)
    finally:
        connection.close()


# ---------------------------------------------------------------------------------------
# The daemon


def _start_daemon(work: Path, socket_path: str, url: str, queue: str) -> subprocess.Popen:
    config = work / "credit.conf"
    config.write_text(
        f"[server]\nsocket = unix\nbind = {socket_path}\npidfile = {work}/credit.pid\n"
        f"loglevel = WARNING\nlogfile = {work}/credit.log\n"
        f"[amqp]\nurl = {url}\ncredit_queue = {queue}\n"
    )
    os.chmod(config, 0o600)  # it holds the broker password
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module, no shell
        [sys.executable, "-m", "rbit.credit.cli", "--config", str(config), "run"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    deadline = time.monotonic() + 60
    while not _answers(socket_path):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_daemon(proc)
            raise SystemExit(f"the daemon did not start (see {work}/credit.log)")
        time.sleep(0.1)
    return proc


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError:
            return False
    return True


def _stop_daemon(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------------------
# Clients


def _one_line(path: str, line: bytes) -> bool:
    """One connection, one line, like ``echo LINE | nc -U PATH``; True on ``OK``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        sock.sendall(line)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while b"\n" not in reply:
            chunk = sock.recv(64)
            if not chunk:
                break
            reply += chunk
    return reply == b"OK\n"


def _line(index: int) -> bytes:
    return f"COUNTERS,slot=bench{index % 1000},events=+1,cpu/ms=+{index % 97}\n".encode()


def _warm_up(path: str) -> None:
    for index in range(50):
        _one_line(path, _line(index))


def _throughput(path: str, seconds: float) -> tuple[int, int, float]:
    # Clients run in PROCESSES processes of CLIENTS / PROCESSES threads each, so that
    # the load generator's own GIL does not cap what the daemon is measured at.
    start = time.monotonic()
    deadline = time.time() + seconds
    with multiprocessing.Pool(PROCESSES) as pool:
        results = pool.starmap(_client_process, [(path, deadline, n) for n in range(PROCESSES)])
    ok = sum(r[0] for r in results)
    failed = sum(r[1] for r in results)
    return ok, failed, time.monotonic() - start


def _client_process(path: str, deadline: float, number: int) -> tuple[int, int]:
    counter = itertools.count(number * 10_000_000)
    lock = threading.Lock()
    totals = [0, 0]

    def client() -> None:
        ok = failed = 0
        while time.time() < deadline:
            if _one_line(path, _line(next(counter))):
                ok += 1
            else:
                failed += 1
        with lock:
            totals[0] += ok
            totals[1] += failed

    threads = [threading.Thread(target=client) for _ in range(CLIENTS // PROCESSES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return totals[0], totals[1]


def _paced(path: str, rate: float, seconds: float) -> tuple[list[float], int]:
    # The schedule (line i at start + i / rate) is shared out over PROCESSES processes
    # of CLIENTS / PROCESSES threads, like the throughput phase.
    total = int(rate * seconds)
    start = time.time() + 0.5
    args = [(path, rate, total, start, n) for n in range(PROCESSES)]
    with multiprocessing.Pool(PROCESSES) as pool:
        results = pool.starmap(_paced_process, args)
    latencies = [value for result in results for value in result[0]]
    return latencies, sum(result[1] for result in results)


def _paced_process(path: str, rate: float, total: int, start: float,
                   number: int) -> tuple[list[float], int]:
    counter = itertools.count(number, PROCESSES)
    lock = threading.Lock()
    latencies: list[float] = []
    failures = [0]

    def client() -> None:
        while True:
            with lock:
                index = next(counter)
            if index >= total:
                return
            scheduled = start + index / rate
            delay = scheduled - time.time()
            if delay > 0:
                time.sleep(delay)  # pacing: this is the schedule, not a wait for a state
            ok = _one_line(path, _line(index))
            elapsed = time.time() - scheduled
            with lock:
                if ok:
                    latencies.append(elapsed)
                else:
                    failures[0] += 1

    threads = [threading.Thread(target=client) for _ in range(CLIENTS // PROCESSES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, failures[0]


def _print_latency(latencies: list[float], failed: int, rate: float) -> None:
    if len(latencies) < 2:
        print(f"latency at {rate:,.0f} lines/s: too few OK replies ({len(latencies)})")
        return
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    print(
        f"latency at {rate:,.0f} lines/s: p50 {cuts[49] * 1000:.2f} ms, "
        f"p99 {cuts[98] * 1000:.2f} ms, max {max(latencies) * 1000:.2f} ms "
        f"({len(latencies)} OK, {failed} other)"
    )


if __name__ == "__main__":
    sys.exit(main())
