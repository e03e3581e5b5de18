"""The job message as runners see it.

A :class:`Message` is built by the consumer for every delivery and handed to the
runner. It never exposes AMQP delivery tags: settling a delivery is rbit's business.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from rbit import decoding

#: Header carrying how many tries of this job already ended (absent on the first try).
ATTEMPTS_HEADER = "x-rbit-attempts"
#: Header carrying the error of the last try that ended badly.
LAST_ERROR_HEADER = "x-rbit-last-error"


class Message:
    """One job delivery. Runners treat it as read-only.

    Attributes:
        body: The message body, untouched.
        queue: The queue the job was consumed from (the runner section's name).
        headers: AMQP headers (empty mapping when the publisher set none).
        redelivered: The broker's redelivered flag: an earlier delivery of this very
            message may have been (partly) processed.
        message_id: The AMQP ``message_id`` property, if set.
        content_type: The AMQP ``content_type`` property, if set.
        allowed_classes: Dotted class names a jsonpickle body may name.
    """

    # A plain class with slots: one is built per delivery on the I/O thread, and a
    # frozen dataclass costs several times more to construct.
    __slots__ = ("body", "queue", "headers", "redelivered", "message_id", "content_type",
                 "allowed_classes", "_job_id")

    body: bytes
    queue: str
    headers: Mapping[str, Any]
    redelivered: bool
    message_id: str | None
    content_type: str | None
    allowed_classes: frozenset[str]

    def __init__(
        self,
        body: bytes,
        queue: str,
        headers: Mapping[str, Any] | None = None,
        redelivered: bool = False,
        message_id: str | None = None,
        content_type: str | None = None,
        allowed_classes: frozenset[str] = decoding.DEFAULT_ALLOWED_CLASSES,
    ) -> None:
        self.body = body
        self.queue = queue
        self.headers = {} if headers is None else headers
        self.redelivered = redelivered
        self.message_id = message_id
        self.content_type = content_type
        self.allowed_classes = allowed_classes
        self._job_id: str | None = None

    def __repr__(self) -> str:
        return (f"Message(queue={self.queue!r}, job_id={self.job_id!r}, "
                f"{len(self.body)} bytes, redelivered={self.redelivered})")

    @property
    def job_id(self) -> str:
        """The job's id.

        In order: the AMQP ``message_id`` property; the ``job.id`` of a PyBit
        BuildRequest body; else ``sha256:`` and the first 16 hex digits of the body's
        SHA-256, which stays the same when the broker redelivers the message.
        """
        if self._job_id is None:
            self._job_id = self._derive_job_id()
        return self._job_id

    def _derive_job_id(self) -> str:
        if self.message_id:
            return str(self.message_id)
        pybit_id = decoding.pybit_job_id(self.body)
        if pybit_id is not None:
            return pybit_id
        return "sha256:" + hashlib.sha256(self.body).hexdigest()[:16]

    @property
    def attempt(self) -> int:
        """Which try this is, counting from 1."""
        try:
            return int(self.headers.get(ATTEMPTS_HEADER, 0)) + 1
        except (TypeError, ValueError):
            return 1

    @property
    def last_error(self) -> str | None:
        """The error of the previous try, if an earlier try failed."""
        value = self.headers.get(LAST_ERROR_HEADER)
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value

    def text(self) -> str:
        """The body as UTF-8 text (raises :class:`rbit.errors.DecodeError`)."""
        return decoding.text(self.body)

    def json(self) -> Any:
        """The body parsed as plain JSON (raises :class:`rbit.errors.DecodeError`)."""
        return decoding.json_document(self.body)

    def decode(self) -> Any:
        """The body as JSON, with jsonpickle objects rebuilt from the allow-list only.

        A PyBit ``BuildRequest`` comes back with attribute access
        (``request.job.packageinstance.package.name``) and PyBit's getters
        (``request.get_package()``). A document naming any class outside
        :attr:`allowed_classes` raises :class:`rbit.errors.DecodeError`; nothing is
        imported or instantiated.
        """
        return decoding.decode(self.body, self.allowed_classes)
