"""The PollLoop's timers: what fires, what does not, and what a cancel leaves behind."""

from __future__ import annotations

from rbit.fdloop import PollLoop


def test_a_cancelled_timer_never_fires_and_the_others_do() -> None:
    loop = PollLoop()
    fired: list[str] = []
    loop.call_later(0.0, lambda: fired.append("a"))
    loop.call_later(0.0, lambda: fired.append("b")).cancel()
    loop.call_later(0.01, lambda: fired.append("c"))
    loop.run_until(lambda: "c" in fired)
    assert fired == ["a", "c"]


def test_cancelling_after_it_fired_changes_nothing() -> None:
    loop = PollLoop()
    fired: list[int] = []
    timer = loop.call_later(0.0, lambda: fired.append(1))
    loop.run_until(lambda: bool(fired))
    timer.cancel()
    timer.cancel()
    loop.call_later(0.0, lambda: fired.append(2))
    loop.run_until(lambda: len(fired) == 2)
    assert fired == [1, 2]


def test_a_deadline_set_and_cancelled_per_job_leaves_no_timers_behind() -> None:
    # A warm child's loop sets an hour-long deadline per job and cancels it when the
    # job ends: the heap must not keep thousands of dead entries.
    loop = PollLoop()
    for _ in range(10_000):
        loop.call_later(3600.0, lambda: None).cancel()
    assert len(loop._timers) <= 200
    fired: list[bool] = []
    loop.call_later(0.0, lambda: fired.append(True))
    loop.run_until(lambda: bool(fired))
    assert fired == [True]
    assert len(loop._timers) <= 200


def test_has_timers_counts_only_timers_still_to_fire() -> None:
    loop = PollLoop()
    assert not loop.has_timers()
    timer = loop.call_later(3600.0, lambda: None)
    assert loop.has_timers()
    timer.cancel()
    assert not loop.has_timers()  # still in the heap, but dead
    fired: list[bool] = []
    loop.call_later(0.0, lambda: fired.append(True))
    assert loop.has_timers()
    loop.run_until(lambda: bool(fired))
    assert not loop.has_timers()
