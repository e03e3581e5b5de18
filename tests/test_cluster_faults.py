"""rbit on a three-node RabbitMQ cluster (tests/cluster.py), proven by losing a node.

Real worker processes, each listing the nodes in another order (so each is connected
to another node), consume a quorum work queue. The node leading that queue is stopped
(SIGTERM, a clean shutdown) or killed (SIGKILL to its VM) mid-run and started again after an
outage of :data:`OUTAGE` seconds. Every job must be done, none lost, duplicates bounded
by what was in flight, and the worker that was connected to the lost node must work
again through another node within :data:`RECOVERY_BOUND` seconds -- while the node is
still down. ``rbit ctl ping`` must reach all three workers during the outage. The
credit front door, connected through the cluster, must never answer ``OK`` for an
event that is not in the (quorum) credit queue exactly once.

The figures each run measures are printed (``-s``) and quoted in docs/cluster.rst.
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pika
import pytest
from cluster import Cluster, quorum_worker_config
from fault_helpers import WorkerProcess, wait_until
from test_credit_frontdoor_faults import Clients, Daemon, queued_ids

from rbit.control.client import main as ctl_main

# The first test also starts the cluster (about 40 s on two idle cores, minutes on
# loaded ones): more than the suite's default timeout.
pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.timeout(600)]

QUEUE = "cluster_any_build_deb"
JOBS = 2000
PREFETCH = 8
#: Six job slots (three workers, two each) at 0.1 s a job: the run lasts 35 s or more,
#: so the node is lost mid-run and the lost node's worker has work left to resume.
JOB_SECONDS = 0.1
WORKERS = 3
OUTAGE = 10.0  # seconds the lost node stays down
#: The worker that was connected to the lost node runs a job again within this many
#: seconds of the loss (measured: 2-6 s on two loaded cores; see docs/cluster.rst).
RECOVERY_BOUND = 15.0
WAIT = 120.0


def worker_config(tmp_path: Path, cluster: Cluster, vhost: str, name: str, first: int,
                  out: Path) -> Path:
    """A quorum worker whose ``url`` lists the nodes starting with node ``first``."""
    return quorum_worker_config(tmp_path, cluster, vhost, name, first, {
        f"runner:{QUEUE}": {"runner": "python!cluster_runners:record_job", "concurrency": 2,
                            "prefetch": PREFETCH, "sleep": JOB_SECONDS, "outdir": out,
                            "worker": name, "retry_delay": 1, "max_retries": 2},
    })


def runs(out: Path) -> dict[str, list[tuple[str, float]]]:
    """``{job id: [(worker, time), ...]}`` from the runner's files."""
    found = {}
    for path in out.iterdir():
        lines = path.read_text().splitlines()
        found[path.name] = [(w, float(t)) for w, t in (line.split("\t") for line in lines)]
    return found


