"""Jobs per second of 1, 2 and 4 rbit worker processes on one quorum queue of a cluster.

Run from the repository root (after ``scripts/test`` made ``.venv``)::

    .venv/bin/python bench/cluster_scale.py [--jobs 3000] [--workers 1,2,4]

It starts a three-node cluster on loopback (tests/cluster.py), and for each worker
count: a fresh vhost, N persistent jobs published to the quorum work queue (not
timed), then the workers started, each listing the nodes from another one (so they are
spread over the nodes), with the ``python!`` runner of the cluster tests (no sleep: a
job records its run in a file). The clock runs from the first job done to the N-th.
One run per count: on a shared two-core machine the figures are noisy; they show the
shape, not a capacity.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pika

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
sys.path[:0] = [str(ROOT), str(TESTS)]

from cluster import Cluster  # noqa: E402 - tests/ joins the path just above

from rbit.topology import work_queue_arguments  # noqa: E402

QUEUE = "bench_cluster"


def fill(url: str, count: int) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare(QUEUE, durable=True, arguments=work_queue_arguments(QUEUE, "quorum"))
    channel.confirm_delivery()
    for n in range(count):
        channel.basic_publish("", QUEUE, b'{"job": 1}', pika.BasicProperties(
            delivery_mode=2, message_id=f"j{n}"))
    connection.close()


def config(workdir: Path, cluster: Cluster, vhost: str, index: int, out: Path) -> Path:
    order = [(index + i) % 3 for i in range(3)]
    path = workdir / f"w{index}.ini"
    path.write_text(
        f"[rbit]\nname = bench-w{index}\nqueue_type = quorum\npolling_time = 5\n"
        f"state_dir = {workdir / f'state-{index}'}\n"
        f"[amqp]\nurl = {cluster.url(vhost, order)}\n"
        f"[runner:{QUEUE}]\nrunner = python!cluster_runners:record_job\nconcurrency = 4\n"
        f"prefetch = 50\noutdir = {out}\nworker = w{index}\n")
    return path


def run(cluster: Cluster, workdir: Path, workers: int, jobs: int) -> float:
    vhost = cluster.new_vhost()
    out = workdir / f"out-{workers}"
    out.mkdir()
    fill(cluster.nodes[0].url(vhost), jobs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    procs = [subprocess.Popen([sys.executable, "-m", "rbit",
                               str(config(workdir, cluster, vhost, i, out))],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i in range(workers)]
    try:
        first = None
        while True:
            done = len(os.listdir(out))
            if done and first is None:
                first = time.monotonic()
            if done >= jobs:
                return jobs / (time.monotonic() - first)
            time.sleep(0.05)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/cluster_scale.py")
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--workers", default="1,2,4")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="rbit-bench-cluster-"))
    cluster = Cluster(workdir / "cluster")
    cluster.start()
    try:
        print(f"{'workers':>8} {'jobs':>6} {'jobs/s':>8}")
        for count in (int(n) for n in args.workers.split(",")):
            rate = run(cluster, workdir, count, args.jobs)
            print(f"{count:>8} {args.jobs:>6} {rate:>8.0f}", flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
