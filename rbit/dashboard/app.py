"""``rbit dashboard CONFIG [--bind HOST:PORT] [--debug]``: one process serving the page.

Wires the parts: :class:`~rbit.dashboard.gather.Gatherer` (the fleet, every
``refresh`` seconds), :class:`~rbit.dashboard.live.LiveFeed` (statuses as they come),
:class:`~rbit.dashboard.jobs.JobLog`, :class:`~rbit.dashboard.actions.Actions` and
:class:`~rbit.dashboard.server.DashboardServer`. Runs until SIGTERM or SIGINT (exit 0);
a broker that cannot be reached is shown on the page and retried, not fatal.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from rbit.config import Settings
from rbit.dashboard.gather import Gatherer
from rbit.dashboard.jobs import JobLog
from rbit.dashboard.live import Hub, LiveFeed
from rbit.dashboard.settings import parse_bind

log = logging.getLogger(__name__)


class Board:
    """What the server shows, from the gatherer, the job log and the live feed."""

    def __init__(self, gatherer: Gatherer, jobs: JobLog, hub: Hub,
                 live: LiveFeed | None) -> None:
        self._gatherer = gatherer
        self._jobs = jobs
        self.hub = hub
        self._live = live

    def fleet(self) -> dict[str, Any]:
        live = self._live is not None and self._live.following
        return {**self._gatherer.snapshot(), "live": live}

    def jobs(self, queue: str, status: str, page: int, per_page: int) -> dict[str, Any]:
        return self._jobs.page(queue, status, page, per_page)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._jobs.job(job_id)

    def workers_for(self, queue: str, paused: bool) -> list[str]:
        """The workers that paused ``queue`` (``paused``) or consume it."""
        for item in self._gatherer.snapshot()["queues"]:
            if item["queue"] == queue:
                return list(item["paused_on" if paused else "consuming_on"])
        return []

    def poke(self) -> None:
        self._gatherer.poke()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rbit dashboard",
                                     description="Serve a web page showing the fleet, live.")
    parser.add_argument("config", help="an ini file with the fleet's [amqp] section")
    parser.add_argument("--bind", metavar="HOST:PORT",
                        help="where to listen (default: [dashboard] bind, 127.0.0.1:8080)")
    parser.add_argument("--debug", action="store_true", help="log at DEBUG to stdout")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run ``rbit dashboard``; returns the exit code (:class:`rbit.cli.ExitCode`)."""
    from rbit import logsetup
    from rbit.cli import ExitCode
    from rbit.config import load_config
    from rbit.control.authority import command_signer
    from rbit.errors import ConfigError, RbitError

    try:
        options = _parser().parse_args(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0) and ExitCode.USAGE
    try:
        settings = with_bind(load_config(options.config), options.bind)
        signer = command_signer(settings)
    except ConfigError as exc:
        logsetup.configure(None, options.debug)
        log.error("configuration error: %s", exc)
        return ExitCode.CONFIG
    except ValueError as exc:
        print(f"rbit dashboard: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    logsetup.configure(settings, options.debug)
    for warning in settings.warnings:
        log.warning("%s", warning)
    try:
        return serve(settings, signer)
    except RbitError as exc:
        log.error("%s", exc)
        return ExitCode.ERROR


def with_bind(settings: Settings, bind: str | None) -> Settings:
    """``settings`` with ``--bind`` applied (ValueError when it is malformed)."""
    if bind is None:
        return settings
    parsed = parse_bind(bind)
    if parsed is None:
        raise ValueError(f"--bind: expected HOST:PORT (port 0-65535), got {bind!r}")
    dashboard = dataclasses.replace(settings.dashboard, host=parsed[0], port=parsed[1])
    return dataclasses.replace(settings, dashboard=dashboard)


def serve(settings: Settings, signer: Any = None, stop: threading.Event | None = None,
          ready: Callable[[tuple[str, int]], None] | None = None) -> int:
    """Serve until SIGTERM/SIGINT (or ``stop``); returns 0.

    Args:
        settings: The config (``[dashboard]`` with ``--bind`` applied).
        signer: Signs control commands (None: unsigned).
        stop: Ends serving when set (None: SIGTERM and SIGINT do).
        ready: Called with the bound (host, port) once serving.
    """
    from rbit.dashboard.actions import Actions
    from rbit.dashboard.server import DashboardServer

    stop = stop or _stop_on_signals()
    dash = settings.dashboard
    if not _loopback(dash.host):
        log.warning("the dashboard listens on %s, beyond this machine%s", dash.host,
                    "" if dash.token else " (read-only: no [dashboard] token)")
    jobs, hub = JobLog(dash.history_rows), Hub()
    gatherer = Gatherer(settings, jobs, signer)
    live = LiveFeed(settings, jobs, hub)
    server = DashboardServer(dash, Board(gatherer, jobs, hub, live), Actions(settings, signer))
    gatherer.start()
    live.start()
    server.start()
    if ready is not None:
        ready(server.address)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.close()
        live.close()
        gatherer.close()
    return 0


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    return stop
