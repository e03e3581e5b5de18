"""PyBit, whole: the building client in every status, cancels, jobs cancelled while queued.

Messages are built as PyBit's front-end builds them: jsonpickle of the model classes
(doubles at PyBit's module path, ``tests/pybit/models.py``). A real HTTP server on
127.0.0.1 plays the front-end (``PUT /job/<id>``, ``GET /job/<id>/status``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.parse

import pytest
from pybit.models import (
    Arch,
    BuildRequest,
    CancelRequest,
    Dist,
    Format,
    Job,
    Package,
    PackageInstance,
    StatusRequest,
    Suite,
    Transport,
)
from worker_helpers import (
    QUEUE,
    TESTS_DIR,
    pid_alive,
    running_worker,
    wait_until,
    write_config,
)

from rbit.errors import DuplicateWorker

NAME = "buildbox-1"
KILL_GRACE = 1.0


def job(job_id: int, package: str = "col10001") -> Job:
    instance = PackageInstance(3, Package(7, "1.0", package), Arch(1, "any"),
                               Suite(2, "latex"), Dist(1, "cnx"), Format(4, "pdf"), True)
    return Job(job_id, instance, None)


def build_request(job_id: int, web_host: str, package: str = "col10001") -> bytes:
    request = BuildRequest(job(job_id, package), Transport(1, "git", "https://git.example/x", None),
                           web_host)
    return request.toJson().encode()


def cancel_request(job_id: int, web_host: str) -> bytes:
    return CancelRequest(job(job_id), web_host).toJson().encode()


def status_request(job_id: int, web_host: str) -> bytes:
    return StatusRequest(job(job_id), web_host).toJson().encode()


class FrontEnd:
    """PyBit's front-end on the test server: records PUTs, answers status lists."""

    def __init__(self, server) -> None:
        self.server = server
        self.marked: dict[str, str] = {}  # job id -> status set by the test
        self.failing: set[str] = set()  # job ids whose status list is a 500
        self.silent: set[str] = set()  # job ids whose status list comes after `release`
        self.release = threading.Event()
        server.set_handler(self._status)

    def _status(self, request):
        if request.method == "GET" and request.path.endswith("/status"):
            job_id = request.path.split("/")[-2]
            if job_id in self.failing:
                return 500, {"error": "down"}
            if job_id in self.silent:
                self.release.wait(30)  # a front-end that does not answer in time
            history = [{"job_id": job_id, "status": "Waiting"}]
            if job_id in self.marked:
                history.append({"job_id": job_id, "status": self.marked[job_id]})
            return 200, history
        return None

    def puts(self, job_id: str) -> list[dict[str, list[str]]]:
        return [urllib.parse.parse_qs(r.body.decode()) for r in self.server.requests
                if r.method == "PUT" and r.path == f"/job/{job_id}"]

    def statuses(self, job_id: str) -> list[str]:
        return [form["status"][0] for form in self.puts(job_id)]


@pytest.fixture
def front_end(http_server):
    return FrontEnd(http_server)


def config(tmp_path, rabbit, vhost, http_server, command: str | None = None, *,
           runner: dict | None = None, **rbit):
    """A worker named :data:`NAME` with the http sink; a shell! ``command`` or ``runner``."""
    runner = {"kill_grace": KILL_GRACE,
              **(runner if runner is not None else {"runner": f"shell!{command}"})}
    return write_config(tmp_path, rabbit.url(vhost), {QUEUE: runner},
                        rbit={"name": NAME, **rbit},
                        status={"sinks": "log, http", "http_url": http_server.url})


class Record:
    """The lines ``pybit_runners`` append: which job ran where, and what it saw."""

    def __init__(self, path) -> None:
        self.path = path

    def lines(self, job_id: str, event: str | None = None) -> list[dict]:
        if not self.path.exists():
            return []
        lines = [json.loads(line) for line in self.path.read_text().splitlines()]
        return [line for line in lines
                if line["job"] == job_id and event in (None, line["event"])]

    def started(self, job_id: str, timeout: float = 30) -> dict:
        return wait_until(lambda: self.lines(job_id, "started"), timeout,
                          f"job {job_id} to start")[0]


def no_job_left(rabbit, vhost) -> bool:
    """The work queue, its delay queues and its dead letters are all empty."""
    return all(counts == (0, 0) for name, counts in rabbit.list_queues(vhost).items()
               if name.startswith(QUEUE))


def web_host(http_server) -> str:
    return http_server.url.split("//", 1)[1]


