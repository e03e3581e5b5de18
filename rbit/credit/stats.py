"""The front door's counts: lines by command and result, reply latency, confirms due.

Updated on the server's event loop only (plain integers, no lock); read by the metrics
at scrape time from another thread, which sees each integer whole. Every key exists
from the start, so a scrape never meets a dictionary that changes size.
"""

from __future__ import annotations

import bisect

from rbit.credit.events import COMMANDS

#: The results a line is counted under.
RESULTS = ("ok", "error", "malformed")
#: The command label of a line that could not be parsed.
INVALID = "invalid"
#: Upper bounds of the reply latency histogram's buckets, seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)


class LineStats:
    """Counts kept by :class:`rbit.credit.server.CreditServer`."""

    def __init__(self) -> None:
        self.lines = {(command, result): 0
                      for command in (*COMMANDS, INVALID) for result in RESULTS}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.seconds = 0.0
        self.published = 0
        self.answered = 0

    def malformed(self) -> None:
        """A line was refused before anything was published."""
        self.lines[(INVALID, "malformed")] += 1

    def sent(self) -> None:
        """A line's event went to the publisher; its answer is due."""
        self.published += 1

    def replied(self, command: str, ok: bool, seconds: float) -> None:
        """A published line got its answer ``seconds`` after it was read."""
        self.answered += 1
        self.lines[(command, "ok" if ok else "error")] += 1
        self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.seconds += seconds

    @property
    def outstanding(self) -> int:
        """Lines published and not yet answered (confirms outstanding)."""
        return max(0, self.published - self.answered)
