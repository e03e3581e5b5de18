"""Broadcast and gather: one job run on every worker serving a queue, every answer back.

::

    rbit broadcast CONFIG QUEUE [BODY | - | --file F] [--timeout S] [--json]
                   [--job-id ID] [--header K=V ...] [--content-type T]

or from Python::

    from rbit.broadcast import broadcast
    result = broadcast(load_config("rbit.ini"), "cnx_any_latex_pdf", b"{}", timeout=30)

The job goes once to the exchange ``rbit.broadcast`` with the routing key QUEUE; every
live worker with a ``[runner:QUEUE]`` section (``mode = consume``) gets a copy in its
own exclusive queue (:mod:`rbit.amqp.broadcast`) and runs it through that runner, in a
slot of the queue's job pool like any job of QUEUE. Each answers with:

* ``worker``, ``queue``, ``job_id``, ``ok`` (true when the runner ended Done) and
  ``status`` (``Done``; ``Failed``, or ``Blocked`` for a runner that asked to be tried
  later: a broadcast is not tried again);
* ``result``: a ``python!`` runner's return value (JSON-serialisable; one that is not
  makes the answer an error), or a ``shell!`` command's stdout, its first 64 KiB, with
  ``truncated`` true when it wrote more;
* ``error`` when not ok: the exception and traceback, the exit status and stderr tail,
  or why the copy was not run (``refused`` is then true for a signature refused).

Whom to expect: the workers whose last announce in ``rbit.fleet.seen`` (see ``rbit
ctl``) lists QUEUE among its ``broadcast`` queues, and has not said goodbye. The caller
stops waiting once each answered, or at the timeout; the others are ``missing``. A
worker killed mid-job never answers, and is named missing at the timeout. A copy no
worker took before the timeout expires in its queue (a per-message TTL). Answers from
workers that were not expected (no announce: ``[control] enabled = no``) are listed too.

What a worker checks: the same as for a job of QUEUE. A runner that requires
signatures (``[security] require_signed``) runs only a copy signed for the target
``("rbit.broadcast", QUEUE)`` by a trusted key, not seen before (the replay window);
the caller signs with ``[security] signing_key``. A copy refused, or one that cannot
run (no runner, undecodable headers, the worker stopping), is answered with the reason
and acked: a broadcast is never requeued, retried or dead-lettered. The job id follows
the job-id rule (:mod:`rbit.message`). A paused queue still takes broadcasts.

On the worker a copy is a job: it gets statuses (Building, then Done or Failed), it is
in ``rbit ctl status``'s running jobs while it runs, and a copy that ended Done is
counted and kept in the history; one that failed is told to its caller (and logged),
not counted as dead-lettered.

Exit codes (:class:`BroadcastExit`, the same numbers as ``rbit ctl``): 0 every worker
expected answered ok; 4 a worker expected did not answer, or none answered at all; 5 a
worker refused the job (signature); 1 a worker answered an error (the job failed
there), or another error; 2 bad command line; 69 the broker is unreachable; 78 the
configuration is invalid. When several apply, the first in the order 5, 4, 1 wins.
"""

from __future__ import annotations

import argparse
import enum
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from rbit import decoding
from rbit.amqp.broadcast import BROADCAST_EXCHANGE, BroadcastDelivery, Routes
from rbit.config import Settings, load_config
from rbit.errors import BrokerError, BrokerUnreachable, ConfigError, SignatureError
from rbit.message import JOB_ID_PATTERN
from rbit.outcome import Status
from rbit.safetext import escape

if TYPE_CHECKING:
    from rbit.amqp.gather import BroadcastSession
    from rbit.dispatch import JobPool
    from rbit.security.gate import WorkerSecurity

log = logging.getLogger(__name__)

#: How long the command line waits for answers by default (seconds).
DEFAULT_TIMEOUT = 30.0


class BroadcastExit(enum.IntEnum):
    """``rbit broadcast``'s exit codes (those of ``rbit ctl``)."""

    OK = 0
    FAILED = 1  # a worker answered an error, or the session failed
    USAGE = 2
    NOT_ANSWERED = 4  # a worker expected did not answer, or none answered
    REFUSED = 5  # a worker refused the job: its signature
    BROKER_UNREACHABLE = 69
    CONFIG = 78


# ------------------------------------------------------------------ the worker's side


def routes(pools: Sequence[JobPool], security: WorkerSecurity | None, settings: Settings,
           report: Callable[[str, str, Status, str], None]) -> Routes:
    """What takes the broadcast copies of each of the worker's queues.

    A copy for a runner that requires signatures is checked first, as its queue's jobs
    are; a refused one is answered (never run) and reported Failed.
    """
    found: dict[str, Any] = {}
    for pool in pools:
        runner = pool.settings
        accept: Callable[[Any], None] = pool.on_delivery
        if security is not None and settings.require_signed(runner):
            accept = _signed(security, runner.queue, accept, report)
        found[runner.queue] = (accept, decoding.DEFAULT_ALLOWED_CLASSES | runner.allowed_classes)
    return found


