"""Job status reporting: to the log, an AMQP topic exchange, a PyBit web front-end.

:class:`StatusReporter` is the one object the worker talks to. ``report()`` sits on the
hot path of every job, so it never waits for a network: the ``log`` sink writes its line
at once, while the ``amqp`` and ``http`` sinks each get an in-memory FIFO drained by a
background thread of their own. A sink that is down therefore neither fails nor slows a
job; its events wait (at most ``max_pending`` of them, the oldest are dropped beyond
that, with a warning) and are retried with exponential backoff and jitter, capped at
``retry_max_delay``.

Sinks (``[status] sinks``):

``log``
    An INFO line ``job <id> <queue>: <Status> <message>`` on the ``rbit.status`` logger,
    the message folded to one line and cut at 500 characters (:data:`LOG_MESSAGE_CHARS`).

``amqp``
    One JSON document per status, ``{"job_id", "status", "message", "worker",
    "queue", "time"}`` (``time`` in ISO 8601 UTC with microseconds), and with a job's
    final status ``"usage": {"wall_s", "cpu_s", "max_rss_kib"}`` when the job was
    metered (:mod:`rbit.usage`; ``max_rss_kib`` is null where not metered), published with
    publisher confirms to the topic exchange ``exchange`` under the routing key
    ``routing_key`` formatted with ``{queue}``, ``{status}``, ``{job_id}`` and
    ``{worker}`` as they are (no escaping of dots; keys longer than AMQP's 255 bytes are
    cut). The default ``{queue}.{status}`` gives e.g. ``cnx_any_latex_pdf.Done``, so a
    watcher can bind ``cnx_any_latex_pdf.*`` or ``*.Failed``. Up to 256 events are in
    flight at once; after a nack, a lost connection or a publish error, everything from
    the first unconfirmed event onwards is sent again, so statuses arrive in order but
    a watcher may see duplicates.

``http``
    PyBit's web front-end: ``PUT {http_url}/job/{job_id}`` with the form body
    ``status=<Status>&client=<worker>`` (``[rbit] name``, the building client's name,
    as PyBit's own client sends it); PyBit reads nothing else, so the message is not
    sent. HTTP basic authentication from ``http_user`` / ``http_password`` (or the URL's
    user info) when set. Only ``http_url`` is ever used: the ``web_host`` a PyBit
    BuildRequest names is ignored, so the credentials never go to a host a message
    chose. One persistent connection, events sent one by one in order. A 2xx reply
    delivers the event; network errors, 408, 429 and 5xx are retried; any other reply
    can never succeed, so the event is dropped with an error naming the job. ``PUT`` is
    idempotent, which makes the re-sends after a failure harmless.

Bounds: a status message kept for the network sinks is at most
:data:`EVENT_MESSAGE_CHARS` characters (a longer one keeps its head and its tail, the
two ends of a traceback, around a note of how much was cut), so that a runner's huge
exception text can neither fill the worker's memory while a sink is down nor make
a message the broker refuses; a log line's message is at most :data:`LOG_MESSAGE_CHARS`.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
import ssl
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from rbit.backoff import Backoff
from rbit.config import StatusSettings
from rbit.errors import ConfigError
from rbit.logsetup import emit_default
from rbit.outcome import Status
from rbit.usage import Usage

if TYPE_CHECKING:
    import http.client

log = logging.getLogger(__name__)

Confirm = Callable[[bool], None]
Publish = Callable[[str, str, bytes, Confirm], None]
Sleep = Callable[[float], None]

WINDOW = 256  # events published before waiting for their confirms
FIRST_DELAY = 0.5  # first backoff step, seconds
CONFIRM_TIMEOUT = 30.0  # a confirm that never comes counts as a failure after this
LOG_MESSAGE_CHARS = 500
#: The longest status message the network sinks carry (the amqp event's ``message``).
EVENT_MESSAGE_CHARS = 8000
_MAX_ROUTING_KEY_BYTES = 255  # AMQP short string
_IDLE_WAIT = 5.0  # an idle sink thread re-checks for shutdown this often
_STOP_JOIN = 2.0  # how long close() waits for a thread after telling it to stop


@dataclass(frozen=True)
class _Event:
    job_id: str
    queue: str
    status: Status
    message: str
    time: float  # seconds since the epoch, from the reporter's clock
    usage: Usage | None = None  # with a job's final status (rbit.usage)


class StatusReporter:
    """Carries job statuses to the sinks chosen in ``[status]``.

    Args:
        settings: The ``[status]`` section.
        worker: This worker's name, put in AMQP events and their routing keys.
        publish: For the ``amqp`` sink: a thread-safe
            ``publish(exchange, routing_key, body, on_confirm)`` that calls
            ``on_confirm(True)`` once the broker confirmed the message and
            ``on_confirm(False)`` when it was nacked or the connection was lost first;
            it may raise :class:`rbit.errors.BrokerError` when not connected.
        clock: Time of each event, in seconds since the epoch.
        sleep: Backoff pauses of the sink threads (tests pass a fake); by default a wait
            that :meth:`close` cuts short.

    Raises:
        ConfigError: the settings cannot work (no ``http_url`` for the ``http`` sink, a
            routing key template with unknown placeholders).
        ValueError: the ``amqp`` sink is chosen but no ``publish`` was given.
    """

    def __init__(
        self,
        settings: StatusSettings,
        worker: str,
        *,
        publish: Publish | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Sleep | None = None,
    ) -> None:
        self._clock = clock
        self._log = "log" in settings.sinks
        self._control = _Control(sleep)
        self._sinks: list[_QueuedSink] = []
        if "amqp" in settings.sinks:
            if publish is None:
                raise ValueError("the amqp status sink needs a publish callable")
            self._sinks.append(_AmqpSink(settings, self._control, worker, publish))
        if "http" in settings.sinks:
            self._sinks.append(_HttpSink(settings, self._control, worker))
        for sink in self._sinks:
            sink.start()

    def report(self, job_id: str, queue: str, status: Status, message: str = "",
               usage: Usage | None = None) -> None:
        """Record that job ``job_id`` of ``queue`` reached ``status``; returns at once.

        ``usage`` is what the job used, given with its final status. Thread-safe.
        Delivery to the network sinks happens in the background; after
        :meth:`close` only the log sink still receives events.

        Raises:
            ValueError: ``status`` is a string that names no status.
        """
        if status.__class__ is not Status:
            status = Status.parse(status)
        if message.__class__ is not str:  # PyBit-era runners pass exceptions too
            message = "" if message is None else str(message)
        if self._log:
            log_status(job_id, queue, status, message)
        # The event, its time included, only exists for the network sinks: the log sink
        # on its own (the default) costs a job one log record and nothing else.
        if self._sinks and not self._control.stop.is_set():
            if len(message) > EVENT_MESSAGE_CHARS:
                message = bounded(message)
            event = _Event(job_id, queue, status, message, self._clock(), usage)
            for sink in self._sinks:
                sink.put(event)

    def pending(self) -> int:
        """Events not yet delivered, summed over the network sinks."""
        return sum(sink.pending() for sink in self._sinks)

    def close(self, timeout: float) -> None:
        """Deliver what can be delivered within ``timeout`` seconds, then stop.

        A sink in a backoff pause gets one more try at once. Events still undelivered
        when the time is up are dropped, and their number is logged.
        """
        if self._control.stop.is_set():
            return
        deadline = time.monotonic() + max(0.0, timeout)
        self._control.closing.set()
        for sink in self._sinks:
            sink.wake()
        for sink in self._sinks:
            sink.join(deadline - time.monotonic())
        self._control.stop.set()
        for sink in self._sinks:
            sink.wake()
            sink.join(_STOP_JOIN)
            sink.log_losses()


def log_status(job_id: str, queue: str, status: Status, message: str) -> None:
    """Write the log sink's line for one status on the ``rbit.status`` logger.

    With the worker's default logging, the line goes straight into the handler's
    buffer (:func:`rbit.logsetup.emit_default`: the same text, a fraction of the cost).
    Otherwise a record is handed to the logger's handlers as ``Logger.log`` would hand
    it, so levels, filters, handlers and propagation of the logging configuration
    apply; but it is made without ``Logger.log``'s search of the caller's frames, which
    cost more than all the rest of a line. Its origin is this function.
    """
    # A bare progress status (rbit's own "Building" at the start of every job) says
    # little: DEBUG keeps the default log at one line per job. Folding a long
    # traceback costs something: only when the line will be written.
    # (Status.terminal and .value, inlined: two Python-level calls less per line.)
    level = _INFO if message or status in _TERMINAL else _DEBUG
    if log.isEnabledFor(level):
        text = one_line(message) if message else ""
        args = (job_id, queue, status._value_, " " + text if text else "")
        now = _now_ns()
        created = now / 1e9
        msecs = (now % 1_000_000_000) // 1_000_000 + 0.0
        if not emit_default(log, level, _MSG, args, created, msecs):
            log.handle(_record(level, args, created, msecs))


_INFO, _DEBUG = logging.INFO, logging.DEBUG
_MSG = "job %s %s: %s%s"
#: The clock of the status lines, in nanoseconds since the epoch (tests freeze it).
_now_ns = time.time_ns
# A tuple: membership tests identity first, in C (an Enum's hash is a Python call).
_TERMINAL = tuple(status for status in Status if status.terminal)
_LINE = log_status.__code__.co_firstlineno


def _made_by_logging(level: int, args: tuple) -> logging.LogRecord:
    return log.makeRecord(log.name, level, __file__, _LINE, _MSG, args, None, "log_status")


def _logging_flags() -> tuple[bool, bool, bool]:
    return logging.logThreads, logging.logProcesses, logging.logMultiprocessing


def _template() -> dict:
    """The fields every status record shares.

    Made again when logging's switches changed (:mod:`rbit.logsetup` turns off what its
    format does not show).
    """
    global _TEMPLATE, _TEMPLATE_FLAGS
    flags = _logging_flags()
    if flags != _TEMPLATE_FLAGS:
        _TEMPLATE, _TEMPLATE_FLAGS = _made_by_logging(_INFO, ()).__dict__.copy(), flags
    return _TEMPLATE


_TEMPLATE_FLAGS: tuple[bool, bool, bool] | None = None  # made by the first record
_TEMPLATE: dict = {}
_LEVEL_NAMES = {_INFO: logging.getLevelName(_INFO), _DEBUG: logging.getLevelName(_DEBUG)}


def _record(level: int, args: tuple, created: float, msecs: float) -> logging.LogRecord:
    """A record of a status line, as ``LogRecord(...)`` would make it, in half the time.

    What is the same for every line (its origin, format, process name) is copied from a
    record made once; only the time (``created`` and ``msecs``, from the caller's clock),
    the thread, the level and the arguments are set here. A record factory installed
    with ``logging.setLogRecordFactory`` is obeyed.
    """
    if logging.getLogRecordFactory() is not logging.LogRecord:
        return _made_by_logging(level, args)
    record = _new_record(logging.LogRecord)
    fields = record.__dict__
    template = _template()
    fields.update(template)
    fields["created"] = created
    fields["msecs"] = msecs
    fields["relativeCreated"] = (created - template["created"]) * 1000 + template[
        "relativeCreated"]
    fields["levelno"] = level
    fields["levelname"] = _LEVEL_NAMES[level]
    fields["args"] = args
    if logging.logThreads:
        fields["thread"] = threading.get_ident()
        fields["threadName"] = threading.current_thread().name
    if logging.logProcesses:
        fields["process"] = os.getpid()  # not the template's: a daemon forks after import
    return record


_new_record = logging.LogRecord.__new__


def one_line(text: str, limit: int = LOG_MESSAGE_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters.

    Whitespace runs, newlines included, become single spaces; a cut ends with an ellipsis.
    """
    # Only a head of a huge text is folded: enough for ``limit`` characters unless it is
    # almost all whitespace, and the cost stays the same for a 10 MB message.
    head = text if len(text) <= limit * 8 else text[: limit * 8] + "\u2026"
    folded = " ".join(head.split())
    return folded if len(folded) <= limit else folded[: limit - 1] + "\u2026"


def bounded(text: str, limit: int = EVENT_MESSAGE_CHARS) -> str:
    """``text`` cut to at most ``limit`` characters, keeping its head and its tail."""
    if len(text) <= limit:
        return text
    note = f"\n[... {len(text) - limit} characters cut ...]\n"
    keep = max(0, limit - len(note))
    head = keep // 4
    return text[:head] + note + text[len(text) - (keep - head):]


# ---------------------------------------------------------------------------------------
# The machinery shared by the queued sinks


class _Control:
    """Shutdown flags and the backoff pause, shared by the sink threads."""

    def __init__(self, sleep: Sleep | None) -> None:
        self.sleep = sleep
        self.closing = threading.Event()  # close() started: drain, then exit
        self.stop = threading.Event()  # close() timed out: exit now

    def pause(self, delay: float) -> None:
        if self.sleep is not None:
            self.sleep(delay)
        elif not self.closing.is_set():
            self.closing.wait(delay)  # close() ends the pause for a last try
        else:
            self.stop.wait(delay)


class _Backoff(Backoff):
    """Exponential delays with jitter: about 0.5, 1, 2, 4 ... seconds up to ``cap``."""

    def __init__(self, cap: float, first: float = FIRST_DELAY) -> None:
        # Jitter in [delay/2, delay]: workers cut off together do not retry together.
        super().__init__(first, cap, spread=(0.5, 1.0))


class _Backlog:
    """A bounded FIFO of events plus a count of those taken but not yet finished."""

    def __init__(self, limit: int) -> None:
        self._items: deque[_Event] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._limit = max(1, limit)
        self._in_flight = 0
        self.dropped = 0  # events pushed out because the backlog was full

    def put(self, event: _Event) -> None:
        with self._lock:
            self._items.append(event)
            if len(self._items) > self._limit:
                self._items.popleft()  # never block a job: the oldest status goes
                self.dropped += 1
        if not self._ready.is_set():
            self._ready.set()

    def take(self, count: int) -> list[_Event]:
        """Up to ``count`` events, oldest first, now counted as in flight."""
        with self._lock:
            taken = [self._items.popleft() for _ in range(min(count, len(self._items)))]
            self._in_flight += len(taken)
        return taken

    def finish(self, count: int) -> None:
        """``count`` in-flight events are done with (delivered, refused or given up)."""
        with self._lock:
            self._in_flight -= count

    def pending(self) -> int:
        with self._lock:
            return len(self._items) + self._in_flight

    def wait(self, timeout: float) -> None:
        # Cleared after waking: the caller takes again, so no put() can be missed.
        self._ready.wait(timeout)
        self._ready.clear()

    def wake(self) -> None:
        self._ready.set()


class _QueuedSink:
    """A sink whose events are delivered, in order, by a background thread.

    Subclasses implement :meth:`_send`.
    """

    name = "?"
    window = WINDOW

    def __init__(self, settings: StatusSettings, control: _Control) -> None:
        self._control = control
        self._backlog = _Backlog(settings.max_pending)
        self._backoff = _Backoff(settings.retry_max_delay)
        self._thread = threading.Thread(
            target=self._run, name=f"rbit-status-{self.name}", daemon=True
        )
        self._warned_drops = 0
        self._failing = False
        self.refused = 0  # events the far end turned down for good

    def start(self) -> None:
        self._thread.start()

    def put(self, event: _Event) -> None:
        self._backlog.put(event)

    def pending(self) -> int:
        return self._backlog.pending()

    def wake(self) -> None:
        self._backlog.wake()

    def join(self, timeout: float) -> None:
        self._thread.join(max(0.0, timeout))

    def log_losses(self) -> None:
        """Log, at shutdown, how many events never reached this sink."""
        left, dropped = self._backlog.pending(), self._backlog.dropped
        if left or dropped or self.refused:
            log.warning(
                "%s status sink: %d event(s) dropped: %d undelivered at shutdown, "
                "%d over max_pending, %d refused", self.name, left + dropped + self.refused,
                left, dropped, self.refused,
            )

    def _run(self) -> None:
        pending: list[_Event] = []
        try:
            while not self._control.stop.is_set():
                pending += self._backlog.take(self.window - len(pending))
                self._warn_drops()
                if not pending:
                    if self._control.closing.is_set():
                        return
                    self._backlog.wait(_IDLE_WAIT)
                    continue
                pending = self._attempt(pending)
        finally:
            self._close()

    def _attempt(self, events: list[_Event]) -> list[_Event]:
        """Send ``events``; return those still to be sent, pausing after a failure."""
        done, error = self._send_safely(events)
        self._backlog.finish(done)
        if done == len(events):
            self._recovered()
            return []
        if self._control.stop.is_set():
            return events[done:]  # cut short by close(): not a failure of the far end
        self._failed(error or "unknown error")
        self._control.pause(self._backoff.next())
        return events[done:]

    def _send_safely(self, events: list[_Event]) -> tuple[int, str | None]:
        try:
            return self._send(events)
        except Exception as exc:  # noqa: BLE001 - a sink must outlive its own bugs
            log.exception("%s status sink: unexpected error; will retry", self.name)
            return 0, repr(exc)

    def _send(self, events: list[_Event]) -> tuple[int, str | None]:
        """Deliver ``events`` in order.

        Returns:
            How many events from the front are finished with, and why the next one
            failed (``None`` when all are finished).
        """
        raise NotImplementedError

    def _close(self) -> None:
        """Release resources when the thread ends."""

    def _failed(self, error: str) -> None:
        if not self._failing:
            log.warning("%s status sink: delivery failed (%s); retrying with backoff",
                        self.name, error)
            self._failing = True
        else:
            log.debug("%s status sink: delivery failed again (%s)", self.name, error)

    def _recovered(self) -> None:
        self._backoff.reset()
        if self._failing:
            log.info("%s status sink: delivering again", self.name)
            self._failing = False

    def _warn_drops(self) -> None:
        dropped = self._backlog.dropped
        if dropped > self._warned_drops:
            log.warning(
                "%s status sink: %d event(s) dropped, the oldest first, because more than "
                "max_pending were waiting (%d in all)", self.name,
                dropped - self._warned_drops, dropped,
            )
            self._warned_drops = dropped


# ---------------------------------------------------------------------------------------
# amqp


class _AmqpSink(_QueuedSink):
    """Publishes JSON events to a topic exchange, pipelined under publisher confirms."""

    name = "amqp"

    def __init__(
        self, settings: StatusSettings, control: _Control, worker: str, publish: Publish
    ) -> None:
        super().__init__(settings, control)
        self._exchange = settings.exchange
        self._template = settings.routing_key
        self._worker = worker
        self._publish = publish
        try:  # fail at start, not in the sink thread for every event
            routing_key(self._template, _Event("id", "queue", Status.DONE, "", 0.0), worker)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"bad routing key template: {exc}", section="status",
                              key="routing_key") from exc

    def _send(self, events: list[_Event]) -> tuple[int, str | None]:
        confirms = _Confirms(len(events))
        sent, error = 0, None
        for index, event in enumerate(events):
            try:
                self._publish(
                    self._exchange,
                    routing_key(self._template, event, self._worker),
                    event_body(event, self._worker),
                    functools.partial(confirms.confirm, index),
                )
            except Exception as exc:  # noqa: BLE001 - BrokerError or worse: retry
                error = f"publish failed: {exc}"
                break
            sent += 1
        confirms.wait(sent, CONFIRM_TIMEOUT, self._control.stop)
        done = confirms.confirmed_prefix(sent)
        if done < sent:
            error = "nacked, or no confirm (connection lost?)"
        return done, error


