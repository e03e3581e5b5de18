"""The group-billing runner: increases of cumulative usage gauges become bills.

Configure it on a queue of its own::

    [runner:rbit.usage]
    runner = python!rbitext.usagebilling:UsageBilling
    exporter_url = http://usage-exporter.example.org:9100/metrics
    price.project_vcpu_usage = 1
    price.project_mb_usage = 0.3
    grant.physics = 5000
    warn_at = 0.5
    credit_queue = rbit.credits

Each job brings usage samples (see :mod:`rbitext.usagesamples`):

* a body ``{"exporter_url": URL}`` scrapes that Prometheus endpoint;
* an empty body, or any JSON object without ``exporter_url`` (a schedule's fire),
  scrapes the section's ``exporter_url``;
* a JSON list of ``{"group", "metric", "value", "time"}``, or InfluxDB line protocol,
  is billed as it is.

A body that does not parse goes to the dead letters with the reason; an exporter that
cannot be reached (or answers other than 200) blocks the job, which is tried again
later; an exposition larger than ``max_response_bytes`` or with more than
``max_samples`` priced samples goes to the dead letters.

Billing (:mod:`rbitext.billing`). Only metrics with a price are billed: by default
``project_vcpu_usage`` (1 credit per vCPU-hour) and ``project_mb_usage`` (0.3 per
GiB-hour: ``per.project_mb_usage = 1024`` MB-hours); ``price.<metric> =`` and
``per.<metric> =`` price any other. For each (group, metric):

* the first sample only sets the baseline;
* a higher value is billed: ``(value - baseline) * price / per`` rounded half up to
  ``precision`` (0.01), and becomes the new baseline;
* the same value bills nothing; a sample older than the baseline is skipped;
* a lower value is a counter reset (an exporter restarted, a gauge re-created): it is
  reported (a WARNING log line and a status message) and becomes the new baseline, so
  the usage after the reset is billed from there; nothing is billed negative.

Bills are published as JSON ``{"group", "metric", "from", "to", "increase", "credits",
"time"}`` to the durable topic exchange ``exchange`` (``rbit.bills``) with the group as
routing key, persistent, with publisher confirms and a ``message_id`` derived from
(group, metric, from, to). With ``credit_queue =``, each bill also becomes credit
events for the credit runner: ALLOC and CLAIM of the bill's whole credits (fractions
carried to the group's next bill), slot ``usage:<group>:<metric>:<12 hex of the bill
id>``, machine = the group, event ids derived from the bill id.

Grants. ``grant.<group> = N`` and ``warn_at = 0.5`` (one fraction or a comma list):
when the credits billed to a group since its first bill reach a fraction of its
grant, one WARNING log line and one status message (``Building``, on the job that
crossed it) say so, once per crossing. Group names in ``grant.`` keys are matched
without regard to case (ini keys are case-insensitive).

Never twice (:mod:`rbitext.billstore`). The baselines, group totals and the messages
still to publish are kept in ``state_file`` (SQLite, 0600; default
``<[rbit] state_dir>/usagebilling-<queue>.sqlite3``). A bill is decided in one
transaction with its messages (an outbox); they are published afterwards and deleted
once confirmed, and the outbox is published again when the runner starts. A job is
acked only once its messages were confirmed; if RabbitMQ does not confirm them within
``confirm_timeout`` the job is blocked and tried again (the outbox goes out first, and
the samples, now equal to their baselines, bill nothing). A worker killed between
publishing and forgetting a message publishes it again with the same id: consumers
that need exactly-once drop repeated ids (the credit runner does).

The runner publishes through a connection of its own (a :class:`rbit.amqp.broker.
Broker` with the worker's ``[amqp]`` settings), which declares the exchange and the
credit queue (a classic durable queue, as ``rbit-credit`` declares it).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import queue
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from rbit.config import RunnerSettings, Settings
from rbit.errors import Blocked, ConfigError, DecodeError
from rbit.message import Message
from rbit.outcome import Outcome
from rbitext import usagesamples
from rbitext.billing import DEFAULT_PER, DEFAULT_PRICES, Price
from rbitext.billstore import BillStore, BillStoreError
from rbitext.ledger import Ledger, Report

logger = logging.getLogger(__name__)

SetStatus = Callable[..., None]
Settle = Callable[[Outcome], None]

_NUMBERS: dict[str, tuple[type, Any]] = {
    "scrape_timeout": (float, 10.0),
    "max_response_bytes": (int, 4 << 20),
    "max_samples": (int, 10_000),
    "confirm_timeout": (float, 30.0),
}
_TEXTS = ("exporter_url", "group_label", "state_file", "exchange", "credit_queue",
          "precision", "warn_at")
_PREFIXES = ("price.", "per.", "grant.")


@dataclass(frozen=True)
class BillingSettings:
    """The group-billing runner's section, validated (see the module docstring)."""

    exporter_url: str | None = None
    group_label: str = "project_name"
    precision: Decimal = Decimal("0.01")
    prices: Mapping[str, Price] = field(default_factory=dict)
    grants: Mapping[str, Decimal] = field(default_factory=dict)
    warn_at: tuple[Decimal, ...] = (Decimal("0.5"),)
    state_file: str | None = None
    exchange: str = "rbit.bills"
    credit_queue: str | None = None
    scrape_timeout: float = 10.0
    max_response_bytes: int = 4 << 20
    max_samples: int = 10_000
    confirm_timeout: float = 30.0

    @classmethod
    def from_mapping(cls, settings: Mapping[str, str]) -> BillingSettings:
        """Build from a runner section's keys.

        Raises:
            ConfigError: A value is invalid; it names the key and the reason.
        """
        values = {key: str(value).strip() for key, value in settings.items()}
        _warn_unknown(values)
        kwargs: dict[str, Any] = {
            "prices": _prices(values), "grants": _grants(values),
            "precision": _decimal(values, "precision", "0.01", positive=True),
            "warn_at": _levels(values.get("warn_at", "0.5")),
        }
        if values.get("exporter_url"):
            kwargs["exporter_url"] = _check_url(values["exporter_url"], "exporter_url")
        for key in ("group_label", "state_file", "exchange", "credit_queue"):
            if values.get(key):
                kwargs[key] = values[key]
        for key, (kind, _default) in _NUMBERS.items():
            if key in values:
                kwargs[key] = _positive(values[key], kind, key)
        return cls(**kwargs)


