"""A runner whose exception text is huge (10 MB over many lines), for the bounds tests."""

from __future__ import annotations

HUGE_LINES = 200_000


def huge_error(message, set_status, settings):
    set_status("Building", "starting\n" + "progress " * 1_000_000)
    raise RuntimeError("".join(f"line {n} of a runaway error message\n"
                               for n in range(HUGE_LINES)))