def _signed(security: WorkerSecurity, queue: str, accept: Callable[[Any], None],
            report: Callable[[str, str, Status, str], None]) -> Callable[[Any], None]:
    targets = {(BROADCAST_EXCHANGE, queue)}

    def checked(delivery: BroadcastDelivery) -> None:
        try:
            security.check(delivery, targets, queue)
        except SignatureError as exc:
            reason = f"signature refused: {exc}"
            job_id = delivery.message.job_id
            log.warning("job %s: broadcast %s; not run", job_id, reason)
            report(job_id, queue, Status.FAILED, reason)
            delivery.answer(None, reason, refused=True)
            return
        accept(delivery)

    return checked


# ------------------------------------------------------------------ the caller's side


def broadcast(settings: Settings, queue: str, body: bytes | str, *,
              timeout: float = DEFAULT_TIMEOUT, job_id: str | None = None,
              headers: Mapping[str, Any] | None = None, content_type: str | None = None,
              session: BroadcastSession | None = None) -> dict[str, Any]:
    """Run one job on every live worker serving ``queue`` and gather their answers.

    Args:
        settings: A loaded config: ``[amqp]``, and ``[security] signing_key`` to sign.
        queue: The queue (runner section name) whose workers run it.
        body: The job's body; text is sent as UTF-8.
        timeout: Seconds to wait for the answers (the copies expire then too).
        job_id: The job's id (the AMQP ``message_id``); a fresh one when None.
        headers: Application headers (no ``x-rbit-`` ones).
        content_type: The AMQP content type.
        session: An open session to use (else one is opened and closed here).

    Returns:
        ``{"queue", "job_id", "replies": [answer...], "missing": [{"name", "host",
        "pid", "time"}]}``; each answer as the module docstring says.

    Raises:
        ValueError: ``job_id`` is not a valid job id, or ``timeout`` is not positive.
        BrokerUnreachable: No host accepts a connection.
        BrokerError: The broker refused the broadcast or the session failed.
        ConfigError: ``signing_key`` is set but unusable.
        SignatureError: A header cannot be signed.
    """
    from rbit.amqp.gather import BroadcastSession
    from rbit.client import new_job_id  # the sending side only: a worker has no use for it

    job_id = new_job_id() if job_id is None else job_id
    if not JOB_ID_PATTERN.fullmatch(job_id):
        raise ValueError(f"job id {escape(job_id, 80)!r}: use letters, digits and ._:@+=- "
                         "(not first: . -), at most 200 characters")
    if not timeout > 0:
        raise ValueError("timeout must be > 0")
    data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
    sent = dict(headers or {})
    if settings.security.signing_key:
        from rbit.security import keys
        from rbit.security.signing import Signer
        signer = Signer(keys.signing_key(settings.security.signing_key, file=settings.file))
        sent.update(signer.sign(BROADCAST_EXCHANGE, queue, job_id, content_type, sent, data))
    if session is None:
        with BroadcastSession(settings.amqp, "rbit broadcast") as own:
            return _gather(own, queue, data, job_id, sent, content_type, timeout)
    return _gather(session, queue, data, job_id, sent, content_type, timeout)


def _gather(session: BroadcastSession, queue: str, data: bytes, job_id: str,
            headers: dict[str, Any], content_type: str | None,
            timeout: float) -> dict[str, Any]:
    seen = expected_workers(session.seen(), queue)

    def enough(raw: list[bytes]) -> bool:
        return bool(seen) and set(seen) <= {doc.get("worker") for doc in _docs(raw)}

    raw = session.broadcast(queue, data, message_id=job_id, headers=headers,
                            content_type=content_type, timeout=timeout, enough=enough)
    replies = [doc for doc in _docs(raw) if doc.get("job_id") == job_id]
    answered = {doc.get("worker") for doc in replies}
    missing = [{"name": name, **{k: v for k, v in seen[name].items()
                                 if k in ("host", "pid", "time")}}
               for name in sorted(set(seen) - answered)]
    return {"queue": queue, "job_id": job_id, "replies": replies, "missing": missing}


def expected_workers(announces: list[bytes], queue: str) -> dict[str, dict[str, Any]]:
    """The workers seen lately that take broadcasts for ``queue``, by name.

    From the announces of ``rbit.fleet.seen``, oldest first: a worker's last announce
    counts, and a ``bye`` removes it.
    """
    seen: dict[str, dict[str, Any]] = {}
    for doc in _docs(announces):
        name = doc.get("name")
        if not isinstance(name, str):
            continue
        queues = doc.get("broadcast")
        if doc.get("event") == "bye" or not isinstance(queues, list) or queue not in queues:
            seen.pop(name, None)
        else:
            seen[name] = doc
    return seen