def test_every_put_carries_status_and_client(tmp_path, rabbit, vhost, amqp, http_server,
                                             front_end):
    path = config(tmp_path, rabbit, vhost, http_server, "true")
    with running_worker(path):
        amqp.publish(build_request(41, web_host(http_server)))
        wait_until(lambda: "Done" in front_end.statuses("41"), what="job 41 Done")
    puts = front_end.puts("41")
    assert [p["status"][0] for p in puts] == ["Building", "Done"]
    assert all(p["client"] == [NAME] for p in puts)


def test_cancel_stops_a_running_shell_job(tmp_path, rabbit, vhost, amqp, http_server,
                                          front_end):
    marker = tmp_path / "ran"
    command = f"sh -c 'echo x >> {marker}; exec sleep 60'"
    path = config(tmp_path, rabbit, vhost, http_server, command)
    with running_worker(path):
        amqp.publish(build_request(42, web_host(http_server)))
        wait_until(lambda: "Building" in front_end.statuses("42") and marker.exists(),
                   what="job 42 running")
        sent = time.monotonic()
        amqp.publish(cancel_request(42, web_host(http_server)), routing_key=NAME)
        wait_until(lambda: "Cancelled" in front_end.statuses("42"), timeout=KILL_GRACE + 5,
                   what="job 42 Cancelled")
        assert time.monotonic() - sent < KILL_GRACE + 1
        assert front_end.statuses("42") == ["Building", "Cancelled"]
        assert all(p["client"] == [NAME] for p in front_end.puts("42"))
    assert amqp.get(QUEUE) is None  # acked, not requeued
    with running_worker(path):  # a restart: the job is not run again
        assert amqp.get(QUEUE) is None
    assert marker.read_text() == "x\n"
    assert amqp.get(f"{QUEUE}.dead") is None  # not dead-lettered


def test_job_cancelled_on_the_front_end_never_runs(tmp_path, rabbit, vhost, amqp,
                                                   http_server, front_end):
    marker = tmp_path / "ran"
    path = config(tmp_path, rabbit, vhost, http_server, f"touch {marker}")
    front_end.marked["43"] = "Cancelled"
    with running_worker(path):
        amqp.publish(build_request(43, web_host(http_server)))
        amqp.publish(build_request(44, web_host(http_server)))
        wait_until(lambda: "Done" in front_end.statuses("44"), what="job 44 Done")
        wait_until(lambda: "Cancelled" in front_end.statuses("43"), what="job 43 Cancelled")
    assert front_end.statuses("43") == ["Cancelled"]
    assert amqp.get(QUEUE) is None
    # Only job 44 ran: the marker comes from it.
    assert marker.exists()
    marker.unlink()


def test_cancel_for_another_clients_job_changes_nothing(tmp_path, rabbit, vhost, amqp,
                                                        http_server, front_end, caplog):
    caplog.set_level(logging.INFO, logger="rbit.pybit")
    gate = tmp_path / "gate"
    # Runs until the test opens the gate (30 s at most): the cancels come while it runs.
    command = (f"sh -c 'n=0; while [ ! -e {gate} ] && [ $n -lt 1500 ]; "
               "do sleep 0.02; n=$((n+1)); done'")
    path = config(tmp_path, rabbit, vhost, http_server, command)
    with running_worker(path):
        amqp.publish(build_request(45, web_host(http_server)))
        wait_until(lambda: "Building" in front_end.statuses("45"), what="job 45 running")
        # To another client's queue (unroutable here: no one else runs), and to ours for
        # a job we do not hold.
        amqp.channel.queue_declare("other-box", exclusive=True)
        amqp.channel.queue_bind("other-box", "pybit", "other-box")
        amqp.publish(cancel_request(45, web_host(http_server)), routing_key="other-box")
        amqp.publish(cancel_request(99, web_host(http_server)), routing_key=NAME)
        wait_until(lambda: "job 99: cancel requested, but this worker does not hold"
                   in caplog.text, what="the cancel for job 99 to be read")
        assert front_end.statuses("45") == ["Building"]  # still running
        gate.touch()
        wait_until(lambda: "Done" in front_end.statuses("45"), what="job 45 Done")
    assert front_end.statuses("45") == ["Building", "Done"]
    assert front_end.statuses("99") == []


def test_two_workers_with_one_name_the_second_refuses_to_start(tmp_path, rabbit, vhost,
                                                                http_server, front_end):
    path = config(tmp_path, rabbit, vhost, http_server, "true")
    with running_worker(path):
        from rbit.config import load_config
        from rbit.worker import Worker

        second = Worker(load_config(str(path)))
        with pytest.raises(DuplicateWorker, match=f"another worker named '{NAME}'"):
            second.start(timeout=20)


