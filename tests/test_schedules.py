"""Time schedules across a fleet: real RabbitMQ, real worker processes, real SIGKILL.

Every run of a fire leaves a file named by its job id (:mod:`schedule_runners`), so a
fire that ran twice is seen as a second file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path

import pytest
from fault_helpers import ROOT_DIR, WorkerProcess
from worker_helpers import wait_until

from rbit.amqp.schedules import StateSession
from rbit.config import load_config
from rbit.errors import BrokerError
from rbit.schedule.fire import parse_iso
from rbit.schedule.scheduler import PASS_SECONDS, Scheduler

QUEUE = "scheduled"
FIRE = re.compile(r"^tick@(.+Z)$")


def fleet_config(tmp_path: Path, url: str, out: Path, index: int, schedule: str,
                 runner: str = "python!schedule_runners:record", extra: str = "",
                 queue: str = QUEUE, target: str = f"queue = {QUEUE}") -> Path:
    path = tmp_path / f"worker{index}.ini"
    path.write_text(f"""
[rbit]
name = sched-worker-{index}
polling_time = 1
shutdown_grace = 5
state_dir = {tmp_path / f"state{index}"}

[amqp]
url = {url}
connect_timeout = 2
heartbeat = 5

[runner:{queue}]
runner = {runner}
routing_key = {queue}
out = {out}
{extra}
""" + (schedule and f"""
[schedule:tick]
{target}
body = hello
{schedule}
"""))
    return path


def fires(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if FIRE.match(p.name))


def doubles(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if ".again." in p.name)


def leader_of(workers: list[WorkerProcess]) -> WorkerProcess:
    leaders = [w for w in workers if "fired job" in w.text()]
    assert len(leaders) >= 1
    return leaders[-1]


@pytest.fixture
def fleet(tmp_path, rabbit, vhost, out):
    started: list[WorkerProcess] = []

    def start(count: int, schedule: str, **kwargs) -> list[WorkerProcess]:
        workers = []
        for _ in range(count):
            index = len(started)
            config = fleet_config(tmp_path, rabbit.url(vhost), out, index, schedule, **kwargs)
            worker = WorkerProcess(config, tmp_path / f"worker{index}.log").start()
            started.append(worker)
            workers.append(worker)
        for worker in workers:
            worker.wait_consuming(60)
        return workers

    yield start
    for worker in started:
        worker.stop()


def test_three_workers_every_2s_fire_once_per_period(fleet, out):
    workers = fleet(3, "every = 2s")
    wait_until(lambda: fires(out), 30, "a first fire")
    first = time.monotonic()
    time.sleep(30)  # the span being measured: fires are counted over it
    span = time.monotonic() - first
    ran = fires(out)
    expected = int(span / 2) + 1
    assert abs(len(ran) - expected) <= 1, (len(ran), expected)
    assert doubles(out) == []
    times = [parse_iso(FIRE.match(name)[1]) for name in ran]
    assert all(t.second % 2 == 0 and t.microsecond == 0 for t in times)
    gaps = {(b - a).total_seconds() for a, b in pairwise(times)}
    assert gaps == {2.0}, gaps  # none skipped
    assert sum("fired job" in w.text() for w in workers) >= 1
    shown = ctl(workers[0].config, "status")
    rows = [line for line in shown.splitlines() if "schedule tick: every 2s" in line]
    assert len(rows) == 3, shown
    assert sum("\tleader\t" in row for row in rows) == 1, shown
    (lead,) = [row for row in rows if "\tleader\t" in row]
    assert re.search(r"last fire: \S+Z\tnext fire: \S+Z", lead), lead
    # Fires are ordinary jobs: in the job history of the workers that ran them.
    history = ctl(workers[0].config, "history", QUEUE, "--depth", "100")
    shown = set(re.findall(r"(tick@\S+Z)\tDone", history))
    assert set(ran) <= shown, (ran, history)


def ctl(config: Path, *command: str) -> str:
    done = subprocess.run([sys.executable, "-m", "rbit", "ctl", str(config), *command,
                           "--timeout", "10"], capture_output=True, timeout=60, check=False,
                          cwd=ROOT_DIR, env={**os.environ, "PYTHONPATH": str(ROOT_DIR)})
    assert done.returncode == 0, done.stderr
    return done.stdout.decode()


def test_sigkill_the_leader_the_next_leader_fires_without_doubles_or_gaps(fleet, out):
    # The jobs run on a worker of their own: killing the leader must not kill a running
    # job too, whose redelivery (at-least-once, by design) would run a fire id twice.
    fleet(1, "")
    # catch_up = all: a fire time missed during the hand-over must still fire.
    workers = fleet(3, "every = 2s\ncatch_up = all", queue="idle",
                    target=f"exchange =\nrouting_key = {QUEUE}")
    wait_until(lambda: len(fires(out)) >= 3, 30, "three fires")
    victim = leader_of(workers)
    victim.kill()
    killed_at = datetime.now(UTC)
    # The documented bound: the socket of a killed process closes at once, so the next
    # consumer is active at once and fires within a pass; allow for a loaded machine.
    bound = 2 + PASS_SECONDS + 5
    wait_until(lambda: any(parse_iso(FIRE.match(n)[1]) > killed_at for n in fires(out)),
               bound, "a fire after the leader was killed")
    wait_until(lambda: len(fires(out)) >= 10, 40, "ten fires")
    ran = fires(out)
    times = [parse_iso(FIRE.match(name)[1]) for name in ran]
    gaps = {(b - a).total_seconds() for a, b in pairwise(times)}
    assert doubles(out) == []
    assert gaps == {2.0}, gaps  # none skipped
    survivors = [w for w in workers if w is not victim]
    assert any("fired job" in w.text() for w in survivors)


def test_next_job_chain_runs_at_the_times_the_jobs_name(fleet, out):
    fleet(2, "next = job\nfirst = 1s", runner="python!schedule_runners:record_then_next",
          extra="next_delay = 1")
    wait_until(lambda: len(fires(out)) >= 4, 40, "four chained fires")
    times = [parse_iso(FIRE.match(name)[1]) for name in fires(out)]
    gaps = [(b - a).total_seconds() for a, b in pairwise(times)]
    assert all(gap >= 1.0 for gap in gaps), gaps
    assert doubles(out) == []


def test_shell_runner_names_its_next_run_on_the_status_fd(fleet, out, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text('#!/bin/sh\ntouch "$0.d/$1"\necho "Next 1" >&$RBIT_STATUS_FD\n')
    script.chmod(0o755)
    (tmp_path / "job.sh.d").mkdir()
    # The job runs on a worker without the schedule: its answer still reaches the leader.
    fleet(1, "", runner=f"shell!{script} %ID")
    fleet(1, "next = job", queue="idle", target=f"exchange =\nrouting_key = {QUEUE}")
    runs = tmp_path / "job.sh.d"
    wait_until(lambda: len(list(runs.iterdir())) >= 3, 40, "three runs")
    names = sorted(p.name for p in runs.iterdir())
    assert all(FIRE.match(name) for name in names), names


# --- one scheduler in this process, on the real broker, with an injected clock --------


class FakeClock:
    """The time the schedulers see; the test moves it."""

    def __init__(self, now: str) -> None:
        self.now = parse_iso(now)

    def __call__(self) -> datetime:
        return self.now

    def set(self, now: str) -> None:
        self.now = parse_iso(now)


def scheduler_settings(tmp_path: Path, url: str, schedule: str, rbit: str = "",
                       exchange: str | None = ""):
    """A config with schedule ``nightly`` for queue ``nightly``: through ``exchange``, or
    (None) as a runner section's queue, named by ``queue =`` alone."""
    target = (f"exchange = {exchange}\nrouting_key = nightly" if exchange is not None
              else "queue = nightly")
    runner = ("" if exchange is not None
              else "[runner:nightly]\nrunner = python!worker_runners:succeed\n")
    path = tmp_path / "scheduler.ini"
    path.write_text(f"""
[rbit]
name = in-process
{rbit}

[amqp]
url = {url}
connect_timeout = 2

{runner}
[schedule:nightly]
{target}
body = build
{schedule}
""")
    return load_config(str(path))


