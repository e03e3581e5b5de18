"""Usage records, price lists and the credit events they make, without a broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rbit.config import load_config
from rbit.credit.events import CreditEvent
from rbit.credit.pricing import Pricing, default_machine_id, parse_pricing
from rbit.credit.usage_credits import credits_for, event_id, usage_events, usage_publishes
from rbit.errors import ConfigError
from rbit.usage import Usage, from_rusage, reap


def pricing(**keys: object) -> Pricing:
    return parse_pricing({k: str(v) for k, v in keys.items()}, file="f.ini",
                         section="runner:q", machine_id="m1")


def test_credits_round_half_up_then_take_the_bounds():
    per_cpu = pricing(credits_per_cpu_hour=36000)
    assert credits_for(Usage(9.0, 0.25), per_cpu) == 3  # 2.5 -> 3
    assert credits_for(Usage(9.0, 0.249), per_cpu) == 2
    bounded = pricing(credits_per_cpu_hour=36000, credits_min=4, credits_max=6)
    assert credits_for(Usage(1.0, 0.1), bounded) == 4
    assert credits_for(Usage(1.0, 10.0), bounded) == 6
    memory = pricing(credits_per_gib_hour=2, credits_per_wall_hour=1)
    # 1 GiB held for 1.5 h at 2 per GiB-hour, plus 1.5 wall hours at 1.
    assert credits_for(Usage(5400.0, 1.0, 1024 * 1024), memory) == 5  # 4.5 -> 5
    assert credits_for(Usage(5400.0, 1.0, None), memory) == 2  # memory not metered


def test_the_events_ids_depend_on_queue_job_and_command_only():
    price = pricing(credits_per_cpu_hour=3600, credits_min=1)
    first = usage_events("q", "job-1", Usage(2.0, 1.0, 500), price, now=lambda: 1.0)
    again = usage_events("q", "job-1", Usage(3.0, 2.0, 700), price, now=lambda: 2.0)
    assert [e.command for e in first] == ["alloc", "counters", "claim"]
    assert [e.id for e in first] == [e.id for e in again]
    assert len({e.id for e in first}) == 3
    assert event_id("q", "job-2", "claim") != first[2].id
    assert event_id("other", "job-1", "claim") != first[2].id
    assert first[0].args == {"slot": "job-1", "min": 1}
    assert first[1].args == {"slot": "job-1", "usage/cpu_ms": 1000, "usage/wall_ms": 2000,
                             "usage/max_rss_kib": 500}
    assert first[2].args == {"slot": "job-1", "machine": "m1", "credits": 1}
    # What the credit runner reads back.
    for publish, event in zip(usage_publishes("q", "job-1", Usage(2.0, 1.0, 500), price),
                              first, strict=True):
        decoded = CreditEvent.from_json(publish.body)
        assert (decoded.id, decoded.command) == (event.id, event.command) == (
            publish.message_id, json.loads(publish.body)["command"])
        assert publish.mandatory
        assert publish.persistent
        assert publish.routing_key == "rbit.credits"


@pytest.mark.parametrize(("keys", "key", "reason"), [
    ({"credits_per_cpu_hour": "-1"}, "credits_per_cpu_hour", "expected a number >= 0"),
    ({"credits_per_wall_hour": "nan"}, "credits_per_wall_hour", "expected a number >= 0"),
    ({"credits_min": "1.5"}, "credits_min", "whole number"),
    ({"credits_min": "5", "credits_max": "2"}, "credits_min", "above credits_max"),
    ({"credits_per_gib_hours": "1"}, "credits_per_gib_hours", "unknown price key"),
    ({"credits_max": "3", "credit_queue": " "}, "credit_queue", "queue name"),
])
def test_a_bad_price_list_names_file_section_key_and_reason(keys, key, reason):
    with pytest.raises(ConfigError) as caught:
        parse_pricing(keys, file="f.ini", section="runner:q", machine_id="m")
    text = str(caught.value)
    assert "f.ini" in text
    assert "runner:q" in text
    assert key in text
    assert reason in text


def test_a_section_without_prices_earns_nothing_and_keeps_credit_queue_for_its_runner(
        tmp_path):
    path = tmp_path / "w.ini"
    path.write_text("[rbit]\nname = w\nmachine_id = box-1\n[amqp]\nhost = localhost\n"
                    "[runner:a]\nrunner = shell!true\ncredit_queue = bills\n"
                    "[runner:b]\nrunner = shell!true\ncredits_per_cpu_hour = 2.5\n")
    settings = load_config(str(path))
    a, b = sorted(settings.runners, key=lambda r: r.queue)
    assert a.pricing is None
    assert a.settings["credit_queue"] == "bills"
    assert b.pricing == Pricing(per_cpu_hour=2.5, credit_queue="rbit.credits",
                                machine_id="box-1")
    assert not [w for w in settings.warnings if "credit" in w]


def test_in_a_quorum_fleet_a_missing_credit_queue_is_declared_quorum(tmp_path):
    path = tmp_path / "w.ini"
    path.write_text("[rbit]\nname = w\nmachine_id = box-1\nqueue_type = quorum\n"
                    "quorum_group_size = 3\n[amqp]\nhost = localhost\n"
                    "[runner:b]\nrunner = shell!true\ncredits_per_cpu_hour = 2.5\n")
    runner, = load_config(str(path)).runners
    publishes = usage_publishes("b", "job-1", Usage(2.0, 1.0, 500), runner.pricing)
    arguments = {publish.declare.arguments.get("x-queue-type") for publish in publishes}
    assert arguments == {"quorum"}
    assert publishes[0].declare.arguments["x-quorum-initial-group-size"] == 3


def test_machine_id_defaults_to_etc_machine_id_else_the_host_name(tmp_path):
    path = tmp_path / "machine-id"
    path.write_text("0123abcd\n")
    assert default_machine_id(str(path)) == "0123abcd"
    assert default_machine_id(str(tmp_path / "missing")) == os.uname().nodename
    ini = tmp_path / "w.ini"
    ini.write_text("[rbit]\nname = w\nmachine_id = a,b\n[amqp]\nhost = localhost\n"
                   "[runner:a]\nrunner = shell!true\n")
    with pytest.raises(ConfigError, match="machine_id"):
        load_config(str(ini))


def test_wait4_reaps_a_child_with_its_waited_for_grandchildren_cpu():
    code = ("import subprocess, sys; subprocess.call([sys.executable, '-c', "
            "'import time\\nend = time.process_time() + 0.3\\n"
            "while time.process_time() < end: pass'])")
    proc = subprocess.Popen([sys.executable, "-c", code])
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
    usage = from_rusage(1.0, reap(proc))
    assert proc.returncode == 0
    assert proc.wait() == 0
    assert usage.cpu_s >= 0.3
    assert usage.max_rss_kib > 1000
    assert reap(proc) is None  # already reaped: nothing more to tell


def test_usage_round_trips_through_the_child_protocol():
    usage = Usage(1.5, 0.25, 4096)
    assert Usage.from_dict(json.loads(json.dumps(usage.to_dict()))) == usage
    assert Usage.from_dict({"wall_s": "x"}) is None
    assert Usage.from_dict(None) is None


def test_in_thread_jobs_are_metered_even_when_nothing_but_the_log_reads_it(tmp_path):
    from rbit.message import Message
    from rbit.worker import Worker

    worker = Worker(_worker_settings(tmp_path, {"rbit": "history_depth = 0",
                                                "status": "sinks = log"}))
    try:
        outcome = worker.pools[0].runner.run(Message(body=b"{}", queue="q"),
                                             lambda *args: None)
    finally:
        worker.control.close()
        worker.broker.ioloop.close()  # never started: its wake-up socket pair
    assert outcome.usage is not None
    assert outcome.usage.wall_s > 0
    assert outcome.usage.cpu_s >= 0
    assert outcome.usage.max_rss_kib is None  # a thread's peak memory is the worker's


def _worker_settings(tmp_path, keys):
    sections = {"rbit": f"name = w\nstate_dir = {tmp_path}/st\n", "amqp": "host = 127.0.0.1\n",
                "status": "", "http": None,
                "runner": "runner = python!rbit.client:new_job_id\n"}
    for section, text in keys.items():
        sections[section] = (sections[section] or "") + text + "\n"
    ini = tmp_path / "rbit.ini"
    ini.write_text("".join(f"[{'runner:q' if name == 'runner' else name}]\n{text}"
                           for name, text in sections.items() if text is not None))
    return load_config(str(ini))
