"""A worker's observability: metrics, the HTTP endpoint and systemd, started together.

:class:`WorkerObservation` is built after the worker (with ``[http]``, its pools get
the metrics' observer before any job starts) and before it connects (a port that cannot be bound
stops the worker at once). ``/stats`` and ``/history`` serve the control plane's status
snapshot and job history (:mod:`rbit.control`), the same data ``rbit ctl status`` and
``rbit ctl history`` gather.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from rbit.systemd import Heartbeat, Notifier

if TYPE_CHECKING:
    from rbit.config import HttpSettings
    from rbit.observe.http import Endpoints, ObserveServer
    from rbit.worker import Worker

log = logging.getLogger(__name__)


class WorkerObservation:
    """Metrics, HTTP endpoint (when ``[http] bind`` is set) and systemd notifications.

    Args:
        worker: The worker, built but not started.
        notifier: systemd's socket (:meth:`Notifier.from_environ`); None for none.

    Raises:
        HttpError: ``[http] bind`` names an address that cannot be bound.
    """

    def __init__(self, worker: Worker, notifier: Notifier | None = None) -> None:
        self._worker = worker
        self._started = time.time()
        self._stopping = False
        http = worker.settings.http
        # Without [http] nothing can scrape the metrics: the job pools count nothing for
        # them (and prometheus_client is not even loaded).
        self.server = None if http is None else self._server(http, worker)
        self._notifier = notifier or Notifier(None)
        self._heartbeat = Heartbeat(self._notifier, self._io_alive, self.status_line)

    def _server(self, http: HttpSettings, worker: Worker) -> ObserveServer:
        # Imported here: http.server (socketserver, email) is start-up time a worker
        # without [http] would pay for nothing.
        from rbit.observe.http import ObserveServer
        return ObserveServer(http, self._endpoints(worker))

    def _endpoints(self, worker: Worker) -> Endpoints:
        from rbit.observe.http import Endpoints
        from rbit.observe.metrics import JobMetrics, WorkerMetrics, WorkerSources

        jobs = JobMetrics(pool.settings.queue for pool in worker.pools)
        for pool in worker.pools:
            pool.metrics = jobs
        broker = worker.broker
        metrics = WorkerMetrics(jobs, WorkerSources(
            connected=lambda: broker.connected,
            reconnects=lambda: broker.connections_lost,
            renewals=lambda: broker.leases.renewed,
            undecodable=lambda: list(broker.consumers.refused.items()),
            backlog=worker.reporter.pending,
        ))
        # /stats and /history serve what `rbit ctl status|history` answer (rbit.control).
        control = worker.control
        return Endpoints(healthy=self.healthy, metrics=metrics.exposition, status=control.status,
                         history=control.history if control.history_enabled else None)

    def start(self) -> None:
        """The worker consumes: serve HTTP and tell systemd it is ready."""
        if self.server is not None:
            self.server.start()
        self._notifier.ready(self.status_line())
        self._heartbeat.start()

    def stopping(self) -> None:
        """The worker begins its graceful stop: unhealthy from now on."""
        self._stopping = True
        self._notifier.stopping("stopping: waiting for running jobs")

    def close(self) -> None:
        """The worker stopped: release the port and the heartbeat thread."""
        self._heartbeat.stop()
        if self.server is not None:
            self.server.close()

    # ---------------------------------------------------------------- what is told

    def healthy(self) -> tuple[bool, str]:
        """Healthy while connected and consuming (or polling, in poll mode)."""
        broker = self._worker.broker
        if self._stopping or broker.stopping:
            return False, "stopping"
        if broker.start_error is not None:
            return False, f"cannot reach the broker: {broker.start_error}"
        if broker.mode == "poll":
            return True, "polling " + self._queues_text()
        if not broker.connected:
            return False, "not connected to the broker"
        paused = broker.paused()
        text = "consuming " + self._queues_text(paused)
        return True, text + (f"; paused: {', '.join(sorted(paused))}" if paused else "")

    def status_line(self) -> str:
        """One line for ``systemctl status``."""
        running = self._worker.control.observer.running_count()
        if self._stopping:
            return f"stopping, {running} jobs running"
        state = "consuming" if self._worker.broker.connected else "reconnecting;"
        return f"{state} {len(self._worker.pools)} queues, {running} jobs running"

    def _queues_text(self, paused: frozenset[str] = frozenset()) -> str:
        return ", ".join(pool.settings.queue for pool in self._worker.pools
                         if pool.settings.queue not in paused) or "nothing"

    def _io_alive(self, timeout: float) -> bool:
        """Whether the broker's I/O loop runs a call handed to it within ``timeout``."""
        answered = threading.Event()
        self._worker.broker.call_soon(answered.set)
        return answered.wait(timeout)