@pytest.fixture
def target(amqp):
    amqp.channel.queue_declare("nightly", durable=True)
    return amqp


def taken(amqp, queue: str = "nightly") -> list[tuple[str, dict]]:
    """(message id, headers) of every message now in ``queue``, taken."""
    found = []
    while (got := amqp.get(queue)) is not None:
        found.append((got[1].message_id, got[1].headers or {}))
    return found


@contextlib.contextmanager
def scheduler(settings, clock, **kwargs):
    running = Scheduler(settings, clock=clock, **kwargs)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def leading(running: Scheduler) -> bool:
    return running.status()[0]["role"] == "leader"


def wait_fires(amqp, count: int, timeout: float = 20.0) -> list[tuple[str, dict]]:
    found: list[tuple[str, dict]] = []
    wait_until(lambda: found.extend(taken(amqp)) or len(found) >= count, timeout,
               f"{count} fire(s)")
    return found


def test_cron_fires_at_its_local_time_across_dst_with_an_injected_clock(tmp_path, rabbit,
                                                                        vhost, target):
    settings = scheduler_settings(tmp_path, rabbit.url(vhost),
                                  "cron = 0 3 * * *\ntimezone = Europe/Berlin")
    clock = FakeClock("2026-03-28T12:00:00Z")
    with scheduler(settings, clock) as running:
        wait_until(lambda: running.status()[0]["next_fire"], 20, "a leader")
        assert running.status()[0]["next_fire"] == "2026-03-29T01:00:00Z"  # 03:00 CEST
        assert taken(target) == []
        clock.set("2026-03-29T01:00:00.2Z")
        ((job_id, headers),) = wait_fires(target, 1)
        assert job_id == "nightly@2026-03-29T01:00:00Z"
        assert headers["x-schedule"] == "nightly"
        clock.set("2026-04-01T09:00:00Z")  # three nights missed: catch_up = once
        ((job_id, _),) = wait_fires(target, 1)
        assert job_id == "nightly@2026-04-01T01:00:00Z"
        wait_until(lambda: running.status()[0]["next_fire"] == "2026-04-02T01:00:00Z", 10,
                   "the next night")
        assert taken(target) == []


