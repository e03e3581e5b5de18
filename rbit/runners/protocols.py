"""The three ways a job runs, as interfaces a runner object declares by its methods.

The worker looks at a runner object once, when it starts, and picks the job pool that
serves it (:func:`rbit.dispatch.pool_for`):

:class:`EventedRunner` (``shell!``)
    Starts a job and returns at once; the job is supervised by callbacks from an event
    loop (:class:`rbit.fdloop.FdLoop`), the AMQP connection's own, and reports its end
    through ``done(outcome)`` on that loop's thread. No thread per job or per slot.
:class:`BatchRunner` (the credit runner, any class-based ``python!`` runner)
    Takes every delivery with ``submit`` and settles each later, from any thread,
    typically after sending a whole batch somewhere.
:class:`ThreadRunner` (plain ``python!`` callables)
    Runs one job to its end in the calling thread; the worker calls it from
    ``concurrency`` threads.

A runner fitting more than one is taken in that order: :class:`rbit.runners.shell.
ShellRunner` also has a blocking ``run`` for callers that wait for one job, but the
worker runs it evented. An object fitting none is a :class:`rbit.errors.RunnerLoadError`.

Statuses go through ``set_status(status, message="")``; outcomes are
:class:`rbit.outcome.Outcome` values, whose fate (ack, retry, dead letters) the worker
decides (:mod:`rbit.fate`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from rbit.errors import RunnerLoadError

if TYPE_CHECKING:
    from rbit.fdloop import FdLoop
    from rbit.message import Message
    from rbit.outcome import Outcome

SetStatus = Callable[..., None]  # set_status(status: str | Status, message: str = "")
Settle = Callable[["Outcome"], None]


@runtime_checkable
class ThreadRunner(Protocol):
    """Runs one job at a time per calling thread, blocking until it ends."""

    @property
    def in_child(self) -> bool:
        """Whether jobs run in child processes, which :meth:`cancel` can stop."""

    def run(self, message: Message, set_status: SetStatus) -> Outcome:
        """Run one job to its end; exceptions count as a failed try."""

    def cancel(self) -> None:
        """Stop running jobs now (shutdown after a second signal); any thread."""

    # Optional: ``start()``, called once before the first job (e.g. to start warm
    # child processes), and ``close(timeout)``, called at shutdown once no job starts.


@runtime_checkable
class EventedRunner(Protocol):
    """Starts jobs on an event loop's thread and hears of their end from that loop."""

    def start_job(self, message: Message, set_status: SetStatus,
                  done: Callable[[Outcome], None], loop: FdLoop) -> Any:
        """Start one job and return at once.

        ``done(outcome)`` is called once, on the loop's thread (before this returns when
        the job cannot start). ``set_status`` is called on the loop's thread too.
        """

    def cancel(self) -> None:
        """Stop running jobs now and start no more; any thread."""

    def close(self, timeout: float) -> None:
        """Start no more jobs and release what the runner holds; running jobs go on."""


@runtime_checkable
class BatchRunner(Protocol):
    """Takes deliveries one by one and settles them later, e.g. a batch at a time."""

    def submit(self, message: Message, set_status: SetStatus, settle: Settle) -> None:
        """Take one job and return quickly, without network I/O.

        ``settle(outcome)`` must be called exactly once per message, from any thread,
        when its fate is known; a message never settled is redelivered by the broker.
        """

    def close(self, timeout: float) -> None:
        """Finish or hand back pending work within ``timeout`` seconds."""

    # Optional: ``batch_size`` (an int attribute or property), the most jobs one batch
    # holds. A section that sets no ``prefetch`` then takes at least that many ahead,
    # since jobs are settled only once their batch is sent.


class RunnerKind(enum.Enum):
    """How the worker serves a runner: which protocol it fits first."""

    EVENTED = "evented"
    BATCH = "batch"
    THREAD = "thread"


_ORDER = (
    (RunnerKind.EVENTED, EventedRunner),
    (RunnerKind.BATCH, BatchRunner),
    (RunnerKind.THREAD, ThreadRunner),
)


def runner_kind(runner: object, section: str) -> RunnerKind:
    """The way ``runner`` runs its jobs, checked once when the worker starts.

    Args:
        runner: The runner object built for a section.
        section: The section's name, for the error (e.g. ``runner:cnx_any_latex_pdf``).

    Raises:
        RunnerLoadError: ``runner`` fits none of the three protocols.
    """
    for kind, protocol in _ORDER:
        if isinstance(runner, protocol):
            return kind
    raise RunnerLoadError(
        f"[{section}]: {type(runner).__name__} is not a runner: it needs start_job() "
        "with cancel() and close(), submit() with close(), or run() with cancel() "
        "and in_child (see rbit.runners.protocols)"
    )
