"""A worker's observability: metrics, the HTTP endpoint and systemd, started together.

:class:`WorkerObservation` is built after the worker (its pools get the metrics'
observer before any job starts) and before it connects (a port that cannot be bound
stops the worker at once). The status snapshot and the health check here are what the
worker can tell by itself: connection, queues, jobs running, status backlog.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from rbit import __version__
from rbit.observe.http import Endpoints, ObserveServer
from rbit.observe.metrics import JobMetrics, WorkerMetrics, WorkerSources
from rbit.systemd import Heartbeat, Notifier

if TYPE_CHECKING:
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
        self.jobs = JobMetrics(pool.settings.queue for pool in worker.pools)
        for pool in worker.pools:
            pool.metrics = self.jobs
        broker = worker.broker
        self.metrics = WorkerMetrics(self.jobs, WorkerSources(
            connected=lambda: broker.connected,
            reconnects=lambda: broker.connections_lost,
            renewals=lambda: broker.leases.renewed,
            undecodable=lambda: list(broker.consumers.refused.items()),
            backlog=worker.reporter.pending,
        ))
        http = worker.settings.http
        self.server = None if http is None else ObserveServer(http, Endpoints(
            healthy=self.healthy, metrics=self.metrics.exposition, status=self.status))
        self._notifier = notifier or Notifier(None)
        self._heartbeat = Heartbeat(self._notifier, self._io_alive, self.status_line)

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
        return True, "consuming " + self._queues_text()

    def status(self, verbose: bool) -> dict[str, Any]:
        """The worker's state as JSON-serialisable data."""
        worker, broker = self._worker, self._worker.broker
        jobs = self.jobs.snapshot()
        data: dict[str, Any] = {
            "worker": worker.settings.worker.name,
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.time() - self._started, 1),
            "broker": {"connected": broker.connected, "mode": broker.mode,
                       "reconnects": broker.connections_lost},
            "healthy": self.healthy()[0],
            "status_backlog": worker.reporter.pending(),
            "queues": [{"queue": pool.settings.queue,
                        "running": jobs[pool.settings.queue].running,
                        **jobs[pool.settings.queue].outcomes}
                       for pool in worker.pools],
        }
        if verbose:
            for entry, pool in zip(data["queues"], worker.pools):
                runner = pool.settings
                one = jobs[runner.queue]
                entry.update(kind=runner.kind, concurrency=runner.concurrency,
                             prefetch=runner.prefetch, retries=one.retries,
                             dead_letters=one.dead, busy_seconds=round(one.seconds, 3))
        return data

    def status_line(self) -> str:
        """One line for ``systemctl status``."""
        if self._stopping:
            return f"stopping, {self.jobs.running()} jobs running"
        state = "consuming" if self._worker.broker.connected else "reconnecting;"
        return f"{state} {len(self._worker.pools)} queues, {self.jobs.running()} jobs running"

    def _queues_text(self) -> str:
        return ", ".join(pool.settings.queue for pool in self._worker.pools)

    def _io_alive(self, timeout: float) -> bool:
        """Whether the broker's I/O loop runs a call handed to it within ``timeout``."""
        answered = threading.Event()
        self._worker.broker.call_soon(answered.set)
        return answered.wait(timeout)