def test_next_job_fires_first_then_when_the_job_said(tmp_path, rabbit, vhost, target):
    settings = scheduler_settings(tmp_path, rabbit.url(vhost),
                                  "next = job\nfirst = 2026-01-01T06:00:00+00:00")
    clock = FakeClock("2026-01-01T05:00:00Z")

    def publish(exchange, routing_key, body, on_confirm):
        target.channel.basic_publish(exchange, routing_key, body, mandatory=True)
        on_confirm(True)

    with scheduler(settings, clock, publish=publish) as running:
        wait_until(lambda: running.status()[0]["next_fire"] == "2026-01-01T06:00:00Z", 20,
                   "the first run's time")
        clock.set("2026-01-01T06:00:01Z")
        ((job_id, _),) = wait_fires(target, 1)
        assert job_id == "nightly@2026-01-01T06:00:00Z"
        wait_until(lambda: running.status()[0]["next_fire"] is None, 10, "waiting for the job")
        running.send_next(job_id, parse_iso("2026-01-03T00:00:00Z"))
        wait_until(lambda: running.status()[0]["next_fire"] == "2026-01-03T00:00:00Z", 20,
                   "the run the job named")
        clock.set("2026-01-03T00:00:00Z")
        ((job_id, _),) = wait_fires(target, 1)
        assert job_id == "nightly@2026-01-03T00:00:00Z"


class Crash:
    """Makes the next session die at one step of a leader's write, once."""

    def __init__(self, step: str) -> None:
        self.step = step
        self.armed = False
        self.done = threading.Event()

    def session(self, settings):
        crash = self

        class Dying(StateSession):
            def put_state(self, queue: str, body: bytes) -> None:
                if crash.hit("put_state", body):
                    self.die()
                super().put_state(queue, body)
                if crash.hit("ack", body):
                    self.die()

            def die(self) -> None:
                crash.armed = False
                crash.done.set()
                self._connection.close()  # as a killed process's socket: tokens requeued
                raise BrokerError("simulated crash")

        return lambda: Dying(settings.amqp, "dying scheduler")

    def hit(self, step: str, body: bytes) -> bool:
        return self.armed and step == self.step and json.loads(body)["seq"] > 0


