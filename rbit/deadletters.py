"""``rbit dead-letters CONFIG list|replay|purge QUEUE``: look after a queue's dead letters.

* ``list`` shows each dead job (id, reason, tries, worker, time, start of the body)
  without removing it: the messages are taken unacked and handed back on close.
* ``replay`` moves dead jobs back to the work queue with their try count reset; each
  one is acked on ``QUEUE.dead`` only after the broker confirmed the copy, so a crash
  in between leaves a duplicate, never a loss. A signed job's copy is counter-signed
  with the operator's ``[security] signing_key`` (a key the workers trust), which makes
  it verifiable again though its own signature is stale by now
  (:mod:`rbit.security.signing`); without that key, replaying a signed job to a queue
  that requires signatures fails.
* ``purge`` deletes them.

``QUEUE.dead`` is declared by the first job that dies; before that, every verb exits
with :attr:`rbit.cli.ExitCode.NO_QUEUE` (66) and says so in one line.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from rbit.amqp.admin import AdminSession
from rbit.amqp.frames import TRIMMED_HEADER
from rbit.amqp.records import HELD_BY_HEADER, HOLD_ID_HEADER, Delivery, Publish
from rbit.config import Settings, load_config
from rbit.errors import BrokerError, BrokerUnreachable, ConfigError, QueueNotFound
from rbit.fate import DEAD_REASON_HEADER, DEAD_TIME_HEADER, DEAD_WORKER_HEADER
from rbit.message import ATTEMPTS_HEADER, LAST_ERROR_HEADER, UNDECODABLE_HEADER
from rbit.safetext import escape
from rbit.security.signing import COUNTER_HEADERS, REPLAYED_HEADER, SIG_HEADER, Signer
from rbit.topology import dead_letter_queue

log = logging.getLogger(__name__)

#: Header counting how often a job was replayed from the dead letters.
_DROPPED_ON_REPLAY = (*COUNTER_HEADERS, ATTEMPTS_HEADER, LAST_ERROR_HEADER, DEAD_REASON_HEADER,
                      DEAD_TIME_HEADER, DEAD_WORKER_HEADER, "x-rbit-dead-queue", "x-death",
                      "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
                      "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason",
                      "x-delivery-count", HELD_BY_HEADER, HOLD_ID_HEADER, UNDECODABLE_HEADER,
                      TRIMMED_HEADER)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rbit dead-letters",
                                     description="List, replay or purge a queue's dead letters.")
    parser.add_argument("config", help="the worker's ini file")
    parser.add_argument("action", choices=("list", "replay", "purge"))
    parser.add_argument("queue", help="the work queue (a [runner:QUEUE] section)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many jobs")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run the verb; returns the exit code (see :class:`rbit.cli.ExitCode`)."""
    from rbit.cli import ExitCode

    try:
        options = _parser().parse_args(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0) and ExitCode.USAGE
    try:
        settings = load_config(options.config)
        _check_queue(settings, options.queue)
    except ConfigError as exc:
        print(f"rbit: configuration error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    try:
        signer = operator_signer(settings) if options.action == "replay" else None
    except ConfigError as exc:
        print(f"rbit: configuration error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG
    try:
        with AdminSession(settings.amqp) as session:
            if options.action == "replay":
                runner = next(r for r in settings.runners if r.queue == options.queue)
                replay(session, options.queue, options.limit, sys.stdout, signer=signer,
                       max_skew=settings.security.max_skew,
                       signed_only=settings.require_signed(runner))
            else:
                verb = {"list": list_dead, "purge": purge}[options.action]
                verb(session, options.queue, options.limit, sys.stdout)
    except BrokerUnreachable as exc:
        print(f"rbit: cannot reach the broker: {exc}", file=sys.stderr)
        return ExitCode.BROKER_UNREACHABLE
    except QueueNotFound as exc:
        print(f"rbit: no dead letters for {options.queue!r} yet: {exc}", file=sys.stderr)
        return ExitCode.NO_QUEUE
    except BrokerError as exc:
        print(f"rbit: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    return ExitCode.OK


def operator_signer(settings: Settings) -> Signer | None:
    """The operator's key, which counter-signs replays of signed jobs (None: not set)."""
    if not settings.security.signing_key:
        return None
    from rbit.security import keys

    return Signer(keys.signing_key(settings.security.signing_key, file=settings.file))


def _check_queue(settings: Settings, queue: str) -> None:
    if queue not in {runner.queue for runner in settings.runners}:
        raise ConfigError(f"no [runner:{queue}] section", file=settings.file)


def _reason(headers: dict) -> object:
    reason = headers.get(DEAD_REASON_HEADER) or headers.get(UNDECODABLE_HEADER) or \
        headers.get("x-first-death-reason", "?")
    reason_text = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else reason
    return reason_text.splitlines()[0] if isinstance(reason_text, str) and reason_text \
        else reason_text


def fields(delivery: Delivery) -> dict[str, str]:
    """A dead letter's job id, reason (first line), tries, worker and time, as text.

    Every value came from the network: each is made printable and bounded
    (:func:`rbit.safetext.escape`); a reader showing them must still treat them as text.
    """
    message = delivery.message
    headers = message.headers
    return {"job_id": message.job_id, "reason": escape(_reason(headers) or "", 300),
            "attempts": escape(headers.get(ATTEMPTS_HEADER, "?"), 20),
            "worker": escape(headers.get(DEAD_WORKER_HEADER, "?"), 100),
            "time": escape(headers.get(DEAD_TIME_HEADER, "?"), 40)}


def peek(session: AdminSession, queue: str, limit: int) -> list[dict[str, str]]:
    """The first ``limit`` dead letters of ``queue`` as :func:`fields`, left in place.

    They are taken unacked: they go back when ``session`` closes, so close it soon.
    """
    return [fields(delivery) for delivery in _take(session, queue, limit)]


def _describe(delivery: Delivery) -> str:
    # Every value here came from the network: escaped, so that it can neither forge a
    # line nor send escape sequences to the terminal, and bounded.
    message = delivery.message
    headers = message.headers
    first_line = _reason(headers)
    job_id = message.job_id  # sets raw_job_id when the id had to be made safe
    raw = f" (named {escape(message.raw_job_id, 200)})" if message.raw_job_id else ""
    return (f"{job_id}{raw}\ttries={escape(headers.get(ATTEMPTS_HEADER, '?'), 20)}\t"
            f"worker={escape(headers.get(DEAD_WORKER_HEADER, '?'), 100)}\t"
            f"time={escape(headers.get(DEAD_TIME_HEADER, '?'), 40)}\n"
            f"    reason: {escape(first_line or '', 300)}\n"
            f"    body: {escape(message.body[:80], 80)}")


def _take(session: AdminSession, queue: str, limit: int | None):
    taken = 0
    while limit is None or taken < limit:
        delivery = session.get(dead_letter_queue(queue))
        if delivery is None:
            return
        taken += 1
        yield delivery


def list_dead(session: AdminSession, queue: str, limit: int | None, out: TextIO) -> int:
    """Print the dead letters of ``queue``; they stay where they are."""
    count = 0
    for delivery in _take(session, queue, limit):
        print(_describe(delivery), file=out)
        count += 1
    print(f"{count} dead job(s) in {dead_letter_queue(queue)}", file=out)
    return count


def replay(session: AdminSession, queue: str, limit: int | None, out: TextIO, *,
           signer: Signer | None = None, max_skew: float = 300.0,
           signed_only: bool = False) -> int:
    """Move dead letters back to the work queue, try count reset.

    Args:
        session: The broker session.
        queue: The work queue.
        limit: At most this many jobs (None: all).
        out: Where to say how many were replayed.
        signer: Counter-signs the copies of signed jobs (the operator's key).
        max_skew: How long (seconds) a counter-signed copy stays valid.
        signed_only: The queue requires signed jobs (``require_signed``): a signed job
            cannot be replayed without ``signer``.

    Raises:
        BrokerError: ``signed_only``, a signed job and no ``signer``: it stays in the
            dead letters.
    """
    count = 0
    for delivery in _take(session, queue, limit):
        headers = {k: v for k, v in delivery.message.headers.items()
                   if k not in _DROPPED_ON_REPLAY}
        replayed = delivery.message.headers.get(REPLAYED_HEADER, 0)
        replayed = min(max(replayed, 0), 1_000_000) if replayed.__class__ is int else 0
        headers[REPLAYED_HEADER] = replayed + 1
        if SIG_HEADER in headers and (signer is not None or signed_only):
            if signer is None:
                raise BrokerError(f"job {delivery.message.job_id} is signed: its replay must "
                                  "be counter-signed; set [security] signing_key to a key "
                                  f"the workers trust ({count} job(s) replayed before it)")
            until = int(time.time() + max_skew)
            headers.update(signer.countersign_copy("replay", headers, queue, replayed + 1,
                                                   until))
        session.publish(Publish("", queue, delivery.message.body, headers=headers,
                                properties=delivery.properties))
        session.ack(delivery)
        count += 1
    print(f"replayed {count} job(s) to {queue}", file=out)
    return count


def purge(session: AdminSession, queue: str, limit: int | None, out: TextIO) -> int:
    """Delete the dead letters of ``queue`` (``limit`` is not supported here)."""
    if limit is not None:
        raise BrokerError("purge deletes every dead letter; --limit does not apply")
    count = session.purge(dead_letter_queue(queue))
    print(f"purged {count} job(s) from {dead_letter_queue(queue)}", file=out)
    return count
