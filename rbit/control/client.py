"""``rbit ctl CONFIG COMMAND [ARGS] [--worker NAME] [--timeout S] [--json]``.

Sends one command to every worker of the config's vhost (or to one, by name) and
prints the replies. Before asking, it reads who was seen lately (the announces in
``rbit.fleet.seen``, see :mod:`rbit.control`); it stops waiting once every one of them
answered, or at the timeout, and names those that did not answer.

With ``[control] signing_key`` (or ``[security] signing_key``) each command is signed
for the workers that require it (:mod:`rbit.control.authority`).

Exit codes (:class:`CtlExit`): 0 every worker seen lately answered and obeyed;
4 a worker did not answer (or none answered at all); 5 a worker refused the command
(not authorized: user, or signature); 1 a worker answered with an error, or another
error; 2 bad command line; 69 the broker is unreachable; 78 the configuration is invalid.
"""

from __future__ import annotations

import argparse
import enum
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from rbit.amqp.control import ALL_KEY, worker_key
from rbit.amqp.fleet import FleetSession
from rbit.config import load_config
from rbit.control.authority import command_signer, sign_command
from rbit.control.commands import LEVELS, MAX_DEPTH, Command
from rbit.errors import BrokerError, BrokerUnreachable, ConfigError
from rbit.safetext import escape
from rbit.security.signing import Signer


class CtlExit(enum.IntEnum):
    """``rbit ctl``'s exit codes."""

    OK = 0
    ERROR = 1  # a worker answered with an error, or the session failed
    USAGE = 2
    NOT_ANSWERED = 4  # a worker seen lately did not answer, or no worker answered
    REFUSED = 5  # a worker refused the command: user not in [control] users, or signature
    BROKER_UNREACHABLE = 69
    CONFIG = 78


def _common(default: Any) -> argparse.ArgumentParser:
    # The same options before or after COMMAND; after it, they must not reset the
    # values given before it, hence SUPPRESS there.
    common = argparse.ArgumentParser(add_help=False, argument_default=default)
    common.add_argument("--worker", metavar="NAME", help="ask this worker only")
    common.add_argument("--timeout", type=float, metavar="S",
                        help="how long to wait for replies (default 5)")
    common.add_argument("--json", action="store_true", help="print the replies as JSON")
    return common


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rbit ctl", parents=[_common(None)],
                                     description="Ask the running workers of a fleet.")
    parser.set_defaults(timeout=5.0, json=False)
    parser.add_argument("config", help="an ini file with the fleet's [amqp] section")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub = _common(argparse.SUPPRESS)
    add = lambda name, **kw: commands.add_parser(name, parents=[sub], **kw)  # noqa: E731
    add("ping", help="name, host, pid, version, uptime of each worker")
    status = add("status", help="queues, running jobs, counts")
    status.add_argument("--verbose", action="store_true", help="list the running jobs")
    for name in ("pause", "resume"):
        pausing = add(name, help=f"{name} taking jobs from a queue")
        which = pausing.add_mutually_exclusive_group(required=True)
        which.add_argument("queue", nargs="?")
        which.add_argument("--all", action="store_true", help="every queue of the worker")
    add("shutdown", help="stop gracefully, as SIGTERM does")
    loglevel = add("loglevel", help="set a logger's level")
    loglevel.add_argument("logger", help="a logger name, or root")
    loglevel.add_argument("level", type=str.upper, choices=LEVELS)
    history = add("history", help="the last outcomes of a queue's jobs")
    history.add_argument("queue")
    history.add_argument("--depth", type=int, default=20, help=f"1..{MAX_DEPTH} (default 20)")
    return parser


def command_from(options: argparse.Namespace) -> Command:
    """The :class:`Command` the parsed command line asks for."""
    name = options.command
    return Command(name=name, verbose=getattr(options, "verbose", False),
                   queue=getattr(options, "queue", None), all=getattr(options, "all", False),
                   logger=getattr(options, "logger", None), level=getattr(options, "level", None),
                   depth=getattr(options, "depth", 20))


