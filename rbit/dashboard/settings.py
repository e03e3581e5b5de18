"""``[dashboard]``: where ``rbit dashboard`` listens, its token, how often it refreshes.

Keys:

* ``bind = HOST:PORT`` (default ``127.0.0.1:8080``): the loopback address unless
  another is named on purpose; ``rbit dashboard --bind`` overrides it;
* ``token = ${RBIT_DASHBOARD_TOKEN}``: allows the actions (pause, resume, replay, purge,
  shutdown) and then guards every page and request; without it the page is read-only;
* ``refresh = 5``: seconds between two rounds of control commands (2 to 3600);
* ``history_rows = 500``: outcomes kept per queue for the recent-jobs table
  (1 to 10000);
* ``dead_letters_shown = 50``: dead letters listed per queue (0 to 1000).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: ``refresh``'s bounds: below 2 s the control commands would add load for nothing.
MIN_REFRESH, MAX_REFRESH = 2.0, 3600.0
MAX_HISTORY_ROWS = 10_000
MAX_DEAD_SHOWN = 1_000
DEFAULT_BIND = "127.0.0.1:8080"


@dataclass(frozen=True)
class DashboardSettings:
    """``[dashboard]``, validated (defaults when the section is absent)."""

    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = field(default=None, repr=False)
    refresh: float = 5.0
    history_rows: int = 500
    dead_letters_shown: int = 50


def parse_bind(text: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) as (host, port); None when malformed."""
    host, colon, port_text = text.strip().rpartition(":")
    host = host.strip("[]")
    if not colon or not host or not port_text.isdigit() or int(port_text) > 65535:
        return None
    return host, int(port_text)


def parse_dashboard(section: Any | None) -> DashboardSettings:
    """The ``[dashboard]`` section read through ``rbit.config``'s section reader.

    Raises:
        ConfigError: A value is malformed (file, section, key and reason named).
    """
    if section is None:
        return DashboardSettings()
    bind_text = section.text("bind", DEFAULT_BIND)
    bind = parse_bind(bind_text)
    if bind is None:
        raise section.error("bind", f"expected HOST:PORT (port 0-65535), got {bind_text!r}")
    token = section.text("token")
    if token is not None and not token:
        raise section.error("token", "must not be empty (leave the key out for a "
                                     "read-only dashboard)")
    return DashboardSettings(
        host=bind[0], port=bind[1], token=token,
        refresh=section.number("refresh", 5.0, MIN_REFRESH, strict=False,
                               maximum=MAX_REFRESH),
        history_rows=section.integer("history_rows", 500, 1, MAX_HISTORY_ROWS),
        dead_letters_shown=section.integer("dead_letters_shown", 50, 0, MAX_DEAD_SHOWN))
