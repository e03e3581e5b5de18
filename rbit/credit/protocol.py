"""The front door's line protocol, as spoken by the CreditPiggy daemon.

One command a line: ``COMMAND[,key=value[,...]]``. The command is case-insensitive;
arguments are separated by ``,`` and a value is everything after the first ``=`` (so a
value may itself contain ``=``, but never ``,``). The daemon answers each line with
``OK`` or ``ER <reason>`` on a line of its own.

=========  ==========================================================================
ALLOC      ``slot``; ``credits``, or ``min`` and/or ``max``; optional ``expire``
           (minutes). ``ALLOC,slot=x`` alone is accepted as the old daemon did: the
           CreditPiggy server then grants one credit at claim time.
CLAIM      ``slot``, ``machine``; optional ``credits``
COUNTERS   ``slot`` and one or more ``name=±n`` (names may contain ``/``)
META       ``slot`` and one or more ``name=value``
DISCARD    ``slot``; optional ``reason``
=========  ==========================================================================

Any command may carry ``event_id=ID`` (8 to 128 characters of ``A-Z a-z 0-9 . _ : -``,
starting with a letter or digit): the event's id instead of a fresh one. The credit
runner counts an id once, so a client that resends a line after ``ER not confirmed``
(or after no reply at all) with the same ``event_id`` cannot be counted twice. The key
is reserved: it is never a counter or meta name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from rbit.credit.events import CreditEvent
from rbit.errors import RbitError

#: Longest accepted line in bytes, line terminator excluded.
MAX_LINE_BYTES = 4096

_INTEGER = re.compile(r"[+-]?[0-9]{1,18}").fullmatch
_UNSIGNED = re.compile(r"\+?[0-9]{1,18}").fullmatch
# Control characters other than tab have no business in a slot id or a value, and
# a stray CR/NUL usually means the client framed its lines wrongly.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_EVENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{7,127}").fullmatch


class ProtocolError(RbitError):
    """A line is malformed or incomplete; ``reason`` is what the ``ER`` reply says."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_line(line: bytes | str) -> CreditEvent:
    """Parse one protocol line into a credit event.

    Surrounding whitespace (and the line terminator) is ignored.

    Args:
        line: The line, as read from the socket or typed by a user.

    Returns:
        The event, with the line's ``event_id`` or a fresh id.

    Raises:
        ProtocolError: The line is too long, not UTF-8, names an unknown command,
            misses a required argument, repeats one, or has a malformed value.
    """
    text = _decode(line).strip(" \t\r\n")
    if not text:
        raise ProtocolError("empty line")
    if _CONTROL.search(text):
        raise ProtocolError("line contains control characters")
    name, _, rest = text.partition(",")
    command = name.strip().lower()
    check = _CHECKS.get(command)
    if check is None:
        raise ProtocolError(f"unknown command {_shorten(name.strip())!r}")
    args = _split_args(rest) if rest else {}
    event_id = args.pop("event_id", None)
    if event_id is not None and not _EVENT_ID(event_id.strip()):
        raise ProtocolError("argument 'event_id' must be 8-128 characters of "
                            "A-Z a-z 0-9 . _ : - (starting with a letter or digit)")
    return CreditEvent(command, check(args), None if event_id is None else event_id.strip())


def format_line(event: CreditEvent, *, with_id: bool = False) -> str:
    """The protocol line (without terminator) for ``event``'s command and arguments.

    With ``with_id`` the line carries ``event_id=<event.id>`` too, so that sending it
    again cannot count it twice.

    Raises:
        ProtocolError: A key or value cannot travel on one line (holds ``,``, a line
            break, or a key holds ``=``).
    """
    parts = [event.command.upper()]
    for key, value in event.args.items():
        if "," in f"{key}{value}" or "=" in str(key) or _CONTROL.search(f"{key}{value}"):
            raise ProtocolError(f"argument {_shorten(str(key))!r} cannot be written on one line")
        parts.append(f"{key}={value}")
    if with_id:
        parts.append(f"event_id={event.id}")
    return ",".join(parts)


