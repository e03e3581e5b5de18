"""The credit runner against a real local CreditPiggy-style HTTP server."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from creditpiggy_server import FakeCreditPiggy

from rbit.credit.events import CreditEvent
from rbit.errors import ConfigError
from rbit.message import Message
from rbit.outcome import Kind, Outcome
from rbitext.creditpiggy import CreditRunner, CreditSettings, _Entry, map_errors
from rbitext.seen import SeenIds

KEY, SECRET = "d6db27eb65704bb6acb3b83ceaf95e40", "s3cr3t-auth"
WAIT = 10.0  # generous bound for conditions that should hold within milliseconds


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class Recorder:
    """Collects batch statuses and event outcomes; waits on them with timeouts."""

    def __init__(self) -> None:
        self.statuses: list[tuple[str, str, str]] = []
        self.outcomes: dict[str, list[Outcome]] = {}
        self._cond = threading.Condition()

    def status_factory(self, batch_id: str) -> Callable[[str, str], None]:
        def set_status(status: str, message: str = "") -> None:
            with self._cond:
                self.statuses.append((batch_id, status, message))
                self._cond.notify_all()

        return set_status

    def settle_for(self, event_id: str) -> Callable[[Outcome], None]:
        def settle(outcome: Outcome) -> None:
            with self._cond:
                self.outcomes.setdefault(event_id, []).append(outcome)
                self._cond.notify_all()

        return settle

    def wait(self, predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def settled(self) -> int:
        return sum(len(v) for v in self.outcomes.values())

    def with_status(self, status: str) -> list[str]:
        return [message for _, s, message in self.statuses if s == status]


def event(command: str, **args: Any) -> CreditEvent:
    return CreditEvent(command, args)


@pytest.fixture
def server() -> Iterator[FakeCreditPiggy]:
    with FakeCreditPiggy({KEY: SECRET}) as srv:
        yield srv


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def make_runner(
    server: FakeCreditPiggy, recorder: Recorder, tmp_path
) -> Iterator[Callable[..., CreditRunner]]:
    runners: list[CreditRunner] = []

    def make(clock: Any = time.monotonic, sleep: Any = None, **overrides: Any) -> CreditRunner:
        settings = {
            "api_url": server.url,
            "api_key": KEY,
            "api_secret": SECRET,
            "batch_size": "100",
            "flush_interval": "1000",
            "max_requests_per_second": "1000",
            "seen_ids_file": str(tmp_path / "state" / "seen.sqlite3"),
        }
        settings.update({k: str(v) for k, v in overrides.items()})
        runner = CreditRunner(settings, recorder.status_factory, clock=clock, sleep=sleep)
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.close(2.0)


def submit(runner: CreditRunner, recorder: Recorder, ev: CreditEvent) -> None:
    message = Message(body=ev.to_json(), queue="credits", message_id=ev.id)
    runner.submit(message, lambda status, message="": None, recorder.settle_for(ev.id))


def items(request_body: bytes) -> list[tuple[str, dict[str, Any]]]:
    import json

    return [(cmd, args) for cmd, group in json.loads(request_body).items() for args in group]


# -- batching ----------------------------------------------------------------------------


def test_batch_is_sent_once_it_reaches_batch_size(server, recorder, make_runner):
    runner = make_runner(batch_size=3)
    events = [event("meta", slot=f"s{i}", n=str(i)) for i in range(5)]
    for ev in events[:3]:
        submit(runner, recorder, ev)

    assert recorder.wait(lambda: recorder.settled() == 3)
    assert len(server.requests) == 1
    assert [args["n"] for _, args in items(server.requests[0].body)] == ["0", "1", "2"]
    assert all(recorder.outcomes[ev.id][0].kind is Kind.DONE for ev in events[:3])

    for ev in events[3:]:
        submit(runner, recorder, ev)
    assert not server.wait_for_requests(2, timeout=0.3)  # 2 < batch_size, deadline far away


def test_batch_is_sent_when_its_oldest_event_reaches_flush_interval(server, recorder, make_runner):
    clock = FakeClock()
    runner = make_runner(clock=clock, flush_interval=5)
    first, second = event("meta", slot="a", k="1"), event("meta", slot="b", k="2")
    submit(runner, recorder, first)
    clock.advance(3.0)
    submit(runner, recorder, second)
    clock.advance(1.9)
    runner.wake()
    assert not server.wait_for_requests(1, timeout=0.3)

    # 5.1 s after the first event, 2.1 s after the second: a fixed deadline, not a debounce.
    clock.advance(0.2)
    runner.wake()
    assert server.wait_for_requests(1)
    assert recorder.wait(lambda: recorder.settled() == 2)
    assert len(items(server.requests[0].body)) == 2


def test_requests_never_exceed_max_requests_per_second(server, recorder, make_runner):
    runner = make_runner(batch_size=1, max_requests_per_second=10)
    for i in range(6):
        submit(runner, recorder, event("meta", slot=f"s{i}"))

    assert recorder.wait(lambda: recorder.settled() == 6)
    times = [request.at for request in server.requests]
    assert len(times) == 6
    # At most 10 a second: n requests later is at least n * 0.1 s later. The server
    # stamps a request when a handler thread gets to it, so allow that jitter once.
    for i, earlier in enumerate(times):
        for n, later in enumerate(times[i + 1:], 1):
            assert later - earlier >= n * 0.1 - 0.07, (i, n, times)


def test_body_groups_events_by_command_and_is_signed_as_creditpiggy_expects(
    server, recorder, make_runner
):
    runner = make_runner(batch_size=5)
    evs = [
        event("claim", slot="j1", machine="m1"),
        event("alloc", slot="j1", credits=10),
        event("alloc", slot="j2"),
        event("counters", slot="j1", **{"events/total": 5}),
        event("discard", slot="j2", reason="lost"),
    ]
    for ev in evs:
        submit(runner, recorder, ev)

    assert recorder.wait(lambda: recorder.settled() == 5)
    request = server.requests[0]
    assert request.status == 200
    algorithm, key, digest = request.authorization.split(",")
    assert (algorithm, key) == ("sha-256", KEY)
    assert digest == hashlib.sha256(request.body + SECRET.encode()).hexdigest()
    sent = items(request.body)
    assert sorted(cmd for cmd, _ in sent) == ["alloc", "alloc", "claim", "counters", "discard"]
    # The server applied alloc before claim although claim came first.
    assert server.ledger.claims == [("j1", "m1", 10)]
    assert server.ledger.slots["j2"].discarded == "lost"
    assert {recorder.outcomes[ev.id][0].kind for ev in evs} == {Kind.DONE}
    assert any(
        "sending 5 events (alloc 2, counters 1, discard 1, claim 1)" in m
        for m in recorder.with_status("Building")
    )
    assert recorder.with_status("Done") == ["accepted 5 events"]


# -- configuration faults ----------------------------------------------------------------


def blocking_sleep(clock: FakeClock, calls: int, release: threading.Event, sleeps: list[float]):
    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.advance(seconds)
        if len(sleeps) >= calls:
            release.wait(WAIT)

    return sleep


def test_wrong_secret_fails_the_batch_keeps_events_and_backs_off(
    server, recorder, make_runner, caplog
):
    clock, release, sleeps = FakeClock(), threading.Event(), []
    runner = make_runner(
        clock=clock,
        sleep=blocking_sleep(clock, 3, release, sleeps),
        api_secret="wrong",  # noqa: S106 (a deliberately wrong test secret)
        batch_size=2,
    )
    caplog.set_level(logging.ERROR, logger="rbitext.creditpiggy")
    for i in range(2):
        submit(runner, recorder, event("meta", slot=f"s{i}"))

    assert server.wait_for_requests(3)
    assert recorder.wait(lambda: len(sleeps) == 3)
    assert not server.wait_for_requests(4, timeout=0.3)  # no busy loop
    assert [r.status for r in server.requests] == [401, 401, 401]
    assert recorder.outcomes == {}  # kept for redelivery, not settled
    assert all(s >= 22.5 for s in sleeps)  # long waits (first step 30 s, jittered)
    failed = recorder.with_status("Failed")
    assert len(failed) == 3
    assert "HTTP 401" in failed[0]
    assert "You are not authorized" in failed[0]
    logged = caplog.text
    assert server.url in logged
    assert KEY in logged
    assert "wrong" not in logged
    release.set()


def test_malformed_authorization_header_is_a_configuration_fault(server, recorder, make_runner):
    clock, release, sleeps = FakeClock(), threading.Event(), []
    runner = make_runner(
        clock=clock, sleep=blocking_sleep(clock, 1, release, sleeps), api_key="a,b", batch_size=1
    )
    submit(runner, recorder, event("meta", slot="s"))

    assert recorder.wait(lambda: len(sleeps) == 1)
    assert server.requests[0].status == 400
    assert "malformed" in recorder.with_status("Failed")[0]
    assert recorder.outcomes == {}
    release.set()


# -- per-item errors ---------------------------------------------------------------------


def test_per_item_errors_reject_exactly_those_events(server, recorder, make_runner, caplog):
    runner = make_runner(batch_size=5)
    good = [
        event("alloc", slot="ok", credits=3),
        event("claim", slot="ok", machine="m"),
        event("meta", slot="ok", x="1"),
    ]
    bad_claim = event("claim", slot="never-allocated", machine="m")
    bad_counters = event("counters", slot="ghost", hits=1)
    for ev in [*good, bad_claim, bad_counters]:
        submit(runner, recorder, ev)

    assert recorder.wait(lambda: recorder.settled() == 5)
    assert all(recorder.outcomes[ev.id][0].kind is Kind.DONE for ev in good)
    claim_outcome, counters_outcome = (
        recorder.outcomes[bad_claim.id][0],
        recorder.outcomes[bad_counters.id][0],
    )
    assert claim_outcome.kind is counters_outcome.kind is Kind.REJECTED
    assert "never-allocated" in claim_outcome.reason
    assert "code 500" in claim_outcome.reason
    assert "ghost" in counters_outcome.reason
    done = recorder.with_status("Done")[0]
    assert done.startswith("accepted 3 events; 2 rejected")
    assert "never-allocated" in caplog.text
    assert "ghost" in caplog.text


def test_server_error_not_tied_to_one_event_is_reported_and_events_settled_done(
    server, recorder, make_runner
):
    runner = make_runner(batch_size=1)
    submit(runner, recorder, event("alloc", slot="taken"))
    assert recorder.wait(lambda: recorder.settled() == 1)

    # "already exists" names no slot; two allocs of different slots cannot be told apart.
    runner2_events = [event("alloc", slot="taken"), event("alloc", slot="fresh")]
    runner_b = make_runner(batch_size=2)
    for ev in runner2_events:
        submit(runner_b, recorder, ev)

    assert recorder.wait(lambda: recorder.settled() == 3)
    assert all(recorder.outcomes[ev.id][0].kind is Kind.DONE for ev in runner2_events)
    assert "already exists" in recorder.with_status("Done")[-1]


def test_error_for_repeated_claim_of_a_slot_goes_to_the_later_claim():
    first, second = event("claim", slot="s", machine="m1"), event("claim", slot="s", machine="m2")
    entries = [_Entry(first, [], 0.0), _Entry(second, [], 0.0)]
    errors = ({"message": "Claiming non-existing slot: 's' for project: 'p'", "code": 500},)

    rejected, unmatched = map_errors(entries, errors)

    assert list(rejected) == [1]
    assert unmatched == []


# -- outages -----------------------------------------------------------------------------


def test_server_down_for_a_while_delivers_every_event_exactly_once(server, recorder, make_runner):
    runner = make_runner(batch_size=4, flush_interval=0.1, retry_max_delay=0.3)
    evs = [event("counters", slot="job", **{f"c{i}": 1}) for i in range(12)]
    submit(runner, recorder, event("alloc", slot="job"))
    assert recorder.wait(lambda: recorder.settled() == 1)

    server.stop()
    for ev in evs:
        submit(runner, recorder, ev)
    assert recorder.wait(
        lambda: len([m for m in recorder.with_status("Building") if "retrying" in m]) >= 2
    )
    assert recorder.settled() == 1
    server.start()  # same port

    assert recorder.wait(lambda: recorder.settled() == 13)
    assert all(
        recorder.outcomes[ev.id] == [Outcome.done(recorder.outcomes[ev.id][0].reason)] for ev in evs
    )
    assert all(server.times_applied("counters", dict(ev.args)) == 1 for ev in evs)
    assert server.ledger.slots["job"].counters == {f"c{i}": 1 for i in range(12)}


def test_5xx_reply_is_retried_until_accepted(server, recorder, make_runner):
    server.fail_next(503, 2)
    runner = make_runner(batch_size=1, retry_max_delay=0.2)
    ev = event("meta", slot="s", k="v")
    submit(runner, recorder, ev)

    assert recorder.wait(lambda: recorder.settled() == 1)
    assert [r.status for r in server.requests] == [503, 503, 200]
    assert any("retrying in" in m and "HTTP 503" in m for m in recorder.with_status("Building"))
    assert server.times_applied("meta", dict(ev.args)) == 1


# -- redelivery --------------------------------------------------------------------------


def test_redelivered_accepted_event_is_done_without_sending(server, recorder, make_runner):
    ev = event("claim", slot="j", machine="m")
    first = make_runner(batch_size=1)
    submit(first, recorder, event("alloc", slot="j"))
    submit(first, recorder, ev)
    assert recorder.wait(lambda: recorder.settled() == 2)
    first.close(2.0)

    second = make_runner(batch_size=1)  # same seen-ids file, as after a worker restart
    submit(second, recorder, ev)

    assert recorder.outcomes[ev.id][-1] == Outcome.done("already accepted")
    assert len(server.requests) == 2


def test_redelivery_of_a_pending_event_shares_its_outcome_and_is_sent_once(
    server, recorder, make_runner
):
    runner = make_runner(batch_size=2)
    ev, other = event("meta", slot="s", k="1"), event("meta", slot="t", k="2")
    submit(runner, recorder, ev)
    submit(runner, recorder, ev)
    submit(runner, recorder, other)

    assert recorder.wait(lambda: recorder.settled() == 3)
    assert [o.kind for o in recorder.outcomes[ev.id]] == [Kind.DONE, Kind.DONE]
    assert server.times_applied("meta", dict(ev.args)) == 1


def test_undecodable_body_is_rejected_at_once(recorder, make_runner):
    runner = make_runner()
    runner.submit(
        Message(body=b"{not json", queue="credits"), lambda s, m="": None, recorder.settle_for("x")
    )

    assert recorder.outcomes["x"][0].kind is Kind.REJECTED


# -- shutdown ----------------------------------------------------------------------------


def test_close_flushes_pending_events(server, recorder, make_runner):
    runner = make_runner()
    evs = [event("meta", slot=f"s{i}") for i in range(3)]
    for ev in evs:
        submit(runner, recorder, ev)

    runner.close(5.0)

    assert recorder.settled() == 3
    assert len(server.requests) == 1


def test_close_with_server_down_leaves_events_unsettled(server, recorder, make_runner):
    runner = make_runner()
    server.stop()
    submit(runner, recorder, event("meta", slot="s"))

    started = time.monotonic()
    runner.close(2.0)

    assert time.monotonic() - started < 15  # bounded by close()'s 2 s, not forever
    assert recorder.outcomes == {}


# -- settings ----------------------------------------------------------------------------


def test_creditpiggy_daemon_aliases_are_accepted():
    settings = CreditSettings.from_mapping(
        {"api_url": "http://h/api/", "project_id": "k", "project_auth": "topsecret"}
    )

    assert (settings.api_key, settings.api_secret) == ("k", "topsecret")
    assert settings.bulk_url == "http://h/api/batch/bulk"
    assert "topsecret" not in repr(settings)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"api_key": "k", "api_secret": "s"}, "api_url"),
        ({"api_url": "http://h", "api_secret": "s"}, "api_key"),
        ({"api_url": "http://h", "api_key": "k"}, "api_secret"),
        ({"api_url": "ftp://h", "api_key": "k", "api_secret": "s"}, "api_url"),
        (
            {"api_url": "http://h", "api_key": "k", "api_secret": "s", "batch_size": "many"},
            "batch_size",
        ),
        (
            {"api_url": "http://h", "api_key": "k", "api_secret": "s", "flush_interval": "-1"},
            "flush_interval",
        ),
    ],
)
def test_missing_or_invalid_setting_is_a_config_error_naming_the_key(settings, key):
    with pytest.raises(ConfigError) as info:
        CreditSettings.from_mapping(settings)

    assert info.value.key == key


# -- the seen-ids store ------------------------------------------------------------------


def test_seen_store_is_private_durable_and_pruned(tmp_path):
    path = tmp_path / "new" / "dir" / "seen.sqlite3"
    now = [1_000_000.0]
    store = SeenIds(str(path), clock=lambda: now[0])
    store.add_many(["old"])
    now[0] += 10 * 86400
    store.add_many(["recent", "recent"])
    store.close()

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    now[0] += 25 * 86400  # "old" is 35 days old, "recent" 25
    reopened = SeenIds(str(path), keep_days=30, clock=lambda: now[0])
    assert "old" not in reopened
    assert "recent" in reopened
    assert len(reopened) == 1
    reopened.close()


def test_seen_store_is_safe_across_threads(tmp_path):
    store = SeenIds(str(tmp_path / "seen.sqlite3"))
    threads = [
        threading.Thread(target=store.add_many, args=([f"{t}-{i}" for i in range(50)],))
        for t in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)

    assert len(store) == 400
    assert "7-49" in store
    store.close()
