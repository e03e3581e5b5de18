"""``rbit-credit``: the credit front door's command line.

::

    rbit-credit --config FILE start|stop|restart|status|run
    rbit-credit --config FILE send COMMAND,key=value,...

``start`` daemonizes (pid file, log file), ``run`` serves in the foreground, ``stop``
sends SIGTERM and waits, ``status`` answers with LSB exit codes, ``send`` publishes one
event straight to RabbitMQ and prints ``OK`` or ``ER <reason>``.
"""

from __future__ import annotations

import argparse
import enum
import logging
import sys
from collections.abc import Sequence

from rbit.credit import daemon
from rbit.credit.client import DaemonUnavailable, publish_direct
from rbit.credit.protocol import ProtocolError
from rbit.credit.server import ServerError
from rbit.credit.settings import CreditSettings, load_credit_config
from rbit.errors import BrokerUnreachable, ConfigError

log = logging.getLogger("rbit.credit")

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ExitCode(enum.IntEnum):
    """``rbit-credit`` exit codes (LSB init-script conventions where they apply)."""

    OK = 0
    FAILURE = 1  # start/stop failed; send got ER; status: dead but the pid file remains
    USAGE = 2
    NOT_RUNNING = 3  # status: not running
    ALREADY_RUNNING = 4  # start/run: a live daemon holds the pid file
    CONFIG = 6  # LSB "program is not configured"
    BROKER_UNREACHABLE = 7


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rbit-credit``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        settings = load_credit_config(args.config)
    except ConfigError as exc:
        print(f"rbit-credit: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    if args.action == "send":
        if not args.line:
            print("rbit-credit: send needs a line, e.g. send ALLOC,slot=job42,credits=10",
                  file=sys.stderr)
            return ExitCode.USAGE
        return _send(settings, " ".join(args.line))
    _configure_logging(settings, foreground=args.action == "run" or args.debug, debug=args.debug)
    for warning in settings.warnings:
        log.warning("%s", warning)
    return _ACTIONS[args.action](settings)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rbit-credit", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", required=True, help="CreditPiggy daemon config file")
    parser.add_argument("--debug", action="store_true", help="log at DEBUG to stderr")
    parser.add_argument("action", choices=("start", "stop", "restart", "status", "run", "send"))
    parser.add_argument("line", nargs="*", help="send: the protocol line")
    return parser


def _configure_logging(settings: CreditSettings, *, foreground: bool, debug: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else settings.loglevel)
    # Daemonized, stderr becomes the log file (or /dev/null); in the foreground the log
    # file, when set, gets the lines as well.
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    if foreground and settings.logfile and not debug:
        handler = logging.FileHandler(settings.logfile)
    handler.setFormatter(logging.Formatter(_FORMAT))
    root.addHandler(handler)
    if not debug:
        # pika narrates every connection step at INFO.
        logging.getLogger("pika").setLevel(max(settings.loglevel, logging.WARNING))


def _run(settings: CreditSettings) -> int:
    return _guarded(lambda: daemon.run_daemon(settings))


def _guarded(body) -> int:
    try:
        body()
    except daemon.AlreadyRunning as exc:
        log.error("%s", exc)
        return ExitCode.ALREADY_RUNNING
    except BrokerUnreachable as exc:
        log.error("%s", exc)
        return ExitCode.BROKER_UNREACHABLE
    except ServerError as exc:
        log.error("%s", exc)
        return ExitCode.FAILURE
    return ExitCode.OK


def _start(settings: CreditSettings) -> int:
    pid = daemon.running_pid(settings.pidfile)
    if pid is not None:
        print(f"rbit-credit: already running (pid {pid})", file=sys.stderr)
        return ExitCode.ALREADY_RUNNING
    code = daemon.daemonize(
        lambda ready: _guarded(lambda: daemon.run_daemon(settings, ready)),
        logfile=settings.logfile,
    )
    if code == ExitCode.OK:
        print(f"rbit-credit: started (pid {daemon.read_pid(settings.pidfile)})")
    return code


def _stop(settings: CreditSettings) -> int:
    outcome = daemon.stop_daemon(settings.pidfile)
    if outcome is None:
        print("rbit-credit: not running")
    elif outcome:
        print("rbit-credit: stopped")
    else:
        print(f"rbit-credit: still running after {daemon.STOP_TIMEOUT:g} s", file=sys.stderr)
        return ExitCode.FAILURE
    return ExitCode.OK


def _restart(settings: CreditSettings) -> int:
    code = _stop(settings)
    return code if code != ExitCode.OK else _start(settings)


def _status(settings: CreditSettings) -> int:
    pid = daemon.running_pid(settings.pidfile)
    if pid is not None:
        print(f"rbit-credit: running (pid {pid})")
        return ExitCode.OK
    if daemon.read_pid(settings.pidfile) is not None:
        print("rbit-credit: not running (stale pid file)")
        return ExitCode.FAILURE
    print("rbit-credit: not running")
    return ExitCode.NOT_RUNNING


def _send(settings: CreditSettings, line: str) -> int:
    try:
        publish_direct(settings, line)
    except ProtocolError as exc:
        print(f"ER {exc.reason}")
        return ExitCode.FAILURE
    except (BrokerUnreachable, DaemonUnavailable):
        print("ER broker unavailable")
        return ExitCode.FAILURE
    print("OK")
    return ExitCode.OK


_ACTIONS = {
    "run": _run,
    "start": _start,
    "stop": _stop,
    "restart": _restart,
    "status": _status,
}


if __name__ == "__main__":
    sys.exit(main())
