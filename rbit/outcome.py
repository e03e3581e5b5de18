"""Job statuses and outcomes.

A runner's work ends in an :class:`Outcome`. What then happens to the delivery (ack,
delayed retry, dead letter) is decided in one place, :mod:`rbit.fate`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rbit.usage import Usage


class Status(str, enum.Enum):
    """The PyBit job statuses."""

    WAITING = "Waiting"
    BLOCKED = "Blocked"
    BUILDING = "Building"
    DONE = "Done"
    FAILED = "Failed"
    CANCELLED = "Cancelled"
    UPLOADED = "Uploaded"

    @classmethod
    def parse(cls, value: str | Status) -> Status:
        """The status named by ``value`` (case-insensitive); ``ValueError`` otherwise."""
        if isinstance(value, Status):
            return value
        status = _STATUS_NAMES.get(str(value).strip().lower())
        if status is not None:
            return status
        names = ", ".join(s.value for s in cls)
        raise ValueError(f"unknown status {value!r}; expected one of {names}")

    @property
    def terminal(self) -> bool:
        """A status after which the runner's work on the job is over."""
        return self in (Status.DONE, Status.FAILED, Status.CANCELLED, Status.UPLOADED)


_STATUS_NAMES = {status.value.lower(): status for status in Status}


class Kind(str, enum.Enum):
    """How a job's try ended."""

    DONE = "done"  # finished (Done, Uploaded or Cancelled): ack
    FAILED = "failed"  # failed, may be retried per policy
    BLOCKED = "blocked"  # not now: republish after a delay
    REJECTED = "rejected"  # failed for good: dead letters at once


@dataclass(frozen=True)
class Outcome:
    """The end of one try of a job.

    Attributes:
        kind: How it ended.
        reason: Human-readable detail (error text, stderr tail, traceback).
        delay: For ``BLOCKED``: seconds before the next try, or ``None`` for the policy.
    """

    kind: Kind
    reason: str = ""
    delay: float | None = None
    #: For ``DONE``: the status to report instead of Done (Cancelled).
    status: Status | None = None
    #: A broadcast copy's result for its caller (:mod:`rbit.broadcast`): a ``python!``
    #: runner's return value, a ``shell!`` command's :class:`Output`. None for queue jobs.
    result: Any = None
    #: What the try used (:mod:`rbit.usage`), when the runner metered it; a
    #: measurement, not part of what the outcome is (equality ignores it).
    usage: Usage | None = field(default=None, compare=False)

    def with_usage(self, usage: Usage | None) -> Outcome:
        """This outcome with ``usage`` attached."""
        # Every metered job passes here: a copy of the fields costs a quarter of what
        # the frozen dataclass's __init__ (one object.__setattr__ per field) does.
        new = _new_outcome(Outcome)
        fields = new.__dict__
        fields.update(self.__dict__)
        fields["usage"] = usage
        return new

    @classmethod
    def done(cls, reason: str = "") -> Outcome:
        return cls(Kind.DONE, reason) if reason else _DONE

    @classmethod
    def cancelled(cls, reason: str = "cancelled") -> Outcome:
        """Cancelled (by a PyBit CancelRequest, or on the front-end): acked, not retried."""
        return cls(Kind.DONE, reason, status=Status.CANCELLED)

    @classmethod
    def failed(cls, reason: str) -> Outcome:
        return cls(Kind.FAILED, reason)

    @classmethod
    def blocked(cls, reason: str = "", delay: float | None = None) -> Outcome:
        return cls(Kind.BLOCKED, reason, delay)

    @classmethod
    def rejected(cls, reason: str) -> Outcome:
        return cls(Kind.REJECTED, reason)


@dataclass(frozen=True)
class Output:
    """What a ``shell!`` command of a broadcast wrote on stdout (the first bytes only).

    Attributes:
        text: The output, decoded as UTF-8 (invalid bytes replaced).
        truncated: The command wrote more than was kept.
    """

    text: str
    truncated: bool = False


_DONE = Outcome(Kind.DONE)  # the outcome of nearly every job: built once
_new_outcome = object.__new__
