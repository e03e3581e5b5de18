"""``rbit CONFIG [--poll-time SECONDS] [--debug]``; dispatches the other verbs.

``rbit dead-letters ...`` (:mod:`rbit.deadletters`), ``rbit ctl ...``
(:mod:`rbit.control`), ``rbit dashboard ...`` (:mod:`rbit.dashboard`), ``rbit
submit|watch|keys ...`` (:mod:`rbit.submit`), ``rbit broadcast ...`` (:mod:`rbit.broadcast`).

Thin: parse arguments, configure logging, build the worker, run it, map errors to
exit codes.
"""

from __future__ import annotations

import argparse
import enum
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from rbit import __version__, logsetup
from rbit.config import MAX_POLL_TIME, Settings, check_worker, load_config
from rbit.errors import BrokerUnreachable, ConfigError, DuplicateWorker, RbitError

log = logging.getLogger("rbit")


class ExitCode(enum.IntEnum):
    """The worker's exit codes."""

    OK = 0  # stopped cleanly on SIGTERM/SIGINT/SIGHUP
    ERROR = 1  # an unexpected error
    USAGE = 2  # bad command line
    # Running jobs were cut short, by a second signal or because shutdown_grace ran
    # out; they are redelivered.
    FORCED = 3
    DUPLICATE_NAME = 73  # another worker of the same [rbit] name is running (EX_CANTCREAT)
    # rbit submit --wait: the job ended Failed (failed for good: it is in its dead
    # letters, after its last try, rejected, or refused for its signature).
    JOB_FAILED = 10
    JOB_TIMEOUT = 11  # rbit submit --wait: no final status within --timeout
    UNROUTABLE = 12  # rbit submit: no queue is bound to the job's route (returned)
    NO_QUEUE = 66  # rbit dead-letters: the queue to read does not exist (EX_NOINPUT)
    BROKER_UNREACHABLE = 69  # no AMQP host accepted a connection at start (EX_UNAVAILABLE)
    CONFIG = 78  # the configuration is invalid (EX_CONFIG)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rbit", description="Run jobs from RabbitMQ queues through configured runners.")
    parser.add_argument("config", help="the ini file (see rbit.ini.example)")
    parser.add_argument("--poll-time", type=float, default=None, metavar="SECONDS",
                        help="how often an idle worker re-checks its world "
                             "(default: [rbit] polling_time, 60)")
    parser.add_argument("--debug", action="store_true", help="log at DEBUG to stdout")
    parser.add_argument("--version", action="version", version=f"rbit {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "ctl":
        from rbit.control.client import main as ctl_main
        return ctl_main(args[1:])
    if args and args[0] in ("dead-letters", "dlq"):
        from rbit.deadletters import main as dead_letters_main
        return dead_letters_main(args[1:])
    if args and args[0] == "dashboard":
        from rbit.dashboard.app import main as dashboard_main
        return dashboard_main(args[1:])
    if args and args[0] == "broadcast":
        from rbit.broadcast import main as broadcast_main
        return broadcast_main(args[1:])
    if args and args[0] in ("submit", "watch", "keys"):
        from rbit import submit
        return submit.main(args)
    try:
        options = _parser().parse_args(args)
    except SystemExit as exc:
        return int(exc.code or 0) and ExitCode.USAGE
    if options.poll_time is not None and not 0 < options.poll_time <= MAX_POLL_TIME:
        print(f"rbit: --poll-time must be > 0 and <= {MAX_POLL_TIME:g}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        settings = load_config(options.config)
        check_worker(settings)
    except ConfigError as exc:
        logsetup.configure(None, options.debug)
        log.error("configuration error: %s", exc)
        return ExitCode.CONFIG
    logsetup.configure(settings, options.debug)
    for warning in settings.warnings:
        log.warning("%s", warning)
    return run(settings, options.poll_time)


def run(settings: Settings, poll_time: float | None = None) -> int:
    """Run a worker in the foreground until SIGTERM, SIGINT or SIGHUP."""
    from rbit.observe.worker import WorkerObservation
    from rbit.systemd import Notifier
    from rbit.worker import Worker

    stop, force = threading.Event(), threading.Event()

    def on_signal(signum: int, _frame) -> None:
        if stop.is_set():
            force.set()
        stop.set()
        log.info("received %s", signal.Signals(signum).name)

    # SIGHUP (a closed terminal, a service manager's reload) stops the worker as
    # SIGTERM does: its default would end it at once, leaving its jobs running.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        worker = Worker(settings, poll_time=poll_time, request_stop=stop.set)
        observation = WorkerObservation(worker, Notifier.from_environ())
        worker.start()
        observation.start()
    except BrokerUnreachable as exc:
        log.error("cannot reach the broker: %s", exc)
        return ExitCode.BROKER_UNREACHABLE
    except ConfigError as exc:  # RunnerLoadError included
        log.error("configuration error: %s", exc.located(file=settings.file))
        return ExitCode.CONFIG
    except DuplicateWorker as exc:
        log.error("%s; not starting", exc)
        return ExitCode.DUPLICATE_NAME
    except RbitError as exc:
        log.error("%s", exc)
        return ExitCode.ERROR
    while not stop.wait(1.0):
        pass
    observation.stopping()
    clean = worker.shutdown(force)
    observation.close()
    log.info("stopped%s", "" if clean else " (running jobs were cut short)")
    return ExitCode.OK if clean and not force.is_set() else ExitCode.FORCED


if __name__ == "__main__":
    sys.exit(main())
