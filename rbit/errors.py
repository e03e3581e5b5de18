"""rbit's one exception tree.

Everything rbit raises on purpose derives from :class:`RbitError`. Library errors
(pika, OSError, json) are translated at the module boundary with ``raise ... from exc``.

Two exceptions are meant for runners to raise:

* :class:`Blocked` -- "not now, try later": the job is republished after a delay held by
  the broker and counts as an attempt.
* :class:`Reject` -- "failed, do not retry": the job goes straight to the dead letters.
"""

from __future__ import annotations


class RbitError(Exception):
    """Base of every error rbit raises on purpose."""


class ConfigError(RbitError):
    """The configuration is invalid; the message names file, section, key and reason."""

    def __init__(self, reason: str, *, file: str = "", section: str = "", key: str = "") -> None:
        self.reason = reason
        self.file = file
        self.section = section
        self.key = key
        where = ", ".join(
            part
            for part in (
                file and f"file {file}",
                section and f"section [{section}]",
                key and f"key {key!r}",
            )
            if part
        )
        super().__init__(f"{where}: {reason}" if where else reason)

    def located(self, *, file: str = "", section: str = "", key: str = "") -> ConfigError:
        """A copy of this error with the parts of its location it lacks filled in."""
        return type(self)(
            self.reason,
            file=self.file or file,
            section=self.section or section,
            key=self.key or key,
        )


class BrokerError(RbitError):
    """Talking to RabbitMQ failed (unreachable, refused, channel closed)."""


class BrokerUnreachable(BrokerError):
    """No configured host accepted a connection."""


class DuplicateWorker(RbitError):
    """Another worker of the same name is running (it holds the control queue)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"another worker named {name!r} is running on this broker "
                         f"(it holds the control queue rbit.control.{name})")
        self.name = name


class QueueNotFound(BrokerError):
    """A queue named in a command does not exist on the broker.

    Attributes:
        queue: The queue's name.
    """

    def __init__(self, queue: str) -> None:
        super().__init__(f"queue {queue!r} does not exist")
        self.queue = queue


class DecodeError(RbitError):
    """A message body could not be decoded safely (bad JSON, class not allowed, ...)."""


class RunnerLoadError(ConfigError):
    """A ``runner =`` spec could not be resolved to something runnable.

    A configuration error found when the worker loads its runners (the module cannot
    be imported, the callable is missing, a batch runner fails to start); like every
    :class:`ConfigError` it names file, section and key once the loader knows them.
    """


class Blocked(RbitError):
    """Raised by a runner: the job cannot run now; republish it after a delay.

    Args:
        reason: Why the job is blocked; reported with the ``Blocked`` status.
        delay: Seconds to wait before the next try; ``None`` uses the runner's
            retry policy.
    """

    def __init__(self, reason: str = "", delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class Reject(RbitError):
    """Raised by a runner: the job failed for good; send it to the dead letters now."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason


class Unroutable(BrokerError):
    """A published job was returned by the broker: no queue is bound to its route."""


class SignatureError(RbitError):
    """A job's signature is missing, unknown, invalid, stale or replayed."""
