"""Credits from usage: priced runner sections claim each Done job's credits exactly once.

Real worker processes on the real broker, with the real credit runner posting to a
real CreditPiggy-compatible HTTP server (:mod:`creditpiggy_server`): a CPU-burning
``shell!`` job at 36000 credits per CPU hour claims about 10 credits per CPU second, a
Failed job claims nothing, and a worker killed after the job's CLAIM was confirmed but
before the job was acked claims once after its restart.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from creditpiggy_server import FakeCreditPiggy
from worker_helpers import ROOT_DIR, TESTS_DIR, WorkerProcess, wait_until, write_config

from rbit.cli import ExitCode
from rbit.credit.usage_credits import FAULT_KILL_BEFORE_ACK_ENV

pytestmark = [pytest.mark.slow, pytest.mark.fault]

KEY, SECRET = "usagekey", "usagesecret"
PRICED, FAILING, CREDITS = "priced", "failing", "usage.credits"
MACHINE = "test-machine-7"
BURN = str(TESTS_DIR / "usage_burn.py")


@pytest.fixture
def server() -> Iterator[FakeCreditPiggy]:
    with FakeCreditPiggy({KEY: SECRET}) as srv:
        yield srv


def priced(command: str) -> dict[str, object]:
    return {"runner": f"shell!{{interpreter}} {{script}} {command}",
            "interpreter": sys.executable, "script": BURN, "max_retries": 0,
            "credits_per_cpu_hour": 36000, "credit_queue": CREDITS}


def credit_runner(server: FakeCreditPiggy, tmp_path: Path) -> dict[str, object]:
    return {"runner": "python!rbitext.creditpiggy:CreditRunner", "api_url": server.url,
            "api_key": KEY, "api_secret": SECRET, "batch_size": 50, "flush_interval": 0.3,
            "max_requests_per_second": 20, "seen_ids_file": tmp_path / "seen.sqlite3"}


def config_for(tmp_path: Path, url: str, server: FakeCreditPiggy, burn: float) -> Path:
    return write_config(tmp_path, url, {
        PRICED: priced(f"burn {burn}"),
        FAILING: priced("fail"),
        CREDITS: credit_runner(server, tmp_path),
    }, rbit={"name": "pricer", "machine_id": MACHINE, "shutdown_grace": 5})


def start(config: Path, **env: str) -> WorkerProcess:
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        worker = WorkerProcess(config)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    wait_until(lambda: "consuming" in worker.output or worker.proc.poll() is not None,
               60, "the worker to consume")
    return worker


def items_for(server: FakeCreditPiggy, slot: str) -> list[tuple[str, dict]]:
    return [(command, args) for command, args in server.accepted_items()
            if args.get("slot") == slot]


def test_a_cpu_burning_job_claims_about_ten_credits_per_cpu_second_and_a_failed_one_none(
        tmp_path, rabbit, vhost, amqp, server):
    worker = start(config_for(tmp_path, rabbit.url(vhost), server, burn=1.0))
    try:
        amqp.publish(b"", routing_key=FAILING, message_id="fails-1")
        amqp.publish(b"", routing_key=PRICED, message_id="burns-1")
        wait_until(lambda: server.ledger.claims, 90, "the claim to reach the credit server")
        [(slot, machine, credits)] = server.ledger.claims
        assert (slot, machine) == ("burns-1", MACHINE)
        counters = dict(items_for(server, "burns-1"))["counters"]
        cpu_ms = counters["usage/cpu_ms"]
        assert cpu_ms >= 950  # the burn itself, plus the interpreter's start
        # 36000 credits per CPU hour: 10 per CPU second, rounded half up.
        assert abs(credits - cpu_ms / 100) <= 0.51
        assert 9 <= credits <= 15
        assert counters["usage/wall_ms"] >= cpu_ms * 0.9
        assert counters["usage/max_rss_kib"] > 1000
        # The failed job (dead-lettered on its only try) was settled first: had it
        # published anything, the credit server would have it by now.
        assert items_for(server, "fails-1") == []
    finally:
        worker.kill()


def test_a_worker_killed_after_the_claim_and_before_the_ack_claims_once_after_restart(
        tmp_path, rabbit, vhost, amqp, server):
    config = config_for(tmp_path, rabbit.url(vhost), server, burn=0.2)
    # The credit runner stays out of the first run: the claim waits in its queue.
    text = config.read_text()
    config_no_runner = tmp_path / "no-credit-runner.ini"
    config_no_runner.write_text(text.split(f"[runner:{CREDITS}]")[0])
    doomed = start(config_no_runner, **{FAULT_KILL_BEFORE_ACK_ENV: "1"})
    try:
        amqp.publish(b"", routing_key=PRICED, message_id="crash-1")
        assert doomed.wait(90) == -9  # SIGKILLed itself once the credit events were confirmed
    finally:
        doomed.kill()
    queues = rabbit.list_queues(vhost)
    # The first run: its ALLOC, COUNTERS and CLAIM were confirmed (its log lines may
    # have died with it, unwritten).
    assert queues[CREDITS] == (3, 0)
    assert queues[PRICED] == (1, 0)  # never acked: back in its queue
    worker = start(config)
    try:
        wait_until(lambda: server.ledger.claims, 90, "the claim to reach the credit server")
        wait_until(lambda: rabbit.list_queues(vhost)[PRICED] == (0, 0), 60,
                   "the job to be acked")
        wait_until(lambda: rabbit.list_queues(vhost)[CREDITS] == (0, 0), 60,
                   "the credit events of both runs to be settled")
        assert [claim[:2] for claim in server.ledger.claims] == [("crash-1", MACHINE)]
        assert sorted(cmd for cmd, _ in items_for(server, "crash-1")) == [
            "alloc", "claim", "counters"]
        # It ran again after the restart and published its three events again: with
        # the same ids, or the server would have a second ALLOC and CLAIM (refused).
        assert worker.output.count("job crash-1 priced: Done") == 1
    finally:
        worker.kill()


def test_a_bad_price_is_refused_at_start_naming_file_section_key_and_reason(
        tmp_path, rabbit, vhost):
    config = write_config(tmp_path, rabbit.url(vhost), {
        PRICED: {**priced("burn 0"), "credits_per_cpu_hour": -2},
    })
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT_DIR), str(TESTS_DIR)]))
    done = subprocess.run([sys.executable, "-m", "rbit", str(config)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == ExitCode.CONFIG == 78
    assert str(config) in done.stderr
    assert f"[runner:{PRICED}]" in done.stderr
    assert "credits_per_cpu_hour" in done.stderr
    assert "expected a number >= 0" in done.stderr

    config.write_text(config.read_text().replace("credits_per_cpu_hour = -2",
                                                 "credits_per_cpu_hours = 2"))
    done = subprocess.run([sys.executable, "-m", "rbit", str(config)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == ExitCode.CONFIG
    assert "credits_per_cpu_hours" in done.stderr
    assert "unknown price key" in done.stderr
