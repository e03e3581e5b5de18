"""The worker's Prometheus metrics, gathered when scraped.

A job costs one uncontended lock and a few integer additions at its start and at its
settlement (:class:`JobMetrics`); everything else (the broker's connection, lease
renewals, reconnects, the status backlog) is read from counters the parts keep anyway,
at scrape time, by a custom collector. Each :class:`WorkerMetrics` has its own registry,
so several workers in one process (or a test run) never share a series.

Labels are only ``queue`` (from the configuration), ``outcome``, ``kind`` and
``reason`` (fixed sets): no series grows with the number of jobs.

=====================================  =======  ======================================
name                                   type     labels
=====================================  =======  ======================================
rbit_jobs_total                        counter  queue, outcome (done, retried,
                                                dead_lettered)
rbit_job_duration_seconds              histo.   queue
rbit_job_cpu_seconds_total             counter  queue (CPU time of metered jobs,
                                                rbit.usage)
rbit_jobs_in_progress                  gauge    queue
rbit_job_retries_total                 counter  queue, kind (failed, blocked)
rbit_dead_letters_total                counter  queue, reason (retries_exhausted,
                                                rejected, undecodable)
rbit_lease_renewals_total              counter
rbit_broker_connected                  gauge
rbit_broker_reconnects_total           counter
rbit_status_backlog                    gauge
rbit_build_info                        gauge    version, python
=====================================  =======  ======================================
"""

from __future__ import annotations

import bisect
import platform
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from rbit import __version__
from rbit.fate import Settlement
from rbit.outcome import Kind, Outcome, Status

#: Upper bounds of the job duration histogram's buckets, seconds (jobs run from
#: milliseconds to hours).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0)
OUTCOMES = ("done", "retried", "dead_lettered")
RETRY_KINDS = ("failed", "blocked")
DEAD_REASONS = ("retries_exhausted", "rejected", "undecodable")


class QueueStats:
    """One queue's job counts (any thread: one lock per update)."""

    __slots__ = ("lock", "running", "outcomes", "retries", "dead", "buckets", "seconds",
                 "cpu_seconds")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.retries = dict.fromkeys(RETRY_KINDS, 0)
        self.dead = dict.fromkeys(DEAD_REASONS, 0)
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)  # the last one is +Inf
        self.seconds = 0.0
        self.cpu_seconds = 0.0

    def snapshot(self) -> QueueStats:
        """A consistent copy, for a scrape."""
        copy = QueueStats()
        with self.lock:
            copy.running = self.running
            copy.outcomes = dict(self.outcomes)
            copy.retries = dict(self.retries)
            copy.dead = dict(self.dead)
            copy.buckets = list(self.buckets)
            copy.seconds = self.seconds
            copy.cpu_seconds = self.cpu_seconds
        return copy


class JobMetrics:
    """The job pools' observer: told when each job starts and how it was settled.

    Args:
        queues: The configured queues (the only ``queue`` label values, besides any
            queue a pool reports that was not listed).
        clock: Monotonic time, the same the pools stamp a job's start with.
    """

    def __init__(self, queues: Iterable[str], clock: Callable[[], float] = time.monotonic):
        self._queues = {queue: QueueStats() for queue in queues}
        self._new_lock = threading.Lock()
        self._clock = clock

    def _stats(self, queue: str) -> QueueStats:
        stats = self._queues.get(queue)
        if stats is None:
            with self._new_lock:
                stats = self._queues.setdefault(queue, QueueStats())
        return stats

    def job_started(self, queue: str) -> None:
        """A job left the queue for its runner."""
        stats = self._stats(queue)
        with stats.lock:
            stats.running += 1

    def job_settled(self, queue: str, outcome: Outcome, settlement: Settlement,
                    started: float) -> None:
        """A job's try ended and its fate was decided (:func:`rbit.fate.decide`).

        Args:
            queue: Its queue.
            outcome: How the runner ended.
            settlement: Its fate: acked, retried (Waiting, Blocked) or dead-lettered.
            started: When it started, on the clock's scale.
        """
        status = settlement.status
        dead = status is Status.FAILED and settlement.publish is not None
        seconds = max(0.0, self._clock() - started)
        slot = bisect.bisect_left(DURATION_BUCKETS, seconds)
        usage = outcome.usage
        stats = self._stats(queue)
        with stats.lock:
            stats.running -= 1
            stats.buckets[slot] += 1
            stats.seconds += seconds
            if usage is not None:
                stats.cpu_seconds += usage.cpu_s
            if dead:
                stats.outcomes["dead_lettered"] += 1
                reason = "rejected" if outcome.kind is Kind.REJECTED else "retries_exhausted"
                stats.dead[reason] += 1
            elif status is Status.WAITING or status is Status.BLOCKED:
                stats.outcomes["retried"] += 1
                stats.retries["blocked" if status is Status.BLOCKED else "failed"] += 1
            else:
                stats.outcomes["done"] += 1

    def running(self) -> int:
        """Jobs running now, over every queue."""
        return sum(stats.running for stats in self._queues.values())

    def snapshot(self) -> dict[str, QueueStats]:
        return {queue: stats.snapshot() for queue, stats in list(self._queues.items())}


