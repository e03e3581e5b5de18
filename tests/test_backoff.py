"""The shared backoff formula: growth, cap, jitter spread, and the stateful counter."""

from __future__ import annotations

import pytest

from rbit import backoff
from rbit.backoff import Backoff


def test_step_grows_by_the_factor_until_the_cap() -> None:
    steps = [backoff.step(attempt, 1.0, 10.0) for attempt in range(1, 7)]
    assert steps == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_step_uses_the_given_factor_and_counts_attempt_zero_as_one() -> None:
    assert backoff.step(0, 2.0, 100.0, factor=3) == 2.0
    assert backoff.step(3, 2.0, 100.0, factor=3) == 18.0


def test_step_survives_huge_attempt_numbers() -> None:
    assert backoff.step(100_000, 0.5, 60.0) == 60.0
    assert backoff.step(100_000, 0.5, 60.0, factor=1.5) == 60.0


def test_negative_cap_means_no_wait() -> None:
    assert backoff.step(1, 1.0, -5.0) == 0.0


@pytest.mark.parametrize(("draw", "expected"), [(0.0, 5.0), (0.5, 7.5), (0.999999, 9.99999)])
def test_jitter_spreads_the_delay_over_its_range(draw: float, expected: float) -> None:
    got = backoff.delay(2, 5.0, 100.0, spread=(0.5, 1.0), rng=lambda: draw)
    assert got == pytest.approx(expected)


def test_jitter_above_one_may_lengthen_the_delay() -> None:
    assert backoff.delay(1, 4.0, 4.0, spread=(0.5, 1.5), rng=lambda: 0.75) == 5.0


def test_backoff_counts_failures_and_reset_starts_over() -> None:
    waits = Backoff(0.5, 3.0, spread=(1.0, 1.0))
    assert [waits.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert waits.failures == 5
    waits.reset()
    assert waits.next() == 0.5


def test_backoff_draws_from_the_injected_rng() -> None:
    draws = iter([0.0, 1.0])
    waits = Backoff(2.0, 100.0, spread=(0.5, 1.0), rng=lambda: next(draws))
    assert (waits.next(), waits.next()) == (1.0, 4.0)
