"""Submit jobs and follow them from Python: open once, submit many.

::

    from rbit.client import Client

    with Client.from_config("rbit.ini") as client:
        job_id = client.submit("cnx_any_latex_pdf", b'{"doc": 42}')
        result = client.submit("thumbnails", b"...", wait=True, timeout=600)
        print(result.status, result.message)

A job is published the way rbit consumes it: persistent, with a publisher confirm and
the ``mandatory`` flag (a job no queue would receive raises
:class:`~rbit.errors.Unroutable`), to the ``[rbit] exchange`` (``pybit``) with the
runner section's routing key when the config has a ``[runner:QUEUE]`` section, with
PyBit's dotted route for a PyBit-named queue (``dist_arch_suite_format``), else to the
default exchange with the queue's name. With ``[security] signing_key`` every job is
signed (:mod:`rbit.security.signing`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rbit.amqp.publisher import PublisherSession
from rbit.config import Settings, default_routing_key, load_config
from rbit.errors import RbitError
from rbit.message import JOB_ID_PATTERN
from rbit.outcome import Status
from rbit.safetext import escape


@dataclass(frozen=True)
class JobResult:
    """How a followed job ended.

    Attributes:
        job_id: The job.
        status: Its last status (``None`` when the wait timed out before any).
        message: The last status message (escaped: it came from the network).
        final: Whether that status ended the job (Done, Failed, Cancelled, Uploaded).
        dead_lettered: Failed for good: it is in the dead letters.
    """

    job_id: str
    status: Status | None
    message: str = ""
    final: bool = False
    dead_lettered: bool = False


def target(settings: Settings, queue: str) -> tuple[str, str]:
    """The (exchange, routing key) a job for ``queue`` is published to."""
    for runner in settings.runners:
        if runner.queue == queue:
            return settings.worker.exchange, runner.routing_key
    route = default_routing_key(queue)
    if route != queue:
        return settings.worker.exchange, route
    return "", queue


def new_job_id() -> str:
    """A fresh job id (a UUID4 in hex), valid as an rbit job id."""
    return uuid.uuid4().hex


class Client:
    """A publisher session: submit jobs, follow their statuses.

    Args:
        settings: A loaded config (``[amqp]``, ``[rbit] exchange``, runner sections for
            their routing keys, ``[status]``, ``[security] signing_key``).
        name: Connection name shown in the RabbitMQ management UI.
        session: An open session to publish through instead of a new one.

    Raises:
        BrokerUnreachable: No host accepts a connection.
        ConfigError: ``signing_key`` is set but unusable.
    """

    def __init__(self, settings: Settings, name: str = "rbit client",
                 session: PublisherSession | None = None) -> None:
        self.settings = settings
        self._signer = None
        if settings.security.signing_key:
            from rbit.security import keys
            from rbit.security.signing import Signer
            self._signer = Signer(keys.signing_key(settings.security.signing_key,
                                                   file=settings.file))
        # A caller's session (the scheduler's) is used, and closed by close(), as is.
        self._session = session or PublisherSession(settings.amqp, name)
        self._watching = False
        self._filter: tuple[str | None, str | None] = (None, None)

    @classmethod
    def from_config(cls, path: str) -> Client:
        """A client for the ini file at ``path`` (see :func:`rbit.config.load_config`)."""
        return cls(load_config(path))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        self._session.close()

    def submit(self, queue: str, body: bytes | str, *, job_id: str | None = None,
               headers: Mapping[str, Any] | None = None, content_type: str | None = None,
               wait: bool = False, timeout: float | None = None) -> Any:
        """Publish one job and return its id (or, with ``wait``, its :class:`JobResult`).

        Args:
            queue: The queue (runner section) the job is for.
            body: The body; text is sent as UTF-8.
            job_id: The AMQP ``message_id`` (the job's id); a fresh one when None.
            headers: Application headers (no ``x-rbit-`` ones).
            content_type: The AMQP content type, e.g. ``application/json``.
            wait: Follow the job until it ends (see :meth:`wait`).
            timeout: With ``wait``: give up after this many seconds (None: forever).

        Raises:
            ValueError: ``job_id`` is not a valid rbit job id.
            Unroutable: No queue would receive the job.
            BrokerError: The broker refused it or the connection failed.
            SignatureError: A header cannot be signed.
        """
        job_id = new_job_id() if job_id is None else job_id
        if not JOB_ID_PATTERN.fullmatch(job_id):
            raise ValueError(f"job id {escape(job_id, 80)!r}: use letters, digits and "
                             "._:@+=- (not first: . -), at most 200 characters")
        data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        exchange, route = target(self.settings, queue)
        if wait:
            self.watch(job=job_id)  # bound before publishing: no status can be missed
        self.publish(exchange, route, data, job_id=job_id, headers=headers,
                     content_type=content_type)
        return self.wait(job_id, timeout) if wait else job_id

    def publish(self, exchange: str, route: str, body: bytes, *, job_id: str,
                headers: Mapping[str, Any] | None = None,
                content_type: str | None = None, also_to: str | None = None) -> None:
        """Publish one job to ``exchange`` with ``route`` (signed when a key is set).

        Persistent, mandatory, and confirmed before this returns. ``also_to`` (with the
        default exchange only) names a second queue that gets a copy in the same
        publish: RabbitMQ's ``BCC`` header, which the broker removes before delivery
        (so it is not signed), and which makes the job routable whenever that queue
        exists.

        Raises:
            Unroutable: No queue would receive the job.
            BrokerError: The broker refused it or the connection failed.
        """
        sent = dict(headers or {})
        if self._signer is not None:
            sent.update(self._signer.sign(exchange, route, job_id, content_type, sent, body))
        if also_to is not None:
            if exchange:
                raise ValueError("also_to needs the default exchange")
            sent["BCC"] = [also_to]
        self._session.publish_job(exchange, route, body, message_id=job_id, headers=sent,
                                  timestamp=int(time.time()), content_type=content_type)

    def build_request(self, queue: str, job_id: int, package: str, version: str,
                      **kwargs: Any) -> str:
        """Submit the PyBit ``BuildRequest`` PyBit would send for a package build.

        The body is built by :func:`rbitext.examples.build_request_body`; the job's id
        is PyBit's numeric ``job.id``. Returns the job id.
        """
        from rbitext.examples import build_request_body
        body = build_request_body(job_id, package, version, **kwargs)
        return self.submit(queue, body, job_id=str(job_id), content_type="application/json")

    def watch(self, *, job: str | None = None, queue: str | None = None) -> None:
        """Start receiving status events (all, or one job's, or one queue's).

        Raises:
            BrokerError: The status exchange does not exist yet.
        """
        binding = f"{queue}.#" if queue and self.settings.status.routing_key.startswith(
            "{queue}.") else "#"
        self._session.watch(self.settings.status.exchange, binding)
        self._watching = True
        self._filter = (job, queue)

    def events(self, timeout: float | None = None):
        """Yield status events (dicts: job_id, status, message, worker, queue, time).

        Stops after ``timeout`` seconds without a matching event (None: never).
        """
        job, queue = self._filter
        while True:
            event = self._session.next_event(3600.0 if timeout is None else timeout)
            if event is None:
                if timeout is not None:
                    return
                continue
            if job is not None and event.get("job_id") != job:
                continue
            if queue is not None and event.get("queue") != queue:
                continue
            yield event

    def wait(self, job_id: str, timeout: float | None = None) -> JobResult:
        """Follow ``job_id`` until a final status, or ``timeout`` seconds.

        :meth:`watch` must have been called before the job was published (``submit``
        with ``wait=True`` does it).
        """
        if not self._watching:
            raise RbitError("watch() before publishing, or statuses may be missed")
        deadline = None if timeout is None else time.monotonic() + timeout
        last = JobResult(job_id, None)
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return last
            event = self._session.next_event(60.0 if left is None else left)
            if event is None or event.get("job_id") != job_id:
                continue
            last = _result(job_id, event)
            if last.final:
                return last


def _result(job_id: str, event: Mapping[str, Any]) -> JobResult:
    try:
        status = Status.parse(str(event.get("status")))
    except ValueError:
        return JobResult(job_id, None, escape(event.get("message", ""), 2000))
    message = escape(event.get("message", ""), 2000)
    final = status.terminal
    # A try that failed and will be retried is reported Waiting/Blocked, not Failed: a
    # Failed is the end. Dead-lettered: every Failed is (a retry would not say Failed).
    return JobResult(job_id, status, message, final, status is Status.FAILED)


__all__ = ["Client", "JobResult", "target", "new_job_id"]