class WorkerSources:
    """What the collector reads at scrape time besides the job counts.

    Each is a zero-argument callable; counters only grow.
    """

    def __init__(self, *, connected: Callable[[], bool], reconnects: Callable[[], int],
                 renewals: Callable[[], int], undecodable: Callable[[], Sequence[tuple[str, int]]],
                 backlog: Callable[[], int]) -> None:
        self.connected = connected
        self.reconnects = reconnects
        self.renewals = renewals
        self.undecodable = undecodable  # (queue, count) of deliveries refused undecoded
        self.backlog = backlog


class _WorkerCollector:
    def __init__(self, jobs: JobMetrics, sources: WorkerSources) -> None:
        self._jobs, self._sources = jobs, sources

    def collect(self) -> Iterator[Metric]:
        stats = self._jobs.snapshot()
        undecodable = dict(self._sources.undecodable())
        yield from _job_families(stats, undecodable)
        src = self._sources
        yield _single(CounterMetricFamily, "rbit_lease_renewals",
                      "Leases of long jobs' deliveries renewed.", src.renewals())
        yield _single(GaugeMetricFamily, "rbit_broker_connected",
                      "1 while connected to RabbitMQ.", 1 if src.connected() else 0)
        yield _single(CounterMetricFamily, "rbit_broker_reconnects",
                      "Connections to RabbitMQ lost (and reconnected).", src.reconnects())
        yield _single(GaugeMetricFamily, "rbit_status_backlog",
                      "Status events not yet delivered.", src.backlog())
        yield build_info("rbit")


def _job_families(stats: dict[str, QueueStats], undecodable: dict[str, int]) -> Iterator[Metric]:
    jobs = CounterMetricFamily("rbit_jobs", "Jobs settled, by queue and outcome.",
                               labels=["queue", "outcome"])
    running = GaugeMetricFamily("rbit_jobs_in_progress", "Jobs running now.",
                                labels=["queue"])
    retries = CounterMetricFamily("rbit_job_retries", "Jobs sent back for a later try.",
                                  labels=["queue", "kind"])
    dead = CounterMetricFamily("rbit_dead_letters", "Jobs sent to the dead letters.",
                               labels=["queue", "reason"])
    duration = HistogramMetricFamily("rbit_job_duration_seconds",
                                     "Time from a job's start to its settlement.",
                                     labels=["queue"])
    cpu = CounterMetricFamily("rbit_job_cpu_seconds", "CPU seconds used by metered jobs "
                              "(user + system; rbit.usage says whose).", labels=["queue"])
    for queue, one in sorted(stats.items()):
        for outcome, count in one.outcomes.items():
            extra = undecodable.get(queue, 0) if outcome == "dead_lettered" else 0
            jobs.add_metric([queue, outcome], count + extra)
        running.add_metric([queue], one.running)
        for kind, count in one.retries.items():
            retries.add_metric([queue, kind], count)
        for reason, count in one.dead.items():
            dead.add_metric([queue, reason], count + (
                undecodable.get(queue, 0) if reason == "undecodable" else 0))
        cumulative, buckets = 0, []
        for bound, count in zip((*DURATION_BUCKETS, float("inf")), one.buckets, strict=True):
            cumulative += count
            buckets.append((_le(bound), cumulative))
        duration.add_metric([queue], buckets, one.seconds)
        cpu.add_metric([queue], one.cpu_seconds)
    yield from (jobs, running, retries, dead, duration, cpu)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _single(kind: Any, name: str, documentation: str, value: float) -> Metric:
    family = kind(name, documentation, labels=[])
    family.add_metric([], value)
    return family


def build_info(prefix: str) -> Metric:
    """``<prefix>_build_info{version, python} 1``."""
    info = GaugeMetricFamily(f"{prefix}_build_info", "The running version.",
                             labels=["version", "python"])
    info.add_metric([__version__, platform.python_version()], 1)
    return info


class WorkerMetrics:
    """A worker's registry: its job counts plus what is read at scrape time.

    Args:
        jobs: The pools' observer.
        sources: The rest, read when scraped.
    """

    def __init__(self, jobs: JobMetrics, sources: WorkerSources) -> None:
        self.jobs = jobs
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_WorkerCollector(jobs, sources))

    def exposition(self) -> tuple[bytes, str]:
        """The registry in the Prometheus text format, with its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
