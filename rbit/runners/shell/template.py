"""The command template: split once when the runner loads, filled in per job.

Placeholders are replaced *inside* the already split arguments, in a single pass, so
text put in by a substitution is never scanned again (see :mod:`rbit.runners.shell`).
"""

from __future__ import annotations

import enum
import re
import shlex
from collections.abc import Mapping

from rbit.errors import RunnerLoadError

_PLACEHOLDER = re.compile(r"%%|%ID|%QUEUE|%BODY|%ATTEMPT|(?<!\$)\{([A-Za-z_][A-Za-z0-9_.-]*)\}")


class Slot(enum.IntEnum):
    """A placeholder filled per job: its index in the job's values."""

    ID = 0
    QUEUE = 1
    BODY = 2
    ATTEMPT = 3


SLOTS = {"%ID": Slot.ID, "%QUEUE": Slot.QUEUE, "%BODY": Slot.BODY, "%ATTEMPT": Slot.ATTEMPT}

# A compiled argument: its literal text, or its parts (literal text and slots).
Arg = str | tuple[str | Slot, ...]
Values = tuple[str, str, str, str]  # indexed by Slot


def compile_template(template: str, settings: Mapping[str, str], queue: str) -> tuple[Arg, ...]:
    """Splits ``template`` into arguments, with ``{setting}`` filled in and job slots kept.

    Raises:
        RunnerLoadError: The template is empty, has unbalanced quotes or names an
            unknown setting.
    """
    where = f"runner:{queue}"  # not the template itself: it may carry a secret
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise RunnerLoadError(f"{where}: cannot split the command: {exc}") from exc
    if not words:
        raise RunnerLoadError(f"{where}: the command is empty")
    return tuple(_compile_word(word, settings, where) for word in words)


def _compile_word(word: str, settings: Mapping[str, str], where: str) -> Arg:
    """Splits a word into literal text and job slots; settings become literal text.

    A word without slots becomes its text, used as it is for every job.
    """
    parts: list[str | Slot] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(word):
        parts.append(word[pos : match.start()])
        parts.append(_resolve(match, settings, where))
        pos = match.end()
    parts.append(word[pos:])
    if all(part.__class__ is str for part in parts):
        return "".join(parts)
    return tuple(part for part in parts if part != "")


def _resolve(match: re.Match[str], settings: Mapping[str, str], where: str) -> str | Slot:
    key = match.group(1)
    if key is not None:
        if key not in settings:
            known = ", ".join(sorted(settings)) or "none"
            raise RunnerLoadError(f"{where}: unknown setting {{{key}}} (settings: {known})")
        return str(settings[key])
    if match.group(0) == "%%":
        return "%"
    return SLOTS[match.group(0)]


def render(arg: Arg, values: Values) -> str:
    """One argument of a job's command: ``arg`` with the job's ``values`` put in."""
    if arg.__class__ is str:
        return arg
    return "".join(values[part] if part.__class__ is Slot else part for part in arg)