def publish(url: str, ids: list[str]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for job_id in ids:
            channel.basic_publish("", QUEUE, b'{"job": "x"}', mandatory=True,
                                  properties=pika.BasicProperties(delivery_mode=2,
                                                                  message_id=job_id))
    finally:
        connection.close()


def ctl_ping(config: Path) -> set[str]:
    out = io.StringIO()
    ctl_main([str(config), "ping", "--json", "--timeout", "5"], out=out)
    text = out.getvalue()
    return {r["worker"] for r in json.loads(text).get("replies", [])} if text else set()


def unacked(cluster: Cluster, vhost: str) -> int:
    node = cluster.any_running()
    return sum(u for name, (_r, u) in node.list_queues(vhost).items() if name == QUEUE)


@pytest.mark.parametrize("fault", ["stop", "kill"])
def test_losing_the_leader_node_mid_run_loses_no_job_and_its_worker_resumes_in_seconds(
        cluster, tmp_path, fault):
    vhost = cluster.new_vhost()
    out = tmp_path / "out"
    out.mkdir()
    names = [f"w{n}" for n in range(1, WORKERS + 1)]
    configs = [worker_config(tmp_path, cluster, vhost, name, n, out)
               for n, name in enumerate(names)]
    workers = [WorkerProcess(config, tmp_path / f"{config.stem}.log").start()
               for config in configs]
    lost = None
    try:
        for worker in workers:
            worker.wait_consuming(60)
        wait_until(lambda: cluster.fully_replicated(vhost, QUEUE), 60,
                   "a replica of the work queue on every node")
        leader = cluster.queue_leader(vhost, QUEUE)
        lost = next(i for i, node in enumerate(cluster.nodes) if node.nodename == leader)
        victim = names[lost]  # lists the leader's node first, so is connected to it
        survivor = cluster.nodes[(lost + 1) % WORKERS]
        vm_pid = cluster.nodes[lost].vm_pid()
        # Published while the workers run (confirms one by one take a while here).
        failures: list[BaseException] = []

        def publish_all() -> None:
            try:
                publish(survivor.url(vhost), [f"job-{n:05d}" for n in range(JOBS)])
            except BaseException as exc:  # reported by the test, not lost in the thread
                failures.append(exc)

        publisher = threading.Thread(target=publish_all)
        publisher.start()
        wait_until(lambda: len(os.listdir(out)) >= JOBS // 10, WAIT, "a tenth of the jobs")

        node = cluster.nodes[lost]
        node.signal_vm(vm_pid, signal.SIGTERM if fault == "stop" else signal.SIGKILL)
        down = time.time()  # the node is gone: its connections are closed
        done_at_loss = len(os.listdir(out))
        # A job that was running on the lost connection still ends (its ack is stale):
        # only a run that ended a little later was taken through another node.
        since = down + 2 * JOB_SECONDS

        def victim_ran_since_loss() -> float | None:
            times = [t for record in runs(out).values() for w, t in record
                     if w == victim and t > since]
            return min(times) if times else None

        resumed = wait_until(victim_ran_since_loss, RECOVERY_BOUND,
                             f"{victim} to run a job through another node")
        recovery = resumed - down
        pinged = wait_until(lambda: ctl_ping(configs[(lost + 1) % WORKERS]) == set(names),
                            30, "rbit ctl ping to reach all three workers")
        assert pinged
        time.sleep(max(0.0, OUTAGE - (time.time() - down)))  # the outage's length
        publisher.join(WAIT)
        assert not failures, f"publishing failed: {failures[0]!r}"
        node.start_again()
        cluster.wait_healthy()
        wait_until(lambda: len(os.listdir(out)) >= JOBS, WAIT, "every job done")
        wait_until(lambda: unacked(cluster, vhost) == 0 and cluster.any_running()
                   .list_queues(vhost).get(QUEUE, (1, 0))[0] == 0, WAIT, "an empty queue")
    except BaseException:
        for worker in workers:  # pytest's tmp_path may be gone before anyone reads it
            print(f"\n==> {worker.log.name} <==\n{worker.text()[-4000:]}")
        raise
    finally:
        for worker in workers:
            worker.stop()
        if lost is not None and not cluster.nodes[lost].running:
            cluster.nodes[lost].start_again()

    record = runs(out)
    missing = [f"job-{n:05d}" for n in range(JOBS) if f"job-{n:05d}" not in record]
    duplicates = sum(len(r) - 1 for r in record.values())
    print(f"\n[cluster {fault}] done at the loss {done_at_loss}, "
          f"recovery {recovery:.1f} s, duplicates {duplicates}, lost {len(missing)}")
    assert missing == []
    # At most the jobs in flight at the loss: what the three workers held unacked,
    # prefetch each (a quorum queue's leader change can redeliver the others' too).
    assert duplicates <= WORKERS * PREFETCH
    assert recovery < RECOVERY_BOUND
    for worker in workers:
        assert "Traceback" not in worker.text(), worker.text()[-3000:]


def test_credit_front_door_through_the_cluster_never_answers_a_false_ok(cluster, tmp_path):
    vhost = cluster.new_vhost()
    short = Path(f"/tmp/rbit-cc-{os.getpid()}")  # AF_UNIX paths are short
    short.mkdir(exist_ok=True)
    url = cluster.url(vhost)
    queue_keys: dict[str, Any] = {"credit_queue_type": "quorum"}
    daemon = Daemon(short, url)
    daemon.config.write_text(daemon.config.read_text() + "".join(
        f"{k} = {v}\n" for k, v in queue_keys.items()))
    lost = 0  # the daemon lists node 0 first: it is connected there
    vm_pid = cluster.nodes[lost].vm_pid()
    try:
        with daemon, Clients(daemon.socket, 4) as clients:
            wait_until(lambda: clients.count("OK") >= 50, WAIT, "50 OK replies")
            wait_until(lambda: cluster.fully_replicated(vhost, "credits.faults"), 60,
                       "a replica of the credit queue on every node")
            cluster.nodes[lost].signal_vm(vm_pid, signal.SIGTERM)
            cut = time.monotonic()
            ok_at_cut = clients.count("OK")
            wait_until(lambda: clients.count("OK") >= ok_at_cut + 50, 30,
                       "OK replies again through another node")
            recovery = time.monotonic() - cut
            cluster.nodes[lost].start_again()
            cluster.wait_healthy()
            wait_until(lambda: clients.count("OK") >= ok_at_cut + 100, 30, "more OK replies")
            clients.stop()
            assert daemon.stop() == 0
        queued = queued_ids(cluster.nodes[1].url(vhost), "credits.faults")
    except BaseException:
        log = daemon.log.read_text(errors="replace") if daemon.log.exists() else ""
        lines = [line for line in log.splitlines() if "answered ER" not in line]
        print(f"\n==> {daemon.log.name} (without its ER lines) <==\n" + "\n".join(lines[-60:]))
        refused = [line for line in log.splitlines() if "answered ER" in line]
        if refused:  # why the lines were refused, and from when to when
            print(f"{len(refused)} ER lines; the first and the last three:\n"
                  + "\n".join([refused[0], *refused[-3:]]))
        print("credit queue (leader, members, online):",
              cluster.queue_members(vhost, "credits.faults"))
        raise
    finally:
        if not cluster.nodes[lost].running:
            cluster.nodes[lost].start_again()
        for child in short.iterdir():
            child.unlink()
        short.rmdir()
    ok = {event for event, (reply, _) in clients.replies.items() if reply == "OK"}
    other = {event: reply for event, (reply, _) in clients.replies.items() if reply != "OK"}
    print(f"\n[cluster credit] OK {len(ok)}, not OK {len(other)} "
          f"({sorted(set(other.values()), key=str)}), back in {recovery:.1f} s")
    assert all(queued[event] == 1 for event in ok), "an OK event is missing or doubled"
    assert max(queued.values()) == 1
    assert set(queued) <= set(clients.replies)
    assert all(reply is None or reply.startswith("ER") for reply in other.values())