def main(argv: Sequence[str], out: TextIO | None = None) -> int:
    """Run ``rbit ctl``; returns the exit code (see :class:`CtlExit`)."""
    out = out or sys.stdout
    try:
        options = _parser().parse_args(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0) and CtlExit.USAGE
    if options.timeout <= 0 or (options.command == "history"
                                and not 1 <= options.depth <= MAX_DEPTH):
        print("rbit ctl: --timeout must be > 0 and --depth 1..10000", file=sys.stderr)
        return CtlExit.USAGE
    try:
        settings = load_config(options.config)
        signer = command_signer(settings)
    except ConfigError as exc:
        print(f"rbit ctl: configuration error: {exc}", file=sys.stderr)
        return CtlExit.CONFIG
    try:
        with FleetSession(settings.amqp) as session:
            result = ask(session, command_from(options), options.worker, options.timeout,
                         signer=signer)
    except BrokerUnreachable as exc:
        print(f"rbit ctl: cannot reach the broker: {exc}", file=sys.stderr)
        return CtlExit.BROKER_UNREACHABLE
    except BrokerError as exc:
        print(f"rbit ctl: {exc}", file=sys.stderr)
        return CtlExit.ERROR
    if options.json:
        print(json.dumps(result, indent=2, sort_keys=True), file=out)
    else:
        print_result(result, out)
    return exit_code(result)


def seen_lately(announces: list[bytes]) -> dict[str, dict[str, Any]]:
    """Workers whose last announce is a ``hello``, by name, from the fleet's record."""
    seen: dict[str, dict[str, Any]] = {}
    for body in announces:
        try:
            doc = json.loads(body)
        except ValueError:
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
            continue
        if doc.get("event") == "bye":
            seen.pop(doc["name"], None)
        else:
            seen[doc["name"]] = doc
    return seen


def ask(session: FleetSession, command: Command, worker: str | None,
        timeout: float, signer: Signer | None = None) -> dict[str, Any]:
    """Ask the fleet (or ``worker``) and gather the answers.

    ``signer`` signs the command (workers with ``[control] trusted_keys`` require it).

    Returns:
        ``{"command", "replies": [reply...], "missing": [{"name", ...last announce}]}``.
    """
    seen = seen_lately(session.seen())
    expected = {worker} if worker else set(seen)

    def enough(replies: list[bytes]) -> bool:
        return bool(expected) and expected <= _names(replies)

    key = worker_key(worker) if worker else ALL_KEY
    sign = None
    if signer is not None:
        def sign(routing_key: str, message_id: str, body: bytes) -> dict[str, Any]:
            return sign_command(signer, routing_key, message_id, "application/json", body)
    raw = session.ask(key, command.to_json(), timeout, enough, sign=sign)
    replies = [doc for doc in (_load(body) for body in raw) if doc is not None]
    answered = {r.get("worker") for r in replies}
    missing = [{"name": name, **{k: v for k, v in seen.get(name, {}).items()
                                 if k in ("host", "pid", "time")}}
               for name in sorted(expected - answered)]
    return {"command": command.name, "replies": replies, "missing": missing}


def _names(replies: list[bytes]) -> set[str]:
    return {doc.get("worker") for doc in (_load(body) for body in replies) if doc}


