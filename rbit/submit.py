"""``rbit submit``, ``rbit watch`` and ``rbit keys``: the publisher's command line.

* ``rbit submit CONFIG QUEUE [BODY | - | --file F] [--job-id ID] [--header K=V ...]
  [--content-type T] [--json] [--wait [--timeout S]]`` publishes one job (see
  :mod:`rbit.client`) and prints its id (``--json``: a JSON object). With ``--wait`` it
  follows the job on the status exchange and exits with
  :attr:`~rbit.cli.ExitCode.OK` on Done, :attr:`~rbit.cli.ExitCode.JOB_FAILED` (10) on
  Failed, :attr:`~rbit.cli.ExitCode.JOB_TIMEOUT` (11) when no final status came in
  time; :attr:`~rbit.cli.ExitCode.UNROUTABLE` (12) when no queue would take the job.
* ``rbit watch CONFIG [--job ID] [--queue Q]`` prints statuses as they come.
* ``rbit keys generate NAME --out DIR`` and ``rbit keys fingerprint FILE``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Sequence
from typing import TextIO

from rbit.config import Settings, load_config
from rbit.errors import BrokerError, BrokerUnreachable, ConfigError, SignatureError, Unroutable
from rbit.safetext import escape


def _submit_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rbit submit", description="Publish one job.")
    parser.add_argument("config", help="the ini file ([amqp], [rbit], [security])")
    parser.add_argument("queue", help="the queue the job is for")
    parser.add_argument("body", nargs="?", default=None,
                        help="the body; '-' reads standard input (default: empty)")
    parser.add_argument("--file", default=None, help="read the body from this file")
    parser.add_argument("--job-id", default=None, help="the job id (default: a new UUID)")
    parser.add_argument("--header", action="append", default=[], metavar="K=V",
                        help="an application header (repeatable)")
    parser.add_argument("--content-type", default=None, help="the AMQP content type")
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    parser.add_argument("--wait", action="store_true", help="follow the job until it ends")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="with --wait: give up after S seconds")
    return parser


def _watch_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rbit watch", description="Print job statuses live.")
    parser.add_argument("config")
    parser.add_argument("--job", default=None, help="only this job")
    parser.add_argument("--queue", default=None, help="only this queue")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="stop after S seconds without a status")
    return parser


def _keys_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rbit keys", description="Ed25519 signing keys.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    generate = verbs.add_parser("generate", help="write NAME.key (0600) and NAME.pub")
    generate.add_argument("name")
    generate.add_argument("--out", required=True, help="the directory to write to")
    fingerprint = verbs.add_parser("fingerprint", help="print a key file's id")
    fingerprint.add_argument("file")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run ``submit``, ``watch`` or ``keys`` (``argv[0]``); returns the exit code."""
    from rbit.cli import ExitCode

    verb, rest = argv[0], list(argv[1:])
    parser = {"submit": _submit_parser, "watch": _watch_parser, "keys": _keys_parser}[verb]()
    try:
        options = parser.parse_args(rest)
    except SystemExit as exc:
        return int(exc.code or 0) and ExitCode.USAGE
    if verb == "keys":
        return keys(options, sys.stdout)
    try:
        settings = load_config(options.config)
        if verb == "submit":
            return submit(settings, options, sys.stdout)
        return watch(settings, options, sys.stdout)
    except ConfigError as exc:
        print(f"rbit: configuration error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    except BrokerUnreachable as exc:
        print(f"rbit: cannot reach the broker: {exc}", file=sys.stderr)
        return ExitCode.BROKER_UNREACHABLE
    except Unroutable as exc:
        print(f"rbit: job not published: {exc}", file=sys.stderr)
        return ExitCode.UNROUTABLE
    except (BrokerError, SignatureError, ValueError, OSError) as exc:
        print(f"rbit: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    except KeyboardInterrupt:
        return ExitCode.OK


def _body(options: argparse.Namespace) -> bytes:
    if options.file is not None:
        if options.body is not None:
            raise ValueError("give the body or --file, not both")
        with open(options.file, "rb") as handle:
            return handle.read()
    if options.body == "-":
        return sys.stdin.buffer.read()
    return (options.body or "").encode("utf-8")


def _headers(pairs: Sequence[str]) -> dict[str, str]:
    headers = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--header {pair!r}: expected K=V")
        headers[key] = value
    return headers


def submit(settings: Settings, options: argparse.Namespace, out: TextIO) -> int:
    """Publish the job the options describe; with ``--wait``, follow it."""
    from rbit.cli import ExitCode
    from rbit.client import Client

    if options.wait and "amqp" not in settings.status.sinks:
        raise ConfigError("--wait follows the job on the status exchange, but [status] "
                          "sinks has no 'amqp': workers with this config publish no "
                          "statuses to follow", file=settings.file, section="status",
                          key="sinks")
    body, headers = _body(options), _headers(options.header)
    with Client(settings, name="rbit submit") as client:
        result = client.submit(options.queue, body, job_id=options.job_id, headers=headers,
                               content_type=options.content_type, wait=options.wait,
                               timeout=options.timeout)
    if not options.wait:
        print(json.dumps({"job_id": result}) if options.json else result, file=out)
        return ExitCode.OK
    status = result.status.value if result.status else None
    if options.json:
        print(json.dumps({"job_id": result.job_id, "status": status,
                          "message": result.message, "final": result.final}), file=out)
    else:
        print(f"{result.job_id}\t{status or 'no final status'}\t{result.message}", file=out)
    if not result.final:
        return ExitCode.JOB_TIMEOUT
    return ExitCode.OK if status in ("Done", "Uploaded") else ExitCode.JOB_FAILED


def watch(settings: Settings, options: argparse.Namespace, out: TextIO) -> int:
    """Print statuses as they come, one line each (every field escaped)."""
    from rbit.cli import ExitCode
    from rbit.client import Client

    if "amqp" not in settings.status.sinks:
        print("rbit: warning: [status] sinks has no 'amqp' in this config; only workers "
              "that publish statuses to AMQP can be watched", file=sys.stderr)
    previous = _stop_on_sigterm()
    try:
        with Client(settings, name="rbit watch") as client:
            client.watch(job=options.job, queue=options.queue)
            for event in client.events(options.timeout):
                fields = ("time", "queue", "job_id", "status", "worker", "message")
                line = "\t".join(escape(event.get(name, ""), 500) for name in fields)
                print(line, file=out, flush=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return ExitCode.OK


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _stop_on_sigterm():
    """SIGTERM ends ``watch`` as Ctrl+C does (connection closed, exit code 0).

    Returns the handler it replaced (None: not the main thread, nothing replaced).
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


def keys(options: argparse.Namespace, out: TextIO) -> int:
    """``rbit keys generate|fingerprint``."""
    from rbit.cli import ExitCode
    from rbit.security import keys as keyfiles

    try:
        if options.verb == "generate":
            private, public = keyfiles.generate(options.name, options.out)
            key_id = keyfiles.fingerprint(keyfiles.load_public(public))
            print(f"{key_id}\n  private key: {private} (keep it secret)\n"
                  f"  public key:  {public} (copy it into the workers' trusted_keys)", file=out)
        else:
            print(keyfiles.fingerprint(keyfiles.load_public(options.file)), file=out)
    except FileExistsError as exc:
        print(f"rbit: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    except (keyfiles.KeyFileError, ValueError, OSError) as exc:
        print(f"rbit: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    return ExitCode.OK
