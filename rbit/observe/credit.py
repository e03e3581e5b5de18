"""``rbit-credit``'s Prometheus metrics and health, read from its server at scrape time.

=====================================  =======  ======================================
name                                   type     labels
=====================================  =======  ======================================
rbit_credit_lines_total                counter  command (alloc, claim, counters, meta,
                                                discard, invalid), result (ok, error,
                                                malformed)
rbit_credit_reply_latency_seconds      histo.   (from a line read to its reply)
rbit_credit_confirms_outstanding       gauge    (lines published, not yet answered)
rbit_credit_broker_connected           gauge
rbit_credit_build_info                 gauge    version, python
=====================================  =======  ======================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from rbit.credit.stats import LATENCY_BUCKETS, LineStats
from rbit.observe.metrics import build_info


class _CreditCollector:
    def __init__(self, stats: LineStats, connected: Callable[[], bool]) -> None:
        self._stats, self._connected = stats, connected

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        lines = CounterMetricFamily("rbit_credit_lines", "Protocol lines answered.",
                                    labels=["command", "result"])
        for (command, result), count in list(stats.lines.items()):
            lines.add_metric([command, result], count)
        yield lines
        cumulative, buckets = 0, []
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), list(stats.buckets), strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        latency = HistogramMetricFamily("rbit_credit_reply_latency_seconds",
                                        "From a published line read to its reply.")
        latency.add_metric([], buckets, stats.seconds)
        yield latency
        outstanding = GaugeMetricFamily("rbit_credit_confirms_outstanding",
                                        "Lines published whose confirm has not come.")
        outstanding.add_metric([], stats.outstanding)
        yield outstanding
        connected = GaugeMetricFamily("rbit_credit_broker_connected",
                                      "1 while connected to RabbitMQ.")
        connected.add_metric([], 1 if self._connected() else 0)
        yield connected
        yield build_info("rbit_credit")


class CreditMetrics:
    """The front door's registry.

    Args:
        stats: The server's counts.
        connected: Whether the broker connection is up.
    """

    def __init__(self, stats: LineStats, connected: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_CreditCollector(stats, connected))

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