def reply_for(error: ProtocolError | None) -> bytes:
    """The reply line for a line that was accepted (``None``) or refused."""
    if error is None:
        return b"OK\n"
    reason = _CONTROL.sub(" ", error.reason)
    return f"ER {reason}\n".encode("utf-8", "replace")


def _decode(line: bytes | str) -> str:
    # surrogatepass: a str with lone surrogates becomes bytes that fail to decode below.
    raw = line.encode("utf-8", "surrogatepass") if isinstance(line, str) else bytes(line)
    if len(raw) > MAX_LINE_BYTES and len(raw.rstrip(b"\r\n")) > MAX_LINE_BYTES:
        raise ProtocolError("line too long")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("line is not valid UTF-8") from None


def _split_args(rest: str) -> dict[str, str]:
    args: dict[str, str] = {}
    for item in rest.split(","):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals:
            reason = f"argument {_shorten(key)!r} has no '='" if key else "empty argument"
            raise ProtocolError(reason)
        if not key:
            raise ProtocolError("argument with an empty name")
        if key in args:
            raise ProtocolError(f"duplicate argument {_shorten(key)!r}")
        args[key] = value
    return args


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------
# Per-command checks: each takes the raw arguments and returns the event's arguments.


def _slot(args: Mapping[str, str]) -> str:
    slot = args.get("slot")
    if slot is None:
        raise ProtocolError("missing argument 'slot'")
    if not slot.strip():
        raise ProtocolError("empty slot")
    return slot


def _only(args: Mapping[str, str], allowed: frozenset[str]) -> None:
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise ProtocolError(f"unknown argument {_shorten(unknown[0])!r}")


def _integer(args: Mapping[str, str], key: str, signed: bool = False) -> int:
    value = args[key].strip()
    if not (_INTEGER if signed else _UNSIGNED)(value):
        kind = "an integer" if signed else "a non-negative integer"
        raise ProtocolError(f"argument {_shorten(key)!r} must be {kind}")
    return int(value)


def _alloc(args: Mapping[str, str]) -> dict[str, Any]:
    _only(args, frozenset({"slot", "credits", "min", "max", "expire"}))
    out: dict[str, Any] = {"slot": _slot(args)}
    out.update((key, _integer(args, key)) for key in ("credits", "min", "max") if key in args)
    if "credits" in out and ("min" in out or "max" in out):
        raise ProtocolError("give either credits or min/max, not both")
    if "min" in out and "max" in out and out["min"] > out["max"]:
        raise ProtocolError("min is greater than max")
    if "expire" in args:
        out["expire"] = _integer(args, "expire")
        if out["expire"] < 1:
            raise ProtocolError("argument 'expire' must be at least 1 (minutes)")
    return out


def _claim(args: Mapping[str, str]) -> dict[str, Any]:
    _only(args, frozenset({"slot", "machine", "credits"}))
    out: dict[str, Any] = {"slot": _slot(args)}
    machine = args.get("machine")
    if machine is None or not machine.strip():
        raise ProtocolError("missing argument 'machine'" if machine is None else "empty machine")
    out["machine"] = machine
    if "credits" in args:
        out["credits"] = _integer(args, "credits")
    return out


def _counters(args: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"slot": _slot(args)}
    for key in args:
        if key != "slot":
            out[key] = _integer(args, key, True)
    if len(out) == 1:
        raise ProtocolError("COUNTERS needs at least one name=±n")
    return out


def _meta(args: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"slot": _slot(args)}
    out.update((key, value) for key, value in args.items() if key != "slot")
    if len(out) == 1:
        raise ProtocolError("META needs at least one name=value")
    return out


def _discard(args: Mapping[str, str]) -> dict[str, Any]:
    _only(args, frozenset({"slot", "reason"}))
    out: dict[str, Any] = {"slot": _slot(args)}
    if "reason" in args:
        out["reason"] = args["reason"]
    return out


_CHECKS: dict[str, Callable[[Mapping[str, str]], dict[str, Any]]] = {
    "alloc": _alloc,
    "claim": _claim,
    "counters": _counters,
    "meta": _meta,
    "discard": _discard,
}

