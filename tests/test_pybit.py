"""PyBit, whole: the building client in every status, cancels, jobs cancelled while queued.

Messages are built as PyBit's front-end builds them: jsonpickle of the model classes
(doubles at PyBit's module path, ``tests/pybit/models.py``). A real HTTP server on
127.0.0.1 plays the front-end (``PUT /job/<id>``, ``GET /job/<id>/status``).
"""

from __future__ import annotations

import json
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
    Suite,
    Transport,
)
from worker_helpers import QUEUE, running_worker, wait_until, write_config

from rbit.errors import DuplicateWorker

NAME = "buildbox-1"
KILL_GRACE = 1.0


def job(job_id: int) -> Job:
    instance = PackageInstance(3, Package(7, "1.0", "col10001"), Arch(1, "any"),
                               Suite(2, "latex"), Dist(1, "cnx"), Format(4, "pdf"), True)
    return Job(job_id, instance, None)


def build_request(job_id: int, web_host: str) -> bytes:
    request = BuildRequest(job(job_id), Transport(1, "git", "https://git.example/x", None),
                           web_host)
    return request.toJson().encode()


def cancel_request(job_id: int, web_host: str) -> bytes:
    return CancelRequest(job(job_id), web_host).toJson().encode()


class FrontEnd:
    """PyBit's front-end on the test server: records PUTs, answers status lists."""

    def __init__(self, server) -> None:
        self.server = server
        self.marked: dict[str, str] = {}  # job id -> status set by the test
        server.set_handler(self._status)

    def _status(self, request):
        if request.method == "GET" and request.path.endswith("/status"):
            job_id = request.path.split("/")[-2]
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


def config(tmp_path, rabbit, vhost, http_server, command: str, **rbit):
    runner = {"runner": f"shell!{command}", "kill_grace": KILL_GRACE}
    return write_config(tmp_path, rabbit.url(vhost), {QUEUE: runner},
                        rbit={"name": NAME, **rbit},
                        status={"sinks": "log, http", "http_url": http_server.url})


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
                                                        http_server, front_end):
    path = config(tmp_path, rabbit, vhost, http_server, "sleep 1")
    with running_worker(path):
        amqp.publish(build_request(45, web_host(http_server)))
        wait_until(lambda: "Building" in front_end.statuses("45"), what="job 45 running")
        # To another client's queue (unroutable here: no one else runs), and to ours for
        # a job we do not hold.
        amqp.channel.queue_declare("other-box", exclusive=True)
        amqp.channel.queue_bind("other-box", "pybit", "other-box")
        amqp.publish(cancel_request(45, web_host(http_server)), routing_key="other-box")
        amqp.publish(cancel_request(99, web_host(http_server)), routing_key=NAME)
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