def test_front_end_status_list_is_plain_json(front_end, http_server):
    from rbit.pybit import FrontEnd as Checker

    front_end.marked["7"] = "Cancelled"
    checker = Checker(http_server.url, None, None, 2.0)
    assert checker.last_status("7") == "Cancelled"
    assert checker.last_status("8") == "Waiting"
    assert json.loads(json.dumps(["ok"])) == ["ok"]


def test_cancel_kills_a_warm_child_that_ignores_sigterm(tmp_path, rabbit, vhost, amqp,
                                                        http_server, front_end, monkeypatch,
                                                        caplog):
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))  # the child imports pybit_runners
    record = Record(tmp_path / "record")
    runner = {"runner": "python!pybit_runners:in_child", "record": record.path,
              "timeout": 3600, "concurrency": 1}
    path = config(tmp_path, rabbit, vhost, http_server, runner=runner)
    host = web_host(http_server)
    with running_worker(path):
        amqp.publish(build_request(46, host, package="ignore-term"))
        child = record.started("46")["pid"]
        wait_until(lambda: "Building" in front_end.statuses("46"), what="job 46 Building")
        sent = time.monotonic()
        amqp.publish(cancel_request(46, host), routing_key=NAME)
        wait_until(lambda: not pid_alive(child), timeout=KILL_GRACE + 1,
                   what="the child stopped within kill_grace + 1 s")
        wait_until(lambda: "Cancelled" in front_end.statuses("46"), timeout=15,
                   what="job 46 Cancelled")
        assert time.monotonic() - sent >= KILL_GRACE  # SIGTERM was ignored: SIGKILL did it
        assert "outlived SIGTERM; sending SIGKILL" in caplog.text
        amqp.publish(build_request(47, host))
        wait_until(lambda: "Done" in front_end.statuses("47"), what="job 47 Done")
    assert front_end.statuses("46") == ["Building", "Cancelled"]
    assert all(p["client"] == [NAME] for p in front_end.puts("46"))
    assert record.lines("47")[0]["pid"] != child  # a fresh child took the slot
    assert no_job_left(rabbit, vhost)  # acked: not requeued, not retried, not dead
    with running_worker(path):  # a restart: job 46 is not run again, job 48 is
        amqp.publish(build_request(48, host))
        wait_until(lambda: "Done" in front_end.statuses("48"), what="job 48 Done")
    assert len(record.lines("46")) == 1
    assert front_end.statuses("46") == ["Building", "Cancelled"]


def test_cancel_ends_an_in_thread_job_that_checks_message_cancelled(
        tmp_path, rabbit, vhost, amqp, http_server, front_end):
    record = Record(tmp_path / "record")
    runner = {"runner": "python!pybit_runners:until_cancelled", "record": record.path}
    path = config(tmp_path, rabbit, vhost, http_server, runner=runner)
    path.write_text(path.read_text().replace("sinks = log, http", "sinks = log, http, amqp"))
    host = web_host(http_server)
    events = amqp.watch("rbit.status")
    with running_worker(path):
        amqp.publish(build_request(50, host))
        record.started("50")
        amqp.publish(cancel_request(50, host), routing_key=NAME)
        wait_until(lambda: "Cancelled" in front_end.statuses("50"), timeout=15,
                   what="job 50 Cancelled")
        # Every sink hears it: the AMQP status events end Cancelled too.
        assert [e["status"] for e in events.wait_for("50", "Cancelled")] == [
            "Building", "Cancelled"]
    # The runner returned normally: the job is Cancelled all the same, not Done.
    assert [line["event"] for line in record.lines("50")] == ["started", "saw-cancel"]
    assert front_end.statuses("50") == ["Building", "Cancelled"]
    assert no_job_left(rabbit, vhost)  # acked, no retry waiting, nothing dead-lettered
    with running_worker(path):
        amqp.publish(build_request(51, host))
        record.started("51")
        amqp.publish(cancel_request(51, host), routing_key=NAME)
        wait_until(lambda: "Cancelled" in front_end.statuses("51"), what="job 51 Cancelled")
    assert len(record.lines("50", "started")) == 1  # not run again after a restart


