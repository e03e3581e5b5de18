"""Jobs published the PyBit way reach their runner, in consume and in poll mode."""

from __future__ import annotations

import json

import pytest
from worker_helpers import (
    QUEUE,
    connections,
    pybit_body,
    running_worker,
    wait_until,
    write_config,
)


def _pybit_config(tmp_path, rabbit, vhost, **rbit):
    out = tmp_path / "out"
    out.mkdir()
    runner = {"runner": "python!worker_runners:record_pybit", "outdir": out}
    return write_config(tmp_path, rabbit.url(vhost), {QUEUE: runner}, rbit=rbit), out


def _records(out):
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


@pytest.mark.parametrize("mode", ["consume", "poll"])
def test_pybit_build_requests_reach_the_runner_with_attribute_access(
        tmp_path, rabbit, vhost, amqp, mode):
    config, out = _pybit_config(tmp_path, rabbit, vhost, mode=mode)
    with running_worker(config, poll_time=1):
        for job_id in range(101, 106):
            amqp.publish(pybit_body(job_id, package=f"col{job_id}"))  # exchange pybit
        records = wait_until(lambda: len(_records(out)) == 5 and _records(out), 20,
                             "5 PyBit jobs run")
        wait_until(lambda: rabbit.list_queues(vhost)[QUEUE] == (0, 0), 10, "queue empty")

    assert sorted(records) == [str(n) for n in range(101, 106)]
    first = records["101"]
    assert first == {
        "job_id": "101", "queue": QUEUE, "package": "col101", "version": "1.0",
        "dist": "cnx", "arch": "any", "suite": "latex", "format": "pdf",
        "uri": "https://git.example/col101", "redelivered": False,
    }


def test_queue_is_durable_and_bound_to_the_pybit_exchange(tmp_path, rabbit, vhost):
    config, _out = _pybit_config(tmp_path, rabbit, vhost)
    with running_worker(config):
        durable = rabbit.ctl("list_queues", "-p", vhost, "-q", "--no-table-headers",
                             "name", "durable")
        bindings = rabbit.ctl("list_bindings", "-p", vhost, "-q", "--no-table-headers",
                              "source_name", "destination_name", "routing_key")
    assert f"{QUEUE}\ttrue" in durable.splitlines()
    assert f"pybit\t{QUEUE}\tcnx.any.latex.pdf" in bindings.splitlines()


def test_poll_mode_disconnects_between_passes_and_picks_up_later_jobs(
        tmp_path, rabbit, vhost, amqp):
    config, out = _pybit_config(tmp_path, rabbit, vhost, mode="poll")
    with running_worker(config, poll_time=1):
        amqp.publish(pybit_body(1))
        wait_until(lambda: (out / "1.json").exists(), 15, "the first job")
        # Between passes the worker holds no connection at all (only ours is left).
        wait_until(lambda: len(connections(rabbit, vhost)) == 1, 15,
                   "the worker to disconnect after draining")
        amqp.publish(pybit_body(2))
        amqp.publish(pybit_body(3))
        wait_until(lambda: (out / "2.json").exists() and (out / "3.json").exists(), 15,
                   "jobs published after a pass to be run by the next one")
        wait_until(lambda: len(connections(rabbit, vhost)) == 1, 15,
                   "the worker to disconnect again")
    assert rabbit.list_queues(vhost)[QUEUE] == (0, 0)


def test_consume_mode_keeps_one_connection(tmp_path, rabbit, vhost, amqp):
    config, out = _pybit_config(tmp_path, rabbit, vhost)
    with running_worker(config, poll_time=1):
        before = connections(rabbit, vhost)
        amqp.publish(pybit_body(7))
        wait_until(lambda: (out / "7.json").exists(), 15, "the job")
        after = connections(rabbit, vhost)
    assert len(before) == 2  # ours and the worker's
    assert before == after
