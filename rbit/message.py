"""The job message as runners see it.

A :class:`Message` is built by the consumer for every delivery and handed to the
runner. It never exposes AMQP delivery tags: settling a delivery is rbit's business.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

from rbit import decoding
from rbit.safetext import escape

log = logging.getLogger(__name__)

#: Header carrying how many tries of this job already ended (absent on the first try).
ATTEMPTS_HEADER = "x-rbit-attempts"
#: Header carrying the error of the last try that ended badly.
LAST_ERROR_HEADER = "x-rbit-last-error"
#: Header the AMQP boundary sets, in place of a publisher's headers it could not
#: decode, to the reason; such a job goes to the dead letters at once.
UNDECODABLE_HEADER = "x-rbit-undecodable-headers"

#: The longest job id; see :func:`safe_job_id`.
MAX_JOB_ID = 200
#: A job id used as it is: letters, digits and ``._:@+=-``, not starting with ``-`` or
#: ``.``, at most :data:`MAX_JOB_ID` characters. Such an id is safe as a file name, as
#: one path component and as a command argument, and needs no quoting in a log line.
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9_:@+=][A-Za-z0-9._:@+=-]{0,%d}" % (MAX_JOB_ID - 1))
#: The most tries the attempts header may claim (its value is clamped to this).
MAX_ATTEMPTS = 1_000_000
#: The longest last error read back from a header.
MAX_LAST_ERROR = 2000


def safe_job_id(raw: str) -> str:
    """The job id runners see for the id ``raw`` a message names.

    ``raw`` is kept when it matches :data:`JOB_ID_PATTERN`. Any other id (a path
    separator, ``..`` as a component, a leading ``-``, whitespace, control or non-ASCII
    characters, too long) becomes ``id-sha256:`` and the first 16 hex digits of the
    SHA-256 of its UTF-8 bytes: the same for every delivery of the message, for every
    runner, and safe wherever an id goes.
    """
    if JOB_ID_PATTERN.fullmatch(raw):
        return raw
    import hashlib  # only for an unsafe id: loading it costs every worker's start ~4 ms
    digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return "id-sha256:" + digest


class Cancellation(threading.Event):
    """A job's cancel signal: an event, plus hooks run once when it is set.

    In-thread runners poll :meth:`is_set` (or :meth:`wait` on it); rbit's own runners
    register a hook that stops the job's process.
    """

    def __init__(self) -> None:
        super().__init__()
        self._hooks: list = []
        self._hook_lock = threading.Lock()

    def on_set(self, hook) -> None:
        """Call ``hook()`` when the signal is set (at once if it already is)."""
        with self._hook_lock:
            if not self.is_set():
                self._hooks.append(hook)
                return
        hook()

    def set(self) -> None:
        with self._hook_lock:
            super().set()
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            try:
                hook()
            except Exception:  # one broken hook must not keep the others from running
                log.exception("a cancel hook failed")


_CANCEL_LOCK = threading.Lock()


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
        raw_job_id: The id as the message named it, when :attr:`job_id` had to be made
            safe (:func:`safe_job_id`); else None. Escape it before showing it.
    """

    # A plain class with slots: one is built per delivery on the I/O thread, and a
    # frozen dataclass costs several times more to construct.
    __slots__ = ("body", "queue", "headers", "redelivered", "message_id", "content_type",
                 "allowed_classes", "_job_id", "raw_job_id", "_cancel", "_cancel_hooks")

    #: A broadcast copy (:class:`BroadcastMessage`): its runner's result goes back to
    #: the caller. A class attribute: queue jobs pay nothing for it.
    broadcast = False

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
        self.raw_job_id: str | None = None
        self._cancel: Cancellation | None = None
        self._cancel_hooks: list | None = None  # on_cancel's, until a signal is made

    @property
    def cancelled(self) -> Cancellation:
        """The job's cancel signal, set when a PyBit ``CancelRequest`` names the job.

        A ``python!`` runner in a thread cannot be stopped from outside: it checks
        ``message.cancelled.is_set()`` and returns; the job is then reported Cancelled
        whatever it returned. Made on first use (most jobs never need one).
        """
        if self._cancel is None:
            with _CANCEL_LOCK:
                if self._cancel is None:
                    cancel = Cancellation()
                    for hook in self._cancel_hooks or ():
                        cancel.on_set(hook)
                    self._cancel_hooks = None
                    self._cancel = cancel
        return self._cancel

    def on_cancel(self, hook: Callable[[], object]) -> None:
        """Call ``hook()`` once the job is cancelled (at once if it already is).

        Like ``cancelled.on_set(hook)``, without making the signal (an event and two
        locks) for the many jobs nobody ever cancels.
        """
        with _CANCEL_LOCK:
            if self._cancel is None:
                if self._cancel_hooks is None:
                    self._cancel_hooks = []
                self._cancel_hooks.append(hook)
                return
        self._cancel.on_set(hook)

    def is_cancelled(self) -> bool:
        """Whether the job was cancelled (cheap; makes no signal)."""
        return self._cancel is not None and self._cancel.is_set()

    def __repr__(self) -> str:
        return (f"Message(queue={self.queue!r}, job_id={self.job_id!r}, "
                f"{len(self.body)} bytes, redelivered={self.redelivered})")

    @property
    def job_id(self) -> str:
        """The job's id, safe as a path component and as an argument.

        In order: the AMQP ``message_id`` property; the ``job.id`` of a PyBit
        BuildRequest body; else ``sha256:`` and the first 16 hex digits of the body's
        SHA-256, which stays the same when the broker redelivers the message. An id
        outside :data:`JOB_ID_PATTERN` is replaced by its digest (:func:`safe_job_id`);
        the original is then in :attr:`raw_job_id`.
        """
        if self._job_id is None:
            self._job_id = self._derive_job_id()
        return self._job_id

    def _derive_job_id(self) -> str:
        raw = self.message_id
        if isinstance(raw, bytes):  # pika keeps a short string that is not UTF-8 as bytes
            raw = raw.decode("utf-8", "surrogateescape")
        if not raw:
            raw = decoding.pybit_job_id(self.body)
        if raw is None:
            import hashlib  # only for a message without an id (see safe_job_id)
            return "sha256:" + hashlib.sha256(self.body).hexdigest()[:16]
        job_id = safe_job_id(raw)
        if job_id is not raw:
            self.raw_job_id = raw
            log.info("job %s: the message names it %s, unsafe as a path or argument",
                     job_id, escape(raw, MAX_JOB_ID))
        return job_id

    @property
    def attempt(self) -> int:
        """Which try this is, counting from 1.

        The attempts header counts as 0 unless it is an integer; it is clamped to
        [0, :data:`MAX_ATTEMPTS`] (the retry policy then bounds it further).
        """
        value = self.headers.get(ATTEMPTS_HEADER, 0)
        if value.__class__ is not int:  # bool, str, float, nested... : not a count
            return 1
        return min(max(value, 0), MAX_ATTEMPTS) + 1

    @property
    def last_error(self) -> str | None:
        """The error of the previous try (at most 2000 characters), if a try failed."""
        value = self.headers.get(LAST_ERROR_HEADER)
        if isinstance(value, bytes):
            value = value[:MAX_LAST_ERROR * 4].decode("utf-8", "replace")
        return value[-MAX_LAST_ERROR:] if isinstance(value, str) else None

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


class BroadcastMessage(Message):
    """A copy of a broadcast job (:mod:`rbit.broadcast`): one per worker serving its queue.

    Runners see an ordinary :class:`Message` whose :attr:`broadcast` is true: a
    ``python!`` runner's return value, or a ``shell!`` command's stdout, is sent back to
    the caller, and the job is not retried nor dead-lettered.
    """

    __slots__ = ()
    broadcast = True