def _warn_unknown(values: Mapping[str, str]) -> None:
    known = set(_NUMBERS) | set(_TEXTS)
    for key in sorted(values):
        if key not in known and not key.startswith(_PREFIXES):
            logger.warning("usage billing: unknown setting %r ignored", key)


def _decimal(values: Mapping[str, str], key: str, default: str, *,
             positive: bool = False) -> Decimal:
    text = values.get(key, default)
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise ConfigError(f"{text!r} is not a number", key=key) from None
    if not number.is_finite() or number < 0 or (positive and number == 0):
        which = "a positive" if positive else "a non-negative"
        raise ConfigError(f"must be {which} number, got {text!r}", key=key)
    return number


def _prices(values: Mapping[str, str]) -> dict[str, Price]:
    amounts = dict(DEFAULT_PRICES)
    pers = dict(DEFAULT_PER)
    for key in values:
        prefix, _, metric = key.partition(".")
        if prefix == "price" and metric:
            amounts[metric] = _decimal(values, key, "0")
        elif prefix == "per" and metric:
            pers[metric] = _decimal(values, key, "1", positive=True)
        elif prefix in ("price", "per"):
            raise ConfigError("names no metric (expected price.<metric>)", key=key)
    for metric in pers:
        if metric not in amounts:
            raise ConfigError(f"metric {metric!r} has no price.{metric}", key=f"per.{metric}")
    return {metric: Price(amount, pers.get(metric, Decimal(1)))
            for metric, amount in amounts.items()}


