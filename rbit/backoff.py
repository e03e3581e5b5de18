"""Capped exponential backoff with jitter: one formula for every "try again later".

Retries of jobs (:mod:`rbit.fate`), reconnects to the broker, status sinks that are
down and the credit runner's server outages all wait ``first * factor ** (attempt - 1)``
seconds, capped at ``cap``, then spread by a random factor so that workers cut off
together do not come back together. Each caller picks the spread that suits it;
randomness is injected so tests can drive it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

Rng = Callable[[], float]


def step(attempt: int, first: float, cap: float, factor: float = 2.0) -> float:
    """The delay before try ``attempt + 1``, without jitter.

    Args:
        attempt: How many tries failed so far, counting from 1 (0 counts as 1).
        first: The delay after the first failure, in seconds.
        cap: The longest delay, in seconds.
        factor: How much each failure multiplies the delay.

    Returns:
        ``min(cap, first * factor ** (attempt - 1))``, never below 0.
    """
    cap = max(0.0, cap)
    try:
        grown = first * factor ** max(0, attempt - 1)
    except OverflowError:  # after thousands of failures: the cap has long been reached
        return cap
    return max(0.0, min(cap, grown))


def jittered(delay: float, spread: tuple[float, float], rng: Rng = random.random) -> float:
    """``delay`` times a factor drawn uniformly from ``spread`` (low, high)."""
    low, high = spread
    return delay * (low + (high - low) * rng())


def delay(
    attempt: int,
    first: float,
    cap: float,
    *,
    factor: float = 2.0,
    spread: tuple[float, float] = (0.5, 1.0),
    rng: Rng = random.random,
) -> float:
    """The jittered delay before try ``attempt + 1`` (see :func:`step`).

    Args:
        attempt: How many tries failed so far, counting from 1.
        first: The delay after the first failure, in seconds.
        cap: The longest delay before jitter, in seconds.
        factor: How much each failure multiplies the delay.
        spread: The range (low, high) of the random factor applied at the end.
        rng: Returns a float in [0, 1); ``random.random`` unless a test drives it.

    Returns:
        Seconds to wait.
    """
    return jittered(step(attempt, first, cap, factor), spread, rng)


class Backoff:
    """Counts consecutive failures and answers how long to wait after each.

    Args:
        first: The delay after the first failure, in seconds.
        cap: The longest delay before jitter, in seconds.
        spread: The range of the random factor (see :func:`delay`).
        rng: Returns a float in [0, 1).
    """

    def __init__(
        self,
        first: float,
        cap: float,
        *,
        spread: tuple[float, float] = (0.5, 1.0),
        rng: Rng = random.random,
    ) -> None:
        self._first = first
        self._cap = cap
        self._spread = spread
        self._rng = rng
        self.failures = 0

    def next(self) -> float:
        """Counts one more failure; returns the seconds to wait before the next try."""
        self.failures += 1
        return delay(self.failures, self._first, self._cap, spread=self._spread, rng=self._rng)

    def reset(self) -> None:
        """A try succeeded: the next failure waits ``first`` again."""
        self.failures = 0