class _Confirms:
    """The confirms of one window of published events.

    ``confirm`` runs on the broker's I/O thread: it only records and notifies. A confirm
    for an older window lands in that window's own object, so it cannot be mistaken for
    one of this window.
    """

    def __init__(self, size: int) -> None:
        self._results: list[bool | None] = [None] * size
        self._settled = 0
        self._cond = threading.Condition()

    def confirm(self, index: int, ok: bool) -> None:
        with self._cond:
            if self._results[index] is None:
                self._results[index] = bool(ok)
                self._settled += 1
                self._cond.notify_all()

    def wait(self, count: int, timeout: float, stop: threading.Event) -> None:
        """Wait until the first ``count`` events are settled, ``timeout`` or ``stop``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._settled < count and not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(min(left, 0.25))  # short slices: notice stop

    def confirmed_prefix(self, count: int) -> int:
        with self._cond:
            return next((i for i in range(count) if self._results[i] is not True), count)


def routing_key(template: str, event: _Event, worker: str) -> str:
    """The AMQP routing key of ``event``: ``template`` formatted, cut to 255 bytes."""
    key = template.format(
        queue=event.queue, status=event.status.value, job_id=event.job_id, worker=worker
    )
    encoded = key.encode("utf-8")
    if len(encoded) <= _MAX_ROUTING_KEY_BYTES:
        return key
    return encoded[:_MAX_ROUTING_KEY_BYTES].decode("utf-8", "ignore")


def event_body(event: _Event, worker: str) -> bytes:
    """The JSON document published for ``event``."""
    stamp = datetime.fromtimestamp(event.time, tz=UTC)
    doc = {
        "job_id": event.job_id,
        "status": event.status.value,
        "message": event.message,
        "worker": worker,
        "queue": event.queue,
        "time": stamp.isoformat(timespec="microseconds"),
    }
    if event.usage is not None:
        doc["usage"] = event.usage.to_dict()
    return json.dumps(doc).encode("utf-8")


# ---------------------------------------------------------------------------------------
# http


class _HttpSink(_QueuedSink):
    """PUTs each status to PyBit's web front-end over one persistent connection.

    Its methods import :mod:`http.client` themselves: it loads the email package, start-up
    time a worker without this sink would pay for nothing.
    """

    name = "http"

    def __init__(self, settings: StatusSettings, control: _Control, worker: str = "") -> None:
        super().__init__(settings, control)
        self._client = worker
        if not settings.http_url:
            raise ConfigError("required when the http sink is chosen", section="status",
                              key="http_url")
        split = urllib.parse.urlsplit(settings.http_url)
        self._https = split.scheme.lower() == "https"
        self._host = split.hostname or ""
        self._port = split.port
        self._base = split.path.rstrip("/")
        self._timeout = settings.http_timeout
        self._headers = {"Content-Type": "application/x-www-form-urlencoded"}
        user = settings.http_user or _unquote(split.username)
        if user:
            password = settings.http_password or _unquote(split.password) or ""
            token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            self._headers["Authorization"] = "Basic " + token
        self._conn: http.client.HTTPConnection | None = None

    def _send(self, events: list[_Event]) -> tuple[int, str | None]:
        for index, event in enumerate(events):
            if self._control.stop.is_set():
                return index, None
            error = self._deliver(event)
            if error is not None:
                return index, error
        return len(events), None

    def _deliver(self, event: _Event) -> str | None:
        """Send one event; ``None`` when finished with it, else why to retry."""
        import http.client
        try:
            code = self._put(event)
        except (OSError, http.client.HTTPException) as exc:
            return f"cannot reach the status server: {exc!r}"
        if 200 <= code < 300:
            return None
        if code in (408, 429) or code >= 500:
            return f"HTTP {code}"
        # Any other answer (404 unknown job, 401 bad credentials...) will not change.
        log.error("job %s: the status server refused status %s with HTTP %d; dropped",
                  event.job_id, event.status.value, code)
        self.refused += 1
        return None

    def _put(self, event: _Event) -> int:
        import http.client
        path = f"{self._base}/job/{urllib.parse.quote(event.job_id, safe='')}"
        body = urllib.parse.urlencode(
            {"status": event.status.value, "client": self._client}).encode("ascii")
        while True:
            conn = self._connection()
            # A kept-alive socket may have been closed by the server meanwhile: one
            # immediate retry on a fresh connection before calling it a failure.
            reused = conn.sock is not None
            try:
                conn.request("PUT", path, body, self._headers)
                response = conn.getresponse()
                response.read()  # the connection can only be reused once drained
                return response.status
            except (OSError, http.client.HTTPException):
                self._close()
                if not reused:
                    raise

    def _connection(self) -> http.client.HTTPConnection:
        import http.client
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout,
                    context=ssl.create_default_context(),
                )
            else:
                self._conn = http.client.HTTPConnection(
                    self._host, self._port, timeout=self._timeout
                )
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _unquote(text: str | None) -> str | None:
    return None if text is None else urllib.parse.unquote(text)
