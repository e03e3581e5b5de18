"""The control plane's parts without a broker: commands, the state store, the observer,
the controller's authorization, the config keys."""

from __future__ import annotations

import json
import os
import sqlite3
import stat

import pytest

from rbit.config import default_state_dir, load_config
from rbit.control.client import exit_code, seen_lately
from rbit.control.commands import Command, CommandError, parse
from rbit.control.handler import Controller
from rbit.control.observer import JobObserver
from rbit.control.state import INSERT_ROWS, StateStore, _usage_json
from rbit.dispatch import JobStatus
from rbit.errors import ConfigError
from rbit.message import Message
from rbit.outcome import Status
from rbit.usage import Usage


@pytest.mark.parametrize("body", [
    b"not json", b"[1]", b'{"command": "rm -rf"}', b'{"command": "ping", "x": 1}',
    b'{"command": "pause"}', b'{"command": "pause", "queue": "q", "all": true}',
    b'{"command": "history", "queue": "q", "depth": "5"}',
    b'{"command": "history", "queue": "q", "depth": 0}',
    b'{"command": "loglevel", "logger": "x", "level": "LOUD"}',
    b'{"command": "status", "verbose": 1}',
    b'{"py/object": "os.system", "command": "ping"}',
    b'{"command": "pause", "queue": "a\\nb"}',
    b"x" * 5000,
])
def test_anything_but_a_valid_command_is_refused(body):
    with pytest.raises(CommandError):
        parse(body)


def test_every_command_survives_its_own_json():
    for command in [Command("ping"), Command("status", verbose=True),
                    Command("pause", queue="q"), Command("resume", all=True),
                    Command("shutdown"), Command("loglevel", logger="rbit", level="DEBUG"),
                    Command("history", queue="q", depth=7)]:
        assert parse(command.to_json()) == command