def _grants(values: Mapping[str, str]) -> dict[str, Decimal]:
    grants = {}
    for key in values:
        if key.startswith("grant."):
            group = key[len("grant."):]
            if not group:
                raise ConfigError("names no group (expected grant.<group>)", key=key)
            grants[group.lower()] = _decimal(values, key, "0")
    return grants


def _levels(text: str) -> tuple[Decimal, ...]:
    levels = []
    for part in (p.strip() for p in text.split(",")):
        try:
            level = Decimal(part)
        except InvalidOperation:
            raise ConfigError(f"{part!r} is not a number", key="warn_at") from None
        if not level.is_finite() or level <= 0:
            raise ConfigError(f"fractions must be positive, got {part!r}", key="warn_at")
        levels.append(level)
    return tuple(sorted(set(levels)))


def _positive(text: str, kind: type, key: str) -> Any:
    try:
        number = kind(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a valid {kind.__name__}", key=key) from None
    if not number > 0 or number == float("inf"):
        raise ConfigError(f"must be a positive number, got {text!r}", key=key)
    return number


def _check_url(url: str, key: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{url!r} is not an http:// or https:// URL", key=key)
    return url


# ---------------------------------------------------------------------------------------
# Samples from a job


class ScrapeError(Exception):
    """The exporter could not be read now (unreachable, timeout, not 200)."""


def scrape(url: str, timeout: float, max_bytes: int) -> str:
    """GET a Prometheus text exposition.

    Raises:
        ScrapeError: Unreachable, timed out, or answered other than 200.
        DecodeError: The answer is larger than ``max_bytes`` or not UTF-8.
    """
    parts = urllib.parse.urlsplit(url)
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection)
    connection = connection_class(parts.hostname, parts.port, timeout=timeout)
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        connection.request("GET", path, headers={"Accept": "text/plain"})
        reply = connection.getresponse()
        body = reply.read(max_bytes + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise ScrapeError(f"cannot scrape {url}: {exc or type(exc).__name__}") from exc
    finally:
        connection.close()
    if reply.status != 200:
        raise ScrapeError(f"scraping {url}: HTTP {reply.status}")
    if len(body) > max_bytes:
        raise DecodeError(f"{url} answered more than max_response_bytes {max_bytes}")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"{url} answered text that is not UTF-8: {exc}") from exc


def samples_of(body: bytes, settings: BillingSettings,
               fetch: Callable[[str], str]) -> tuple[list[usagesamples.Sample], str]:
    """The samples a job body brings, and where they came from (for its status).

    Raises:
        DecodeError: The body is malformed, too large, or asks for no samples.
        ScrapeError: The exporter could not be read now.
    """
    if len(body) > settings.max_response_bytes:
        raise DecodeError(f"body larger than max_response_bytes {settings.max_response_bytes}")
    try:
        text = body.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise DecodeError(f"body is not UTF-8: {exc}") from exc
    metrics = settings.prices.keys()
    if text.startswith("["):
        return usagesamples.parse_json_list(text, metrics, max_samples=settings.max_samples), "body"
    url = _scrape_url(text, settings)
    if url is None:
        samples = usagesamples.parse_line_protocol(
            text, metrics, group_label=settings.group_label, max_samples=settings.max_samples)
        return samples, "body"
    samples = usagesamples.parse_prometheus(
        fetch(url), metrics, group_label=settings.group_label, max_samples=settings.max_samples)
    return samples, url


def _scrape_url(text: str, settings: BillingSettings) -> str | None:
    """The URL to scrape for this body, or None when the body holds line protocol."""
    if text and not text.startswith("{"):
        return None
    doc: Any = {}
    if text:
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise DecodeError(f"body is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise DecodeError("body is not a JSON object")
    url = doc.get("exporter_url")
    if url is None:
        if settings.exporter_url is None:
            raise DecodeError("no samples and no exporter_url (in the body or the section)")
        return settings.exporter_url
    if not isinstance(url, str):
        raise DecodeError("exporter_url must be a string")
    try:
        return _check_url(url, "exporter_url")
    except ConfigError as exc:
        raise DecodeError(f"body: exporter_url {exc.reason}") from None


# ---------------------------------------------------------------------------------------
# Publishing


class _Outbound:
    """The runner's own AMQP connection: publish outbox messages, wait for confirms."""

    def __init__(self, settings: Settings, billing: BillingSettings, queue_name: str) -> None:
        self._amqp = settings.amqp
        self._name = f"rbit {settings.worker.name} usage billing ({queue_name})"
        self._billing = billing
        self._broker: Any = None

    def _ensure(self) -> Any:
        broker = self._broker
        if broker is not None and broker.start_error is None:
            return broker
        if broker is not None:  # a first round of connections failed: a fresh one
            broker.stop(1.0)
        from rbit.amqp.broker import Broker  # pika only where the runner publishes
        from rbit.topology import ExchangeDecl, QueueDecl, Topology

        queues = (QueueDecl(self._billing.credit_queue),) if self._billing.credit_queue else ()
        topology = Topology((ExchangeDecl(self._billing.exchange, "topic"),), queues)
        self._broker = Broker(self._amqp, topology, name=self._name)
        self._broker.start()
        return self._broker

    def send(self, items: list[Any], timeout: float) -> set[int]:
        """Publish ``items``; the seqs of those the broker confirmed within ``timeout``."""
        broker = self._ensure()
        confirmed: set[int] = set()
        answered = [0]
        done = threading.Event()
        lock = threading.Lock()

        def on_confirm(seq: int, ok: bool) -> None:
            with lock:
                answered[0] += 1
                if ok:
                    confirmed.add(seq)
                if answered[0] == len(items):
                    done.set()

        for item in items:
            broker.publish(item.exchange, item.routing_key, item.body,
                           message_id=item.message_id, content_type="application/json",
                           on_confirm=lambda ok, seq=item.seq: on_confirm(seq, ok))
        done.wait(timeout)
        with lock:
            return set(confirmed)

    def close(self) -> None:
        if self._broker is not None:
            self._broker.stop(5.0)


# ---------------------------------------------------------------------------------------
# The runner


@dataclass
class _Job:
    message: Message
    set_status: SetStatus
    settle: Settle


class UsageBilling:
    """Bills increases of cumulative usage gauges per group (a batch runner).

    Jobs are handled one at a time, in order, on the runner's own thread (a scrape is
    network I/O and must not hold up the worker).

    Args:
        settings: The runner section's keys (see :class:`BillingSettings`).
        status_factory: ``status_factory(name)`` reports statuses under ``name``
            (grant warnings found in the outbox at start).
        clock: Wall-clock time source, for the time of samples that carry none.
        fetch: ``fetch(url) -> text``; default :func:`scrape` with the section's bounds.

    Raises:
        ConfigError: An invalid setting.
    """

    def __init__(self, settings: Mapping[str, str], status_factory: Callable[[str], SetStatus],
                 *, clock: Callable[[], float] = time.time,
                 fetch: Callable[[str], str] | None = None) -> None:
        self.settings = BillingSettings.from_mapping(settings)
        self._status_factory = status_factory
        self._clock = clock
        self._fetch = fetch or (lambda url: scrape(
            url, self.settings.scrape_timeout, self.settings.max_response_bytes))
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._ledger: Ledger | None = None
        self._outbound: _Outbound | None = None

    def bind_worker(self, settings: Settings, runner: RunnerSettings) -> None:
        """Open the state file and the publishing connection; start the job thread.

        Called by the worker once, before it starts (see :mod:`rbit.worker`).

        Raises:
            ConfigError: The state file cannot be opened (key ``state_file``).
        """
        path = self.settings.state_file or os.path.join(
            settings.state.state_dir, f"usagebilling-{runner.queue}.sqlite3")
        try:
            store = BillStore(path)
        except BillStoreError as exc:
            raise ConfigError(str(exc), key="state_file") from exc
        self._ledger = Ledger(store, self.settings, clock=self._clock)
        self._outbound = _Outbound(settings, self.settings, runner.queue)
        self._thread = threading.Thread(target=self._run, name=f"rbit-billing-{runner.queue}",
                                         daemon=True)
        self._thread.start()

    def submit(self, message: Message, set_status: SetStatus, settle: Settle) -> None:
        """Queue one job; it is settled once its bills were confirmed."""
        self._jobs.put(_Job(message, set_status, settle))

    def close(self, timeout: float) -> None:
        """Finish the job at hand; jobs not started are left unsettled (redelivered)."""
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("usage billing: still busy after %.1f s; leaving it", timeout)
                return
        if self._outbound is not None:
            self._outbound.close()
        if self._ledger is not None:
            self._ledger.store.close()

    # -- the job thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._flush(self._status_factory("usage-billing-start"))
        except Blocked as exc:
            logger.warning("usage billing: %s", exc.reason)
        except BillStoreError as exc:
            logger.error("usage billing: %s", exc)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            outcome = self._outcome(job)
            try:
                job.settle(outcome)
            except Exception:
                logger.exception("usage billing: settling job %s failed", job.message.job_id)

    def _outcome(self, job: _Job) -> Outcome:
        try:
            return self._handle(job)
        except DecodeError as exc:
            return Outcome.rejected(str(exc))
        except ScrapeError as exc:
            return Outcome.blocked(str(exc))
        except Blocked as exc:
            return Outcome.blocked(exc.reason, exc.delay)
        except BillStoreError as exc:
            logger.error("usage billing: job %s: %s", job.message.job_id, exc)
            return Outcome.blocked(str(exc))
        except Exception as exc:  # a bug must fail the job, not end the thread
            logger.exception("usage billing: job %s failed", job.message.job_id)
            return Outcome.failed(f"{type(exc).__name__}: {exc}")

    def _handle(self, job: _Job) -> Outcome:
        ledger, _outbound = self._bound()
        self._flush(job.set_status)  # what an earlier job or run left, first
        samples, source = samples_of(job.message.body, self.settings, self._fetch)
        report = ledger.bill(samples)
        for reset in report.resets:
            logger.warning("usage billing: job %s: %s", job.message.job_id, reset)
            job.set_status("Building", reset)
        self._flush(job.set_status)
        return Outcome.done(_summary(report, source))

    def _bound(self) -> tuple[Ledger, _Outbound]:
        if self._ledger is None or self._outbound is None:
            raise RuntimeError("the worker did not call bind_worker()")
        return self._ledger, self._outbound

    def _flush(self, set_status: SetStatus) -> None:
        """Publish the outbox; raise Blocked if the broker did not confirm all of it."""
        ledger, outbound = self._bound()
        store = ledger.store
        items = store.outbox()
        if not items:
            return
        warnings = [item for item in items if item.kind == "warning"]
        for item in warnings:
            text = item.body.decode("utf-8", "replace")
            logger.warning("usage billing: %s", text)
            _report(set_status, "Building", text)
        store.sent(item.seq for item in warnings)
        messages = [item for item in items if item.kind != "warning"]
        if not messages:
            return
        confirmed = outbound.send(messages, self.settings.confirm_timeout)
        store.sent(confirmed)
        missing = len(messages) - len(confirmed)
        if missing:
            raise Blocked(f"{missing} billing messages not confirmed by RabbitMQ yet; "
                          "they are kept and sent again")


def _summary(report: Report, source: str) -> str:
    text = (f"{report.samples} samples from {source}: {len(report.bills)} bills, "
            f"{report.baselines} new baselines, {report.unchanged} unchanged")
    if report.stale:
        text += f", {report.stale} older than their baseline"
    if report.resets:
        text += f", {len(report.resets)} counter resets"
    if report.bills:
        text += "; " + "; ".join(
            f"{b.group} {b.metric} +{b.increase}: {b.credits} credits" for b in report.bills[:20])
    return text


def _report(set_status: SetStatus, status: str, message: str) -> None:
    try:
        set_status(status, message)
    except Exception:  # a broken status sink must not stop billing
        logger.exception("usage billing: reporting a status failed")