def _docs(bodies: list[bytes]) -> list[dict[str, Any]]:
    docs = []
    for body in bodies:
        try:
            doc = json.loads(body)
        except ValueError:
            continue
        if isinstance(doc, dict):
            docs.append(doc)
    return docs


def exit_code(result: Mapping[str, Any]) -> BroadcastExit:
    """The exit code a result calls for (see :class:`BroadcastExit`)."""
    replies = result["replies"]
    if any(r.get("refused") for r in replies):
        return BroadcastExit.REFUSED
    if result["missing"] or not replies:
        return BroadcastExit.NOT_ANSWERED
    if any(r.get("ok") is not True for r in replies):
        return BroadcastExit.FAILED
    return BroadcastExit.OK


# ------------------------------------------------------------------ the command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rbit broadcast",
        description="Run one job on every live worker serving QUEUE; print each answer.")
    parser.add_argument("config", help="the ini file ([amqp], [security] signing_key)")
    parser.add_argument("queue", help="the queue (runner section) whose workers run it")
    parser.add_argument("body", nargs="?", default=None,
                        help="the body; '-' reads standard input (default: empty)")
    parser.add_argument("--file", default=None, help="read the body from this file")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                        help=f"how long to wait for the answers (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--json", action="store_true", help="print the answers as JSON")
    parser.add_argument("--job-id", default=None, help="the job id (default: a new UUID)")
    parser.add_argument("--header", action="append", default=[], metavar="K=V",
                        help="an application header (repeatable)")
    parser.add_argument("--content-type", default=None, help="the AMQP content type")
    return parser


def main(argv: Sequence[str], out: TextIO | None = None,
         stdin: Any = None) -> int:
    """Run ``rbit broadcast``; returns the exit code (see :class:`BroadcastExit`)."""
    out = out or sys.stdout
    try:
        options = _parser().parse_args(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0) and BroadcastExit.USAGE
    headers = dict(h.partition("=")[::2] for h in options.header)
    if options.timeout <= 0 or (options.file and options.body is not None) \
            or any("=" not in h for h in options.header):
        print("rbit broadcast: --timeout must be > 0, headers K=V, and one body at most",
              file=sys.stderr)
        return BroadcastExit.USAGE
    try:
        settings = load_config(options.config)
        body = _body(options, stdin or sys.stdin.buffer)
        result = broadcast(settings, options.queue, body, timeout=options.timeout,
                           job_id=options.job_id, headers=headers,
                           content_type=options.content_type)
    except ConfigError as exc:
        print(f"rbit broadcast: configuration error: {exc}", file=sys.stderr)
        return BroadcastExit.CONFIG
    except BrokerUnreachable as exc:
        print(f"rbit broadcast: cannot reach the broker: {exc}", file=sys.stderr)
        return BroadcastExit.BROKER_UNREACHABLE
    except (ValueError, SignatureError, OSError) as exc:
        print(f"rbit broadcast: {exc}", file=sys.stderr)
        return BroadcastExit.USAGE
    except BrokerError as exc:
        print(f"rbit broadcast: {exc}", file=sys.stderr)
        return BroadcastExit.FAILED
    if options.json:
        print(json.dumps(result, indent=2, sort_keys=True), file=out)
    else:
        print_result(result, out)
    return exit_code(result)


def _body(options: argparse.Namespace, stdin: Any) -> bytes:
    if options.file:
        with open(options.file, "rb") as file:
            return file.read()
    if options.body == "-":
        return stdin.read()
    return (options.body or "").encode("utf-8")


def print_result(result: Mapping[str, Any], out: TextIO) -> None:
    """Print the answers for a person; every text from the network is escaped."""
    for doc in sorted(result["replies"], key=lambda r: str(r.get("worker"))):
        name = escape(doc.get("worker"), 100)
        if doc.get("ok") is True:
            value = doc.get("result")
            shown = value if isinstance(value, str) else json.dumps(value)
            cut = " (truncated)" if doc.get("truncated") else ""
            print(f"{name}: ok{cut}: {escape(shown, 2000)}", file=out)
        else:
            what = "refused" if doc.get("refused") else escape(doc.get("status"), 20)
            print(f"{name}: {what}: {escape(doc.get('error'), 2000)}", file=out)
    for gone in result["missing"]:
        where = f" (last seen on {escape(gone.get('host', '?'), 100)}, " \
                f"pid {escape(gone.get('pid', '?'), 20)})" if "host" in gone else ""
        print(f"{escape(gone['name'], 100)}: no answer{where}", file=out)
    if not result["replies"] and not result["missing"]:
        print("no worker answered", file=out)
