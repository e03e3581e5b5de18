"""``[schedule:NAME]`` sections: what they parse to, and the errors an operator sees.

The errors are shown by a real ``python -m rbit`` process, exit code 78 (EX_CONFIG),
before any connection (the broker address is unreachable on purpose). The leader's
decisions are checked with an injected clock: no test waits for a cron minute.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from test_config_errors import EXIT_CONFIG, HEAD, assert_config_error, run_rbit

from rbit.config import load_config
from rbit.schedule import leader
from rbit.schedule.triggers import Cron, Every, NextJob

RUNNER = """
[runner:nightly]
runner = python!schedule_runners:record
"""
UTC = UTC


def t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def load(tmp_path: Path, schedule: str):
    path = tmp_path / "worker.ini"
    path.write_text(HEAD + RUNNER + "\n[schedule:build]\n" + schedule, encoding="utf-8")
    return load_config(str(path))


@pytest.mark.parametrize(("schedule", "key", "reason"), [
    ("queue = nightly\ncron = 0 3 * *\n", "cron", "expected 5 fields"),
    ("queue = nightly\ncron = 0 25 * * *\n", "cron", "not a valid cron expression"),
    ("queue = nightly\nevery = 30x\n", "every", "unit s, m, h or d"),
    ("queue = nightly\nevery = 30s\ncron = 0 3 * * *\n", "cron",
     "one trigger per schedule, got every and cron"),
    ("queue = elsewhere\nevery = 5m\n", "queue", "no [runner:elsewhere] section"),
    ("queue = nightly\ncron = 0 3 * * *\ntimezone = Mars/Olympus\n", "timezone",
     "unknown time zone"),
    ("queue = nightly\nnext = later\n", "next", "expected 'job'"),
    ("queue = nightly\nwatch = /nonexistent/in\n", "watch", "does not exist"),
    ("queue = nightly\ncatch_up = some\nevery = 1h\n", "catch_up", "expected one of"),
])
def test_a_bad_schedule_stops_the_worker_naming_file_section_key(tmp_path, schedule, key,
                                                                   reason):
    code, stderr, path = run_rbit(tmp_path, RUNNER + "\n[schedule:build]\n" + schedule)
    assert code == EXIT_CONFIG, stderr
    assert_config_error(stderr, path, "schedule:build", key, reason)


def test_a_schedule_without_trigger_is_an_error(tmp_path):
    code, stderr, path = run_rbit(tmp_path, RUNNER + "\n[schedule:build]\nqueue = nightly\n")
    assert code == EXIT_CONFIG
    assert_config_error(stderr, path, "schedule:build", None, "no trigger")


def test_sections_parse_to_targets_bodies_headers_and_triggers(tmp_path):
    body = tmp_path / "body.json"
    body.write_text('{"a": 1}')
    settings = load(tmp_path, f"queue = nightly\nbody_file = {body}\nheader.kind = nightly\n"
                              "cron = 0  3 * * *\ntimezone = Europe/Berlin\ncatch_up = all\n")
    (schedule,) = settings.schedules
    assert (schedule.exchange, schedule.routing_key) == ("pybit", "nightly")
    assert schedule.runner_queue  # time fires go straight to the queue (fire.publish_fire)
    assert schedule.body == b'{"a": 1}'
    assert schedule.headers == {"kind": "nightly"}
    assert isinstance(schedule.trigger, Cron)
    assert schedule.catch_up == "all"
    assert str(schedule.trigger.zone) == "Europe/Berlin"
    other = load(tmp_path, "exchange = jobs\nrouting_key = a.b\nevery = 1.5h\nfirst = 2m\n")
    (schedule,) = other.schedules
    assert (schedule.exchange, schedule.routing_key, schedule.queue) == ("jobs", "a.b", None)
    assert not schedule.runner_queue
    assert schedule.trigger == Every(5400.0, "1.5h")
    assert any("'first'" in line for line in other.warnings)  # not a key of every


def every(seconds: float, catch_up: str = "once"):
    return _schedule(Every(seconds), catch_up)


def _schedule(trigger, catch_up: str = "once"):
    from rbit.schedule.settings import ScheduleSettings
    kind = {Every: "every", Cron: "cron", NextJob: "next"}[type(trigger)]
    return ScheduleSettings("s", "", "q", "q", b"", trigger, kind, catch_up)


def ids(fires) -> list[str]:
    return [fire.job_id for fire in fires]


def test_every_fires_on_the_epoch_grid_from_the_state_creation():
    schedule = every(2)
    state = leader.initial_state(schedule, t("2026-01-01T00:00:00.500"))
    assert leader.plan(schedule, state, t("2026-01-01T00:00:01.900")) == ([], state)
    fires, state = leader.plan(schedule, state, t("2026-01-01T00:00:02.010"))
    assert ids(fires) == ["s@2026-01-01T00:00:02Z"]
    assert state.last == t("2026-01-01T00:00:02")
    assert leader.plan(schedule, state, t("2026-01-01T00:00:03"))[0] == []


@pytest.mark.parametrize(("catch_up", "expected"), [
    ("all", ["s@2026-01-01T00:10:00Z", "s@2026-01-01T00:20:00Z", "s@2026-01-01T00:30:00Z"]),
    ("once", ["s@2026-01-01T00:30:00Z"]),
    ("skip", []),
])
def test_catch_up_after_an_outage(catch_up, expected):
    schedule = every(600, catch_up)
    state = leader.State(3, t("2026-01-01T00:00:00"), last=t("2026-01-01T00:00:00"))
    fires, after = leader.plan(schedule, state, t("2026-01-01T00:35:00"))
    assert ids(fires) == expected
    assert after.last == t("2026-01-01T00:30:00")  # skipped or not, never fired later


def test_skip_still_fires_a_fire_only_seconds_late_as_in_a_hand_over():
    schedule = every(600, "skip")
    state = leader.State(3, t("2026-01-01T00:00:00"), last=t("2026-01-01T00:00:00"))
    fires, _ = leader.plan(schedule, state, t("2026-01-01T00:10:03"))
    assert ids(fires) == ["s@2026-01-01T00:10:00Z"]


def test_cron_in_a_time_zone_across_the_dst_change_with_an_injected_clock():
    from zoneinfo import ZoneInfo
    schedule = _schedule(Cron("0 3 * * *", ZoneInfo("Europe/Berlin")))
    state = leader.initial_state(schedule, t("2026-03-28T12:00:00"))
    assert leader.next_fire(schedule, state) == t("2026-03-29T01:00:00")  # 03:00 CEST
    fires, state = leader.plan(schedule, state, t("2026-03-29T01:00:01"))
    assert ids(fires) == ["s@2026-03-29T01:00:00Z"]
    assert leader.next_fire(schedule, state) == t("2026-03-30T01:00:00")
    state = leader.initial_state(schedule, t("2026-01-10T12:00:00"))
    assert leader.next_fire(schedule, state) == t("2026-01-11T02:00:00")  # 03:00 CET


def test_next_job_first_run_then_only_what_the_last_job_named():
    schedule = _schedule(NextJob(first_delay=60))
    state = leader.initial_state(schedule, t("2026-01-01T00:00:00"))
    assert leader.plan(schedule, state, t("2026-01-01T00:00:59"))[0] == []
    fires, state = leader.plan(schedule, state, t("2026-01-01T00:01:00"))
    assert ids(fires) == ["s@2026-01-01T00:01:00Z"]
    assert leader.next_fire(schedule, state) is None  # waits for the job's answer
    stale = leader.apply_next(schedule, state, "s@2025-12-31T00:00:00Z", t("2026-01-01T00:02"))
    assert stale == state
    state = leader.apply_next(schedule, state, fires[0].job_id, t("2026-01-01T00:05:00"))
    assert leader.next_fire(schedule, state) == t("2026-01-01T00:05:00")
    fires, state = leader.plan(schedule, state, t("2026-01-01T00:09:00"))
    assert ids(fires) == ["s@2026-01-01T00:05:00Z"]


def test_of_two_tokens_left_by_a_hand_over_the_newer_wins():
    old = leader.State(4, t("2026-01-01T00:00:00"), last=t("2026-01-01T00:10:00"))
    new = leader.State(5, t("2026-01-01T00:00:00"), last=t("2026-01-01T00:20:00"))
    assert leader.newest([old, new]) is new
    assert leader.newest([new, old]) is new
    assert leader.State.decode(json.loads(new.encode())) == new


def test_fire_times_reached_late_by_the_same_leader_all_fire_whatever_catch_up():
    schedule = every(2, "once")
    state = leader.State(3, t("2026-01-01T00:00:00"), last=t("2026-01-01T00:00:10"))
    late = t("2026-01-01T00:00:16.5")  # a pass stalled for 6 s
    fires, after = leader.plan(schedule, state, late, leading_since=t("2026-01-01T00:00:05"))
    assert ids(fires) == ["s@2026-01-01T00:00:12Z", "s@2026-01-01T00:00:14Z",
                          "s@2026-01-01T00:00:16Z"]
    assert after.last == t("2026-01-01T00:00:16")
    # A leader that took over after those times: they were missed; catch_up = once.
    fires, _ = leader.plan(schedule, state, late, leading_since=t("2026-01-01T00:00:16"))
    assert ids(fires) == ["s@2026-01-01T00:00:16Z"]
    # Suspended for longer than LATE_LIMIT: missed, whoever held the token.
    fires, _ = leader.plan(schedule, state, t("2026-01-01T00:05:00"),
                           leading_since=t("2026-01-01T00:00:05"))
    assert ids(fires) == ["s@2026-01-01T00:05:00Z"]


def test_a_copy_made_under_an_older_token_does_not_pass_for_its_fire():
    schedule = every(2, "all")
    state = leader.State(5, t("2026-01-01T00:00:00"), last=t("2026-01-01T00:00:10"))
    # A leader died between a fire's confirm and its token: the copy (made under this
    # token, or by a worker that tags none) records the fire.
    for token in (5, None):
        after = leader.apply_fired(schedule, state, t("2026-01-01T00:00:12"), token)
        assert after.last == t("2026-01-01T00:00:12")
        assert leader.plan(schedule, after, t("2026-01-01T00:00:12.5"))[0] == []
    # The broker refused the fire made under token 4 and its leader wrote token 5
    # without it: its copy may have landed without the fire; that time fires again.
    after = leader.apply_fired(schedule, state, t("2026-01-01T00:00:12"), 4)
    assert after == state
    assert ids(leader.plan(schedule, after, t("2026-01-01T00:00:12.5"))[0]) == [
        "s@2026-01-01T00:00:12Z"]
