"""Example ``python!`` runners: the runner API in a few lines each.

Configure one with, e.g.::

    [runner:cnx_any_latex_pdf]
    runner = python!rbitext.examples:hello
    name = World
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Callable

from rbit.errors import Blocked, DecodeError
from rbit.message import Message

logger = logging.getLogger(__name__)

SetStatus = Callable[..., None]


def hello(message: Message, set_status: SetStatus, settings: Mapping[str, str]) -> str:
    """Greet ``settings["name"]`` (default ``world``) and name what the job asks for.

    A PyBit BuildRequest is described by its package and version; other JSON bodies by
    their type. The job ends Done when the function returns.

    Returns:
        The greeting (for callers who use the function directly).
    """
    set_status("Building", f"hello job {message.job_id}")
    greeting = f"Hello {settings.get('name', 'world')}! Job {message.job_id}: {_describe(message)}"
    logger.info("job %s: %s", message.job_id, greeting)
    return greeting


def _describe(message: Message) -> str:
    try:
        document: Any = message.decode()
    except DecodeError as exc:
        return f"undecodable body ({exc})"
    if hasattr(document, "get_package"):
        return f"build {document.get_package()} {document.get_version()}"
    return f"a JSON {type(document).__name__}"


def noop(message: Message, set_status: SetStatus, settings: Mapping[str, str]) -> None:
    """Do nothing: the job is Done. Useful to measure rbit's own overhead."""
    return


def fail(message: Message, set_status: SetStatus, settings: Mapping[str, str]) -> None:
    """Fail the job by raising (rbit reports the error and traceback; retries apply)."""
    raise RuntimeError(settings.get("reason", "this example always fails"))


def block(message: Message, set_status: SetStatus, settings: Mapping[str, str]) -> None:
    """Ask for the job to be retried later (``delay`` setting, seconds)."""
    delay = settings.get("delay")
    raise Blocked(settings.get("reason", "example: not now"), float(delay) if delay else None)
