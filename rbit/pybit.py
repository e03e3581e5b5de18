"""PyBit's commands and front-end checks: cancel, status requests, cancelled-while-queued.

PyBit's web front-end cancels a job whose last status is Building by publishing a
jsonpickle ``pybit.models.CancelRequest`` (the job and the web host) to the ``pybit``
exchange with the *building client's name* as routing key; ``StatusRequest`` travels
the same way. rbit reports ``[rbit] name`` as the client with every status
(:mod:`rbit.status`), and each worker keeps a command queue named after it,
auto-deleted, bound to the exchange with its name as routing key (:func:`command_queue`).
It is not exclusive: after a reconnect the broker may still hold the dropped
connection, and the worker must not wait for that to consume its jobs. Two workers of
one name are refused at start by the worker's exclusive control queue
(:mod:`rbit.amqp.control`) instead.

* ``CancelRequest`` for a job this worker holds sets the job's
  :attr:`rbit.message.Message.cancelled`: a ``shell!`` job's process group gets SIGTERM,
  then SIGKILL after ``kill_grace``; a ``python!`` job in a warm child has its child
  stopped; an in-thread ``python!`` runner sees the signal and returns. The job ends
  ``Cancelled`` and is acked (not retried, not dead-lettered). A job still waiting in
  the pool is skipped when its turn comes. A cancel for a job this worker does not
  hold is logged and ignored.
* ``StatusRequest`` reports the job's current status again (Waiting before it started).
* Anything else (``TaskComplete``, other classes) is logged and dropped; every command
  is acked.

Cancelled while queued: with the ``http`` status sink, each PyBit BuildRequest is
checked before it reaches its pool: ``GET {http_url}/job/{id}/status`` (a JSON list of
the job's statuses, the last one current) with a :data:`CHECK_TIMEOUT` timeout, on a
thread of its own (never the I/O thread), one job after the other so that order is
kept. A job whose last status is Cancelled is settled Cancelled without running. When
the front-end does not answer in time, or answers with an error, the job runs anyway,
as PyBit's own client does.
"""

from __future__ import annotations

import base64
import json
import logging
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from rbit import decoding
from rbit.amqp.records import ConsumerSpec, Delivery
from rbit.config import Settings
from rbit.errors import DecodeError
from rbit.message import Message
from rbit.outcome import Status
from rbit.topology import QueueDecl

if TYPE_CHECKING:
    from rbit.amqp.broker import Broker
    from rbit.control.observer import JobObserver
    from rbit.dispatch import ReportFn

log = logging.getLogger(__name__)

CANCEL_REQUEST = "pybit.models.CancelRequest"
STATUS_REQUEST = "pybit.models.StatusRequest"
#: Seconds to wait for the front-end's answer before running a job anyway.
CHECK_TIMEOUT = 3.0
_COMMAND_PREFETCH = 20


def commands_enabled(settings: Settings) -> bool:
    """Whether the worker keeps a command queue (``[rbit] pybit_commands``)."""
    return settings.worker.pybit_commands


def command_queue(settings: Settings) -> QueueDecl:
    """The worker's command queue: ``[rbit] name``, auto-deleted, bound with its name."""
    name = settings.worker.name
    return QueueDecl(name, durable=False, auto_delete=True,
                     bindings=((settings.worker.exchange, name),))


class JobTracker:
    """Finds the jobs this worker holds, from delivery to settlement (thread-safe).

    The jobs are the observer's (:class:`rbit.control.observer.JobObserver`): one entry
    per job, keyed by the message itself, so that nothing on the I/O thread works out
    a job id. The tracker only adds the jobs received and not started yet
    (:meth:`arrived`, on the I/O thread). A command looks the id up among the held
    messages (a few hundred at most, and commands are rare). Two copies of one job id
    held at once (a redelivery racing its first copy's end) are both cancelled.

    Args:
        report: The status reporter's ``report``.
        jobs: The worker's observer, which keeps each job's entry.
    """

    def __init__(self, report: ReportFn, jobs: JobObserver) -> None:
        self._report = report
        self._jobs = jobs
        #: A job was received: it can be cancelled from now on.
        self.arrived = jobs.arrived

    def cancel(self, job_id: str) -> bool:
        """Cancel job ``job_id``; False when this worker does not hold it."""
        held = self._jobs.held(job_id)
        for message, _ in held:
            message.cancelled.set()  # hooks run here: a shell! job's group gets SIGTERM
        return bool(held)

    def report_again(self, job_id: str) -> bool:
        """Report job ``job_id``'s current status again; False when not held here."""
        held = self._jobs.held(job_id)
        if not held:
            return False
        message, set_status = held[-1]
        last = set_status.last if set_status is not None else None
        self._report(job_id, message.queue, last or Status.WAITING, "")
        return True