def test_history_is_pruned_per_queue_and_survives_reopening(tmp_path):
    store = StateStore(str(tmp_path / "state"), history_depth=2)
    for n in range(4):
        store.keeper("a")((f"a{n}", "a", "Done", 1, 10.0, 11.0, 1.0, "x" * 900))
    store.keeper("b")(("b0", "b", "Failed", 3, 10.0, 12.0, 2.0, "boom"))
    store.set_paused({"a"})
    store.close()
    again = StateStore(str(tmp_path / "state"), history_depth=2)
    assert [h["job_id"] for h in again.history("a", 10)] == ["a3", "a2"]
    assert len(again.history("a", 10)[0]["message"]) == 500
    assert again.history("b", 10)[0]["status"] == "Failed"
    assert again.paused() == {"a"}
    again.close()
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "state" / "state.sqlite3").st_mode) == 0o600
    db = sqlite3.connect(tmp_path / "state" / "state.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_a_flush_larger_than_one_insert_statement_keeps_every_row_in_order(tmp_path):
    depth = INSERT_ROWS * 2 + 7
    store = StateStore(str(tmp_path / "s"), history_depth=depth)  # writer not started
    for n in range(depth + 3):  # the 3 oldest are pruned in memory already
        store.keeper("q")((f"j{n}", "q", "Done", 1, float(n), n + 0.5, 0.5, f"m{n}",
                           Usage(0.5, 0.25) if n % 2 else None))
    store.flush()
    rows = store.history("q", depth + 10)
    assert [row["job_id"] for row in rows] == [f"j{n}" for n in range(depth + 2, 2, -1)]
    assert rows[0]["usage"] == {"wall_s": 0.5, "cpu_s": 0.25, "max_rss_kib": None}
    assert rows[1]["usage"] is None
    assert rows[1]["message"] == f"m{depth + 1}"
    store.close()


@pytest.mark.parametrize("usage", [
    Usage(0.0, 0.0), Usage(1.5, 0.25), Usage(1e-7, 3.0000004, 1234),
    Usage(12345678.123456789, 1e-6, 0), Usage(float("inf"), 1.0), Usage(2.5, float("nan"), 7)])
def test_a_rows_usage_is_the_text_json_would_write(usage):
    assert _usage_json(usage) == json.dumps(usage.to_dict())


def test_recording_only_appends_in_memory(tmp_path):
    store = StateStore(str(tmp_path / "s"), history_depth=5)  # writer not started
    store.keeper("q")(("j", "q", "Done", 1, 1.0, 2.0, 1.0, ""))
    assert store._pending  # noqa: SLF001 -- nothing was written on the job's path
    store.close()


def test_observer_counts_and_records_each_fate():
    records = []
    clock = iter([100.0, 100.5, 200.0, 201.0, 300.0, 300.25]).__next__
    observer = JobObserver(lambda queue: records.append, clock=clock)
    j1, j2, j3 = (_entry(job_id) for job_id in ("j1", "j2", "j3"))
    observer.started(j1)
    assert observer.running_jobs() == [{"job_id": "j1", "queue": "q", "since": 100.0}]
    assert observer.running_count() == 1
    observer.ended(j1, Status.DONE, 1, "", False)
    observer.started(j2)
    observer.ended(j2, Status.WAITING, 1, "try 1 of 4 failed", True)
    observer.started(j3)
    observer.ended(j3, Status.FAILED, 4, "failed after 4 tries", True)
    assert observer.snapshot_counts() == {"done": 1, "failed": 2, "retried": 1,
                                          "dead_lettered": 1}
    rows = [r.history_row() for r in records]
    assert [(r[0], r[2], r[6]) for r in rows] == [
        ("j1", "Done", 0.5), ("j2", "Waiting", 1.0), ("j3", "Failed", 0.25)]
    assert observer.running_jobs() == []


def _entry(job_id):
    message = Message(b"{}", "q", message_id=job_id)
    return JobStatus(lambda *args: None, job_id, "q", message)


def test_the_observer_asks_each_queues_keeper_once_and_keeps_entries_by_queue():
    asked, kept = [], {}

    def keeper(queue):
        asked.append(queue)
        return kept.setdefault(queue, []).append

    observer = JobObserver(keeper, clock=lambda: 1.0)
    for job_id, queue in [("a1", "a"), ("b1", "b"), ("a2", "a"), ("b2", "b")]:
        job = JobStatus(lambda *args: None, job_id, queue,
                        Message(b"{}", queue, message_id=job_id))
        observer.started(job)
        observer.ended(job, Status.DONE, 1, "", False)
    assert asked == ["a", "b"]
    assert {queue: [job.job_id for job in jobs] for queue, jobs in kept.items()} == {
        "a": ["a1", "a2"], "b": ["b1", "b2"]}


def test_history_rows_are_built_from_job_entries_by_the_writer(tmp_path):
    clock = iter([100.0, 101.5]).__next__
    store = StateStore(str(tmp_path / "s"), history_depth=5)
    observer = JobObserver(store.keeper, clock=clock)
    job = _entry("j1")
    observer.started(job)
    observer.ended(job, Status.WAITING, 2, "x" * 900, True, Usage(1.5, 0.25))
    [row] = store.history("q", 5)
    assert (row["job_id"], row["status"], row["attempt"], row["duration"]) == (
        "j1", "Waiting", 2, 1.5)
    assert len(row["message"]) == 500
    assert row["usage"] == {"wall_s": 1.5, "cpu_s": 0.25, "max_rss_kib": None}
    store.close()


def test_the_observer_holds_jobs_received_for_pybit_until_they_end():
    observer = JobObserver()
    job = _entry("j1")
    observer.arrived(job.message)
    assert observer.held("j1") == [(job.message, None)]
    assert observer.running_jobs() == []
    observer.started(job)
    assert observer.held("j1") == [(job.message, job)]
    observer.ended(job, None, 1, "", False)
    assert observer.held("j1") == []
    observer.arrived(job.message)
    observer.dropped(job.message)
    assert observer.held("j1") == []


def test_a_job_settled_without_starting_is_recorded_with_no_duration():
    records = []
    observer = JobObserver(lambda queue: records.append, clock=lambda: 50.0)
    job = _entry("j1")
    observer.arrived(job.message)
    observer.ended(job, Status.CANCELLED, 1, "cancelled before it started", False)
    assert records[0].history_row()[4:7] == (50.0, 50.0, 0.0)


class _Broker:
    connected = True

    def __init__(self):
        self._paused = set()

    def paused(self):
        return frozenset(self._paused)

    def consuming(self):
        return frozenset({"q"} - self._paused)

    def pause(self, queue):
        self._paused.add(queue)

    def resume(self, queue):
        self._paused.discard(queue)


def _controller(store=None, stops=None):
    return Controller("w", ["ops"], broker=_Broker(), queues=["q"], observer=JobObserver(),
                      store=store, backlog=lambda: 3,
                      request_stop=lambda: stops.append(1) if stops is not None else None)


def test_a_command_without_an_authorized_user_id_has_no_effect(caplog):
    stops = []
    controller = _controller(stops=stops)
    for user in (None, "guest"):
        answer = json.loads(controller.handle(b'{"command": "shutdown"}', user))
        assert answer["ok"] is False
        assert "refused" in answer
    assert stops == []
    assert "control command refused" in caplog.text
    answer = json.loads(controller.handle(b'{"command": "shutdown"}', "ops"))
    assert answer == {"worker": "w", "ok": True, "command": "shutdown", "stopping": True}
    assert stops == [1]


def test_pause_of_an_unknown_queue_is_an_error_and_changes_nothing(tmp_path):
    store = StateStore(str(tmp_path / "s"))
    controller = _controller(store)
    answer = json.loads(controller.handle(b'{"command": "pause", "queue": "nope"}', "ops"))
    assert answer["ok"] is False
    assert store.paused() == set()
    answer = json.loads(controller.handle(b'{"command": "pause", "all": true}', "ops"))
    assert answer["paused"] == ["q"]
    assert store.paused() == {"q"}
    status = controller.status(verbose=True)
    assert status["queues"] == [{"queue": "q", "consuming": False, "paused": True}]
    assert status["status_backlog"] == 3
    assert status["running"] == []
    json.dumps(status)
    store.close()


def test_ctl_names_the_workers_seen_lately_and_forgets_those_that_left():
    announces = [json.dumps({"name": n, "event": e}).encode()
                 for n, e in [("a", "hello"), ("b", "hello"), ("a", "bye"), ("c", "hello")]]
    assert set(seen_lately(announces + [b"garbage", b"[]"])) == {"b", "c"}
    ok = {"worker": "b", "ok": True}
    assert exit_code({"replies": [ok], "missing": []}) == 0
    assert exit_code({"replies": [ok], "missing": [{"name": "c"}]}) == 4
    assert exit_code({"replies": [], "missing": []}) == 4
    assert exit_code({"replies": [{"worker": "b", "ok": False, "refused": "x"}],
                      "missing": []}) == 5


def _ini(tmp_path, extra):
    path = tmp_path / "w.ini"
    path.write_text("[rbit]\nname = w\n" + extra.get("rbit", "") +
                    "\n[amqp]\nuser = builder\n" + extra.get("rest", ""))
    return str(path)


def test_control_and_state_settings(tmp_path):
    settings = load_config(_ini(tmp_path, {}), environ={})
    assert settings.control.users == ("builder",)
    assert settings.state.history_depth == 100
    settings = load_config(_ini(tmp_path, {
        "rbit": f"state_dir = {tmp_path}/st\nhistory_depth = 0\n",
        "rest": "[control]\nusers = ops, admin\nenabled = no\n"}), environ={})
    assert settings.control.users == ("ops", "admin")
    assert settings.control.enabled is False
    assert settings.state.state_dir == f"{tmp_path}/st"
    assert settings.state.history_depth == 0
    assert not settings.warnings
    for extra, key in [({"rbit": "state_dir = relative\n"}, "state_dir"),
                       ({"rbit": "history_depth = -1\n"}, "history_depth"),
                       ({"rest": "[control]\nusers = ,\n"}, "users")]:
        with pytest.raises(ConfigError, match=key):
            load_config(_ini(tmp_path, extra), environ={})


def test_default_state_dir():
    assert default_state_dir("w", {"STATE_DIRECTORY": "/run/x:/run/y"}, is_root=True,
                             home="/h") == "/run/x"
    assert default_state_dir("w", {}, is_root=True, home="/h") == "/var/lib/rbit/w"
    assert default_state_dir("w", {}, is_root=False, home="/h") == "/h/.local/state/rbit/w"
