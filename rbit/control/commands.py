"""The control commands: a fixed list with typed arguments, as JSON documents.

A command travels as a JSON object ``{"command": NAME, ...arguments}``. Parsing checks
every field against the command's own list (type, range, allowed values) and refuses
anything else: unknown commands, unknown or missing fields, wrong types. Nothing in a
command is evaluated or unpickled; a logger or queue name is only looked up.

A reply is a JSON object with ``worker``, ``ok`` (true/false), ``refused`` (a reason,
or absent) and the command's own fields.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from rbit.errors import RbitError

#: The largest command document read (bytes); anything longer is refused unread.
MAX_COMMAND_BYTES = 4096
#: The most history rows one ``history`` command returns.
MAX_DEPTH = 10_000
#: Names a queue or logger may have in a command (AMQP's own limit is 255 bytes).
_NAME = re.compile(r"[^\x00-\x1f\x7f]{1,255}")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "NOTSET")


class CommandError(RbitError):
    """A control document that is not one of the commands, or has a bad field."""


@dataclass(frozen=True)
class Command:
    """A validated command.

    Attributes:
        name: ping, status, pause, resume, shutdown, loglevel or history.
        verbose: status: include running jobs.
        queue: pause/resume/history: the queue (None with ``all``).
        all: pause/resume: every queue of the worker.
        logger: loglevel: the logger name ("" or "root": the root logger).
        level: loglevel: one of :data:`LEVELS`.
        depth: history: how many outcomes, newest first.
    """

    name: str
    verbose: bool = False
    queue: str | None = None
    all: bool = False
    logger: str | None = None
    level: str | None = None
    depth: int = 20

    def to_json(self) -> bytes:
        fields = {k: v for k, v in asdict(self).items() if k in _FIELDS[self.name]}
        return json.dumps({"command": self.name, **fields}).encode()


# Each command's fields, with the type each must have.
_FIELDS: dict[str, dict[str, type]] = {
    "ping": {},
    "status": {"verbose": bool},
    "pause": {"queue": str, "all": bool},
    "resume": {"queue": str, "all": bool},
    "shutdown": {},
    "loglevel": {"logger": str, "level": str},
    "history": {"queue": str, "depth": int},
}
COMMANDS = tuple(_FIELDS)


def parse(body: bytes) -> Command:
    """Validate a command document.

    Raises:
        CommandError: It is not a JSON object naming one command with valid fields.
    """
    if len(body) > MAX_COMMAND_BYTES:
        raise CommandError(f"command longer than {MAX_COMMAND_BYTES} bytes")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CommandError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CommandError("not a JSON object")
    name = doc.pop("command", None)
    if name not in _FIELDS:
        raise CommandError(f"unknown command {str(name)[:40]!r}")
    fields = _FIELDS[name]
    for key, value in doc.items():
        expected = fields.get(key)
        if expected is None:
            raise CommandError(f"{name}: unknown field {str(key)[:40]!r}")
        if type(value) is not expected and not (value is None and key == "queue"):
            raise CommandError(f"{name}: {key} must be {expected.__name__}")
    command = Command(name=name, **doc)
    _check(command)
    return command


def _check(command: Command) -> None:
    name = command.name
    if name in ("pause", "resume") and (command.queue is None) == (not command.all):
        raise CommandError(f"{name}: give either a queue or all, not both")
    if name == "history" and command.queue is None:
        raise CommandError("history: queue is required")
    if command.queue is not None and not _NAME.fullmatch(command.queue):
        raise CommandError(f"{name}: not a queue name")
    if name == "history" and not 1 <= command.depth <= MAX_DEPTH:
        raise CommandError(f"history: depth must be 1..{MAX_DEPTH}")
    if name == "loglevel":
        if command.logger is None or command.level is None:
            raise CommandError("loglevel: logger and level are required")
        if command.logger and not _NAME.fullmatch(command.logger):
            raise CommandError("loglevel: not a logger name")
        if command.level.upper() not in LEVELS:
            raise CommandError(f"loglevel: level must be one of {', '.join(LEVELS)}")


def reply(worker: str, **fields: Any) -> bytes:
    """A reply document (``ok`` defaults to true unless ``refused`` or ``error``)."""
    ok = "refused" not in fields and "error" not in fields
    return json.dumps({"worker": worker, "ok": ok, **fields}, default=str).encode()