@pytest.mark.parametrize(("step", "exchange", "copies", "queue_type"), [
    # Dead after the fire, before its record: the fire's copy in the state queue (same
    # publish) tells the next leader it was published; it is not published again.
    ("put_state", "", 1, "classic"),
    ("put_state", "", 1, "quorum"),
    # A runner section's queue (queue = alone): published straight to it, with a copy.
    ("put_state", None, 1, "quorum"),
    # A fire to a named exchange leaves no copy: the next leader publishes it again,
    # with the same id (a duplicate message, never a lost fire).
    ("put_state", "jobs", 2, "classic"),
    # Dead after the record, before the old token's ack: two tokens; the newer wins.
    ("ack", "", 1, "classic"),
    ("ack", "", 1, "quorum"),  # a cluster's state queue
])
def test_a_leader_dying_mid_write_hands_over_without_losing_a_fire(
        tmp_path, rabbit, vhost, target, step, exchange, copies, queue_type):
    if exchange:
        target.channel.exchange_declare(exchange, "direct", durable=True)
        target.channel.queue_bind("nightly", exchange, "nightly")
    settings = scheduler_settings(tmp_path, rabbit.url(vhost), "every = 1h",
                                  rbit=f"queue_type = {queue_type}", exchange=exchange)
    clock = FakeClock("2026-01-01T00:30:00Z")
    crash = Crash(step)
    with scheduler(settings, clock, session_factory=crash.session(settings)) as first:
        wait_until(lambda: leading(first), 20, "the first leader")
        with scheduler(settings, clock) as second:
            wait_until(lambda: second.status()[0]["role"] == "follower", 20, "a follower")
            crash.armed = True
            clock.set("2026-01-01T01:00:00Z")
            assert crash.done.wait(20)
            wait_until(lambda: leading(second), 20, "the hand-over")
            ids = [job_id for job_id, _ in wait_fires(target, copies)]
            wait_until(lambda: second.status()[0]["last_fire"] == "2026-01-01T01:00:00Z", 20,
                       "the fire recorded")
            ids += [job_id for job_id, _ in taken(target)]
            assert ids == ["nightly@2026-01-01T01:00:00Z"] * copies
            clock.set("2026-01-01T02:00:00Z")
            assert [job_id for job_id, _ in wait_fires(target, 1)] == [
                "nightly@2026-01-01T02:00:00Z"]


class Refusals:
    """Sessions that tell when the broker refused a fire (nacked its publish)."""

    def __init__(self) -> None:
        self.refused = threading.Event()

    def session(self, settings):
        refusals = self

        class Watched(StateSession):
            def publish_job(self, *args, **kwargs) -> None:
                try:
                    super().publish_job(*args, **kwargs)
                except BrokerError:
                    refusals.refused.set()
                    raise

        return lambda: Watched(settings.amqp, "watched scheduler")


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_a_fire_its_queue_refused_is_fired_again_though_its_copy_reached_the_state_queue(
        tmp_path, rabbit, vhost, amqp, queue_type):
    # The fire's queue is full and rejects publishes while the state queue takes the
    # fire's copy: the broker nacks the publish, as a cluster's queue still electing its
    # leader does. The leader gives the token up; the copy must not pass for the fire.
    amqp.channel.queue_declare("nightly", durable=True, arguments={
        "x-max-length": 1, "x-overflow": "reject-publish"})
    amqp.channel.basic_publish("", "nightly", b"filler")
    settings = scheduler_settings(tmp_path, rabbit.url(vhost), "every = 1h",
                                  rbit=f"queue_type = {queue_type}")
    clock = FakeClock("2026-01-01T00:30:00Z")
    refusals = Refusals()
    with scheduler(settings, clock, session_factory=refusals.session(settings)) as running:
        wait_until(lambda: leading(running), 20, "a leader")
        clock.set("2026-01-01T01:00:00Z")
        assert refusals.refused.wait(20)
        _method, _props, body = amqp.get("nightly")
        assert body == b"filler"  # room for the fire now
        ((job_id, _),) = wait_fires(amqp, 1)
        assert job_id == "nightly@2026-01-01T01:00:00Z"
        wait_until(lambda: running.status()[0]["last_fire"] == "2026-01-01T01:00:00Z", 20,
                   "the fire recorded")
        assert taken(amqp) == []  # published once