def _load(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def exit_code(result: dict[str, Any]) -> CtlExit:
    """The exit code a result calls for (see :class:`CtlExit`)."""
    replies = result["replies"]
    if any("refused" in r for r in replies):
        return CtlExit.REFUSED
    if result["missing"] or not replies:
        return CtlExit.NOT_ANSWERED
    if any(not r.get("ok") for r in replies):
        return CtlExit.ERROR
    return CtlExit.OK


def print_result(result: dict[str, Any], out: TextIO) -> None:
    """Print the replies for a person; every text from the network is escaped."""
    for doc in sorted(result["replies"], key=lambda r: str(r.get("worker"))):
        name = escape(doc.get("worker"), 100)
        if "refused" in doc:
            print(f"{name}: refused: {escape(doc['refused'], 300)}", file=out)
        elif "error" in doc:
            print(f"{name}: error: {escape(doc['error'], 300)}", file=out)
        else:
            print(_describe(name, doc), file=out)
    for gone in result["missing"]:
        where = f" (last seen on {escape(gone.get('host', '?'), 100)}, " \
                f"pid {escape(gone.get('pid', '?'), 20)})" if "host" in gone else ""
        print(f"{escape(gone['name'], 100)}: no answer{where}", file=out)
    if not result["replies"] and not result["missing"]:
        print("no worker answered", file=out)


def _describe(name: str, doc: dict[str, Any]) -> str:
    command = doc.get("command")
    ident = (f"{name}\thost={escape(doc.get('host'), 100)}"
             f"\tpid={escape(doc.get('pid'), 20)}"
             f"\tversion={escape(doc.get('version'), 40)}"
             f"\tuptime={escape(doc.get('uptime'), 20)} s")
    if command == "ping":
        return ident
    if command == "status":
        return _describe_status(ident, doc)
    if command in ("pause", "resume"):
        paused = ", ".join(escape(q, 255) for q in doc.get("paused") or []) or "none"
        return f"{name}: {command}d; paused now: {paused}"
    if command == "shutdown":
        return f"{name}: stopping"
    if command == "loglevel":
        level = escape(doc.get("level"), 10)
        return f"{name}: logger {escape(doc.get('logger'), 255)} at {level}"
    rows = [f"{name}: history of {escape(doc.get('queue'), 255)}"]
    for item in doc.get("history") or []:
        rows.append(f"  {escape(item.get('job_id'), 200)}\t{escape(item.get('status'), 20)}"
                    f"\ttry {escape(item.get('attempt'), 10)}"
                    f"\t{_number(item.get('duration')):.3f} s"
                    f"\t{_usage_text(item.get('usage'))}"
                    f"\t{escape(item.get('message'), 200)}")
    return "\n".join(rows)


def _usage_text(usage: Any) -> str:
    """``cpu 0.512 s, peak 10240 KiB`` for a history row's usage; ``-`` if not metered."""
    if not isinstance(usage, dict):
        return "-"
    text = f"cpu {_number(usage.get('cpu_s')):.3f} s"
    rss = usage.get("max_rss_kib")
    return text if rss is None else f"{text}, peak {_number(rss):.0f} KiB"


def _describe_status(ident: str, doc: dict[str, Any]) -> str:
    lines = [ident,
             f"  broker connected: {escape(doc.get('broker_connected'), 10)}"
             f"\tstatus backlog: {escape(doc.get('status_backlog'), 20)}"
             f"\trunning: {escape(doc.get('running_count'), 20)}"]
    counts = doc.get("counts") or {}
    lines.append("  counts: " + ", ".join(f"{escape(k, 40)}={escape(v, 20)}"
                                          for k, v in sorted(counts.items())))
    for queue in doc.get("queues") or []:
        state = "paused" if queue.get("paused") else \
            "consuming" if queue.get("consuming") else "not consuming"
        lines.append(f"  queue {escape(queue.get('queue'), 255)}: {state}")
    for item in doc.get("schedules") or []:
        lines.append(f"  schedule {escape(item.get('name'), 100)}: "
                     f"{escape(item.get('trigger'), 200)}\t{escape(item.get('role'), 20)}"
                     f"\tlast fire: {escape(item.get('last_fire') or '-', 40)}"
                     f"\tnext fire: {escape(item.get('next_fire') or '-', 40)}")
    for job in doc.get("running") or []:
        lines.append(f"  running {escape(job.get('job_id'), 200)} on "
                     f"{escape(job.get('queue'), 255)} since {_number(job.get('since')):.0f}")
    return "\n".join(lines)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else 0.0