class Commands:
    """Consumes the command queue on the I/O thread; every command is acked.

    Args:
        broker: For the acks.
        tracker: The jobs held here.
    """

    def __init__(self, broker: Broker, tracker: JobTracker) -> None:
        self._broker = broker
        self._tracker = tracker

    def spec(self, queue: str) -> ConsumerSpec:
        return ConsumerSpec(queue=queue, prefetch=_COMMAND_PREFETCH, commands=True,
                            on_delivery=self.on_delivery,
                            allowed_classes=decoding.DEFAULT_ALLOWED_CLASSES)

    def on_delivery(self, delivery: Delivery) -> None:
        try:
            self.handle(delivery.message)
        finally:
            self._broker.ack(delivery)

    def handle(self, message: Message) -> None:
        """Carry out one command message."""
        try:
            request = message.decode()  # allow-listed PyBit classes only
        except DecodeError as exc:
            log.warning("command queue: undecodable message dropped: %s", exc)
            return
        kind = getattr(request, "class_name", None)
        job_id = _command_job_id(request)
        if kind == CANCEL_REQUEST and job_id is not None:
            if self._tracker.cancel(job_id):
                log.info("job %s: cancel requested by the front-end", job_id)
            else:
                log.info("job %s: cancel requested, but this worker does not hold the job; "
                         "ignored", job_id)
        elif kind == STATUS_REQUEST and job_id is not None:
            if not self._tracker.report_again(job_id):
                log.info("job %s: status requested, but this worker does not hold the "
                         "job; ignored", job_id)
        else:
            log.info("command queue: %s ignored", kind or type(request).__name__)


def _command_job_id(request: Any) -> str | None:
    job = getattr(getattr(request, "job", None), "id", None) if request is not None else None
    if job.__class__ in (int, str) and job != "":
        return str(job)
    return None


class FrontEnd:
    """Asks PyBit's front-end (``[status] http_url``) for a job's statuses.

    Credentials are those of the http sink, sent to ``http_url`` only.
    """

    def __init__(self, url: str, user: str | None, password: str | None,
                 timeout: float = CHECK_TIMEOUT) -> None:
        split = urllib.parse.urlsplit(url)
        self._base = urllib.parse.urlunsplit(
            (split.scheme, split.hostname + (f":{split.port}" if split.port else ""),
             split.path.rstrip("/"), "", ""))
        self._timeout = timeout
        self._headers = {"Accept": "application/json"}
        user = user or (urllib.parse.unquote(split.username) if split.username else None)
        if user:
            secret = password or urllib.parse.unquote(split.password or "")
            token = base64.b64encode(f"{user}:{secret}".encode()).decode("ascii")
            self._headers["Authorization"] = "Basic " + token

    def last_status(self, job_id: str) -> str | None:
        """The job's current status on the front-end; None when it cannot tell."""
        import urllib.request  # here: 11 ms of every worker's start-up otherwise

        url = f"{self._base}/job/{urllib.parse.quote(job_id, safe='')}/status"
        try:
            request = urllib.request.Request(url, headers=self._headers, method="GET")  # noqa: S310
            # The configured http_url only (http or https), never a URL from a message.
            with urllib.request.urlopen(request, timeout=self._timeout) as response:  # noqa: S310
                statuses = json.loads(response.read(1 << 20))
        except (OSError, ValueError) as exc:
            log.warning("job %s: the front-end did not tell its status (%s); running it",
                        job_id, exc)
            return None
        if not isinstance(statuses, list) or not statuses:
            return None
        last = statuses[-1]
        value = last.get("status") if isinstance(last, dict) else last
        return value if isinstance(value, str) else None


class QueuedCheck:
    """Checks PyBit jobs against the front-end before they reach their pool.

    Args:
        broker: Hands checked deliveries back to the I/O thread.
        front_end: The front-end to ask, or None (no http sink: no check).
        tracker: Told of every delivery.
    """

    def __init__(self, broker: Broker, front_end: FrontEnd | None, tracker: JobTracker) -> None:
        self._broker = broker
        self._front_end = front_end
        self._tracker = tracker
        # One thread: jobs reach their pool in the order they came.
        self._executor = (ThreadPoolExecutor(1, thread_name_prefix="rbit-pybit-check")
                          if front_end is not None else None)

    def gate(self, take: Callable[[Delivery], None]) -> Callable[[Delivery], None]:
        """The ``on_delivery`` to consume a queue with, before ``take`` (I/O thread)."""
        marker = b"pybit.models.BuildRequest"

        def on_delivery(delivery: Delivery) -> None:
            self._tracker.arrived(delivery.message)
            if self._executor is None or marker not in delivery.message.body:
                take(delivery)
                return
            try:
                self._executor.submit(self._check, take, delivery)
            except RuntimeError:  # closed: the worker stops, and its pool hands jobs back
                take(delivery)

        return on_delivery

    def _check(self, take: Callable[[Delivery], None], delivery: Delivery) -> None:
        message = delivery.message
        job_id = decoding.pybit_job_id(message.body)
        front_end = self._front_end
        if (job_id is not None and front_end is not None
                and front_end.last_status(job_id) == Status.CANCELLED.value):
            log.info("job %s: cancelled on the front-end before it started", message.job_id)
            message.cancelled.set()  # the pool settles it Cancelled without running it
        self._broker.call_soon(lambda: take(delivery))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)


def front_end(settings: Settings) -> FrontEnd | None:
    """The front-end to check queued jobs with: the http sink's, when configured."""
    status = settings.status
    if "http" not in status.sinks or not status.http_url:
        return None
    return FrontEnd(status.http_url, status.http_user, status.http_password,
                    min(CHECK_TIMEOUT, status.http_timeout))
