"""Live statuses, fanned out to the page's server-sent-event streams.

The status exchange is followed as ``rbit watch`` follows it.

:class:`LiveFeed` binds a private queue to ``[status] exchange`` (the workers' ``amqp``
status sink) through :class:`rbit.amqp.publisher.PublisherSession`, records every event
in the :class:`~rbit.dashboard.jobs.JobLog` and hands it to the :class:`Hub`. Until a
worker declared the exchange, and after a lost connection, it tries again every few
seconds.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from rbit.amqp.publisher import PublisherSession
from rbit.config import Settings
from rbit.dashboard.jobs import JobLog
from rbit.errors import BrokerError, BrokerUnreachable

log = logging.getLogger(__name__)

#: Events a slow page may fall behind by before its stream is ended (it reconnects).
STREAM_BACKLOG = 1_000
#: Open streams at most (each holds a server thread).
MAX_STREAMS = 32
RETRY_DELAY = 3.0


class Hub:
    """Fans events out to subscribers (one queue each); never blocks a publisher."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: set[queue.Queue] = set()

    def subscribe(self) -> queue.Queue | None:
        """A new subscriber's queue (None: :data:`MAX_STREAMS` are open already)."""
        with self._lock:
            if len(self._subscribers) >= MAX_STREAMS:
                return None
            inbox: queue.Queue = queue.Queue(STREAM_BACKLOG)
            self._subscribers.add(inbox)
            return inbox

    def unsubscribe(self, inbox: queue.Queue) -> None:
        with self._lock:
            self._subscribers.discard(inbox)

    def publish(self, event: Any) -> None:
        """Give ``event`` to every subscriber; one too far behind gets None (end)."""
        with self._lock:
            subscribers = list(self._subscribers)
        for inbox in subscribers:
            try:
                inbox.put_nowait(event)
            except queue.Full:
                self.unsubscribe(inbox)
                _end(inbox)

    def close(self) -> None:
        """End every stream."""
        with self._lock:
            subscribers, self._subscribers = list(self._subscribers), set()
        for inbox in subscribers:
            _end(inbox)


def _end(inbox: queue.Queue) -> None:
    try:
        inbox.put_nowait(None)
    except queue.Full:
        inbox.get_nowait()
        inbox.put_nowait(None)


class LiveFeed:
    """Follows the status exchange from a daemon thread until :meth:`close`.

    Args:
        settings: ``[amqp]`` and ``[status] exchange``.
        jobs: Records each event.
        hub: Gets each event's shown fields.
    """

    def __init__(self, settings: Settings, jobs: JobLog, hub: Hub) -> None:
        self._settings = settings
        self._jobs = jobs
        self._hub = hub
        self._stop = threading.Event()
        self.following = False
        self._thread = threading.Thread(target=self._run, name="rbit-dashboard-live",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
            except (BrokerUnreachable, BrokerError) as exc:
                log.info("not following statuses (retrying in %.0f s): %s", RETRY_DELAY, exc)
            self.following = False
            self._stop.wait(RETRY_DELAY)

    def _follow(self) -> None:
        exchange = self._settings.status.exchange
        with PublisherSession(self._settings.amqp, "rbit dashboard live") as session:
            session.watch(exchange, "#")
            self.following = True
            log.info("following statuses on exchange %s", exchange)
            while not self._stop.is_set():
                event = session.next_event(1.0)
                if event is not None:
                    self._hub.publish(self._jobs.add_event(event))
