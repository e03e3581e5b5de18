"""Example ``python!`` runners: the runner API in a few lines each.

Configure one with, e.g.::

    [runner:cnx_any_latex_pdf]
    runner = python!rbitext.examples:hello
    name = World
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

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


def build_request_body(job_id: int, package: str = "col10001", version: str = "1.0", *,
                       web_host: str = "localhost:8080", timestamp: int = 1357000000) -> bytes:
    """A PyBit BuildRequest as PyBit's jsonpickle writes it, to try the examples with.

    Written by hand: no pybit needed. :func:`hello` describes it as
    ``build <package> <version>``, and rbit takes the job id from ``job.id``.
    """

    def obj(cls: str, **fields: Any) -> dict[str, Any]:
        return {"py/object": f"pybit.models.{cls}", **fields}

    instance = obj(
        "PackageInstance", id=3,
        package=obj("Package", id=7, version=version, name=package),
        arch=obj("Arch", id=1, name="any"),
        suite=obj("Suite", id=2, name="latex"),
        distribution=obj("Dist", id=1, name="cnx"),
        format=obj("Format", id=4, name="pdf"),
        master=True,
    )
    request = obj(
        "BuildRequest",
        job=obj("Job", id=job_id, packageinstance=instance, buildclient=None),
        transport=obj("Transport", id=1, method="git", uri=f"https://git.example/{package}",
                      vcs_id=None),
        web_host=web_host,
        commands=None,
        timestamp=timestamp,
    )
    return json.dumps(request).encode()