def test_status_request_reports_a_running_jobs_status_again(tmp_path, rabbit, vhost, amqp,
                                                            http_server, front_end, caplog):
    caplog.set_level(logging.INFO, logger="rbit.pybit")
    record = Record(tmp_path / "record")
    runner = {"runner": "python!pybit_runners:until_cancelled", "record": record.path}
    path = config(tmp_path, rabbit, vhost, http_server, runner=runner)
    host = web_host(http_server)
    with running_worker(path):
        amqp.publish(build_request(52, host))
        record.started("52")
        wait_until(lambda: "Building" in front_end.statuses("52"), what="job 52 Building")
        # Commands are taken in order: once 52's second PUT is seen, 98's request was read.
        amqp.publish(status_request(98, host), routing_key=NAME)
        amqp.publish(status_request(52, host), routing_key=NAME)
        wait_until(lambda: front_end.statuses("52") == ["Building", "Building"],
                   what="job 52's status reported again")
        assert all(p["client"] == [NAME] for p in front_end.puts("52"))
        assert front_end.puts("98") == []
        assert "job 98: status requested, but this worker does not hold the job" in caplog.text
        amqp.publish(cancel_request(52, host), routing_key=NAME)  # ends the test's job
        wait_until(lambda: "Cancelled" in front_end.statuses("52"), what="job 52 Cancelled")
    assert front_end.statuses("52") == ["Building", "Building", "Cancelled"]


def test_cancel_skips_a_prefetched_job_when_its_turn_comes(tmp_path, rabbit, vhost, amqp,
                                                           http_server, front_end):
    record = Record(tmp_path / "record")
    runner = {"runner": "python!pybit_runners:until_cancelled", "record": record.path,
              "concurrency": 1, "prefetch": 2}
    path = config(tmp_path, rabbit, vhost, http_server, runner=runner)
    host = web_host(http_server)
    with running_worker(path):
        amqp.publish(build_request(53, host))
        amqp.publish(build_request(54, host))
        record.started("53")
        # 54 waits in this worker, not in the queue: a cancel for it finds it here.
        wait_until(lambda: rabbit.list_queues(vhost).get(QUEUE) == (0, 2),
                   what="job 54 prefetched")
        # Commands are taken in order: 54 is marked before 53 ends and 54's turn comes.
        amqp.publish(cancel_request(54, host), routing_key=NAME)
        amqp.publish(cancel_request(53, host), routing_key=NAME)
        wait_until(lambda: "Cancelled" in front_end.statuses("53"), what="job 53 Cancelled")
        wait_until(lambda: front_end.statuses("54") == ["Cancelled"],
                   what="job 54 settled Cancelled at its turn")
        amqp.publish(build_request(55, host))  # behind 54: 54 was passed over, not delayed
        record.started("55")
        amqp.publish(cancel_request(55, host), routing_key=NAME)
        wait_until(lambda: "Cancelled" in front_end.statuses("55"), what="job 55 Cancelled")
    assert record.lines("54") == []  # never ran
    assert front_end.statuses("54") == ["Cancelled"]
    assert no_job_left(rabbit, vhost)


def test_a_front_end_that_fails_or_does_not_answer_in_time_lets_the_job_run(
        tmp_path, rabbit, vhost, amqp, http_server, front_end):
    marker = tmp_path / "ran"
    path = config(tmp_path, rabbit, vhost, http_server, f"sh -c 'echo %ID >> {marker}'")
    # The check waits min(3 s, http_timeout): 1 s here.
    path.write_text(path.read_text().replace("[status]\n", "[status]\nhttp_timeout = 1\n"))
    front_end.failing.add("60")
    front_end.silent.add("61")
    try:
        with running_worker(path):
            amqp.publish(build_request(60, web_host(http_server)))
            amqp.publish(build_request(61, web_host(http_server)))
            wait_until(lambda: "Done" in front_end.statuses("61"), timeout=20,
                       what="job 61 Done while the front-end stays silent")
            assert not front_end.release.is_set()
    finally:
        front_end.release.set()
    assert front_end.statuses("60") == ["Building", "Done"]
    assert marker.read_text().split() == ["60", "61"]


def test_pybit_commands_off_means_no_command_queue(tmp_path, rabbit, vhost, amqp,
                                                   http_server, front_end):
    path = config(tmp_path, rabbit, vhost, http_server, "true", pybit_commands="no")
    with running_worker(path):
        amqp.publish(build_request(62, web_host(http_server)))
        wait_until(lambda: "Done" in front_end.statuses("62"), what="job 62 Done")
        assert NAME not in rabbit.list_queues(vhost)
    on = config(tmp_path, rabbit, vhost, http_server, "true")
    with running_worker(on):
        assert NAME in rabbit.list_queues(vhost)  # on by default with the pybit exchange
