"""Job statuses reach an AMQP watcher and a PyBit-style HTTP front-end."""

from __future__ import annotations

import base64
import socket
import urllib.parse
from datetime import datetime

from worker_helpers import running_worker, wait_until, write_config

QUEUE = "statuses"


def _config(tmp_path, rabbit, vhost, out, func="succeed", status=None, **keys):
    runner = {"runner": f"python!worker_runners:{func}", "outdir": out, **keys}
    return write_config(tmp_path, rabbit.url(vhost), {QUEUE: runner},
                        status=status or {"sinks": "log, amqp"})


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_amqp_watcher_sees_building_then_done_as_json(tmp_path, rabbit, vhost, amqp, out):
    watcher = amqp.watch("rbit.status", "#")
    config = _config(tmp_path, rabbit, vhost, out)
    with running_worker(config):
        amqp.publish_jobs(["job-1"], exchange="", routing_key=QUEUE)
        events = watcher.wait_for("job-1", "Done")

    assert [e["status"] for e in events] == ["Building", "Done"]
    for event in events:
        # The final status carries what the job used (rbit.usage).
        usage = {"usage"} if event["status"] == "Done" else set()
        assert set(event) == {"job_id", "status", "message", "worker", "queue", "time",
                              "routing_key"} | usage
        assert event["worker"] == "test-worker"
        assert event["queue"] == QUEUE
        assert event["routing_key"] == f"{QUEUE}.{event['status']}"
        datetime.fromisoformat(event["time"])
    assert events[0]["time"] <= events[1]["time"]


def test_http_front_end_gets_a_put_per_status_with_basic_auth(
        tmp_path, rabbit, vhost, amqp, out, http_server):
    status = {"sinks": "http", "http_url": http_server.url, "http_user": "pybit",
              "http_password": "s3cret"}
    config = _config(tmp_path, rabbit, vhost, out, status=status)
    with running_worker(config):
        amqp.publish_jobs(["job-7"], exchange="", routing_key=QUEUE)
        requests = http_server.wait_for(2, timeout=15)

    assert [(r.method, r.path) for r in requests] == [("PUT", "/job/job-7")] * 2
    assert [urllib.parse.parse_qs(r.body.decode()) for r in requests] == [
        {"status": ["Building"], "client": ["test-worker"]},
        {"status": ["Done"], "client": ["test-worker"]}]
    expected = "Basic " + base64.b64encode(b"pybit:s3cret").decode()
    assert all(r.header("Authorization") == expected for r in requests)


def test_http_front_end_down_neither_fails_nor_blocks_jobs(
        tmp_path, rabbit, vhost, amqp, out):
    status = {"sinks": "http", "http_url": f"http://127.0.0.1:{_closed_port()}",
              "http_timeout": 1}
    config = _config(tmp_path, rabbit, vhost, out, status=status)
    with running_worker(config):
        amqp.publish_jobs([f"j{n}" for n in range(5)], exchange="", routing_key=QUEUE)
        wait_until(lambda: (out / "runs").exists()
                   and len((out / "runs").read_text().split()) == 5, 15, "five jobs run")
        wait_until(lambda: rabbit.list_queues(vhost)[QUEUE] == (0, 0), 10, "all acked")
    assert rabbit.list_queues(vhost)[f"{QUEUE}.dead"] == (0, 0)


def test_unknown_status_name_fails_the_job_with_a_clear_message(
        tmp_path, rabbit, vhost, amqp, out):
    watcher = amqp.watch("rbit.status", "#")
    config = _config(tmp_path, rabbit, vhost, out, func="bad_status", max_retries=0)
    with running_worker(config):
        amqp.publish_jobs(["bad"], exchange="", routing_key=QUEUE)
        events = watcher.wait_for("bad", "Failed")
        wait_until(lambda: rabbit.list_queues(vhost)[f"{QUEUE}.dead"] == (1, 0), 10,
                   "the job in the dead letters")
    failed = events[-1]
    assert failed["status"] == "Failed"
    assert "unknown status 'Exploded'" in failed["message"]
    assert "Building" in failed["message"]  # the valid names are listed
    assert rabbit.list_queues(vhost)[QUEUE] == (0, 0)


def test_a_runner_that_ends_on_uploaded_is_not_moved_back_to_done(
        tmp_path, rabbit, vhost, amqp, out):
    watcher = amqp.watch("rbit.status", "#")
    config = _config(tmp_path, rabbit, vhost, out, func="upload")
    with running_worker(config):
        amqp.publish_jobs(["job-u"], exchange="", routing_key=QUEUE)
        watcher.wait_for("job-u", "Uploaded")
        wait_until(lambda: rabbit.list_queues(vhost)[QUEUE] == (0, 0), 10, "the ack")

    # The worker has stopped and flushed its statuses: everything it said is here.
    statuses = [e["status"] for e in watcher.wait_for("job-u", "Uploaded")]
    assert statuses == ["Building", "Done", "Uploaded"]
