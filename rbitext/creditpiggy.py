"""The credit runner: credit events to a CreditPiggy server, batched, throttled, signed.

Configure it on the credit queue's runner section::

    [runner:rbit.credits]
    runner = python!rbitext.creditpiggy:CreditRunner
    api_url = https://creditpiggy.example.org/api/json
    api_key = d6db27eb65704bb6acb3b83ceaf95e40
    api_secret = ${CREDITPIGGY_SECRET}
    batch_size = 100
    flush_interval = 5
    max_requests_per_second = 2

The broker hands the worker only ``prefetch`` unacked events, and events are acked
only after their batch was sent, so a prefetch below ``batch_size`` would cap every
batch at ``prefetch`` events. rbit therefore gives a batching runner's section a
default prefetch of ``batch_size``, and warns about a ``prefetch`` set below it.

Each delivered event (see :mod:`rbit.credit.events`) joins the pending batch. A batch is
sent as one ``POST {api_url}/batch/bulk`` when it holds ``batch_size`` events or when
its oldest event has waited ``flush_interval`` seconds, and never faster than
``max_requests_per_second``. The body is signed the way the CreditPiggy server checks
it: ``Authorization: sha-256,<api_key>,<hex sha256(body + api_secret)>``.

Delivery guarantee. An event is settled (and so acked) only after the server accepted
its batch, and the ids of the accepted events are written durably to a seen-ids store
(:mod:`rbitext.seen`) *before* they are settled, so a redelivered event is recognised
and not sent again. One window remains where a duplicate is possible: the server
accepted the batch, but the worker died before the ids reached the seen-ids store.
RabbitMQ then redelivers those events and they are sent a second time. The window is
the few milliseconds between the server's reply and the store's commit.

Outages and faults. Network errors, timeouts, 5xx, 408/429 and a 200 without
``"result": "ok"`` keep the batch and retry it with capped exponential backoff and
jitter. 400, 401, 403 and other 4xx replies are configuration faults (wrong URL, key or
secret): the events stay unsettled, the batch is reported Failed, an error is logged
naming the URL and key (never the secret), and the batch is retried after a long
backoff, so a fixed configuration on the server side heals without a restart.

Per-item errors. The server applies alloc, counters, meta, discard, claim in that order
and answers ``{"result": "ok", "errors": [{"message": ..., "code": ...}, ...]}`` for
items that failed. The errors carry no item index, only a message, so each is matched
to an item by what the server's messages name: the command (``Claiming ...``,
``Discarding ...``, ``Updating counters ...``, ``... already exists``, ``Missing
'machine' ...``) and the slot (``slot: '<slot>' for project``). An error matches when
every unmatched item fitting it is for the same command and slot; it then goes to the
*last* such item, because within one bulk the first claim or alloc of a slot is the one
that succeeds and the later ones fail. Matched items are rejected (dead letters, with
the server's message and code). An error that fits no item, or items of different
slots, cannot be pinned down: it is reported on the batch status and logged, and the
batch's events are settled done, because sending them again would count the items that
did succeed twice.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import random
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rbit import backoff
from rbit.credit.events import COMMANDS, CreditEvent
from rbit.errors import ConfigError, DecodeError
from rbit.message import Message
from rbit.outcome import Outcome
from rbitext import seen as seen_store

logger = logging.getLogger(__name__)

SetStatus = Callable[[str, str], None]
Settle = Callable[[Outcome], None]
#: ``http(url, body, headers, timeout) -> (status, reply body)``; raises ``OSError``.
HttpPost = Callable[[str, bytes, Mapping[str, str], float], "tuple[int, bytes]"]

_ALIASES = {"project_id": "api_key", "project_auth": "api_secret"}
_MAX_REPLY = 1 << 20  # a bulk reply is small; never buffer an endless one
_FIRST_RETRY = 1.0  # seconds before the first retry after a transient failure
_FIRST_FAULT_RETRY = 30.0  # seconds before the first retry after a configuration fault


@dataclass(frozen=True)
class CreditSettings:
    """The credit runner's section, validated.

    Attributes:
        api_url: Base URL of the CreditPiggy API; batches go to ``{api_url}/batch/bulk``.
        api_key: The project key (``project_id`` in a CreditPiggy daemon config).
        api_secret: The project secret (``project_auth``); never logged.
        batch_size: Most events in one request.
        flush_interval: Seconds the oldest pending event may wait before a flush.
        max_requests_per_second: Request rate limit (retries included).
        seen_ids_file: SQLite file of accepted event ids.
        seen_ids_keep_days: Accepted ids older than this are forgotten at start.
        http_timeout: Seconds for one request (connect and reply).
        retry_max_delay: Cap of the backoff after transient failures.
        fault_retry_delay: Cap of the (long) backoff after a configuration fault.
    """

    api_url: str
    api_key: str
    api_secret: str = field(repr=False)
    batch_size: int = 100
    flush_interval: float = 5.0
    max_requests_per_second: float = 2.0
    seen_ids_file: str = field(default_factory=seen_store.default_path)
    seen_ids_keep_days: float = 30.0
    http_timeout: float = 30.0
    retry_max_delay: float = 60.0
    fault_retry_delay: float = 600.0

    @property
    def bulk_url(self) -> str:
        return self.api_url.rstrip("/") + "/batch/bulk"

    @classmethod
    def from_mapping(cls, settings: Mapping[str, str]) -> CreditSettings:
        """Build from a runner section's keys.

        Raises:
            ConfigError: A required key is missing or a value is invalid; it names the key.
        """
        values = _canonical_keys(settings)
        for key in ("api_url", "api_key", "api_secret"):
            if not str(values.get(key, "")).strip():
                raise ConfigError("missing; the credit runner needs it", key=key)
        _check_url(values["api_url"])
        kwargs: dict[str, Any] = {k: str(values[k]).strip() for k in ("api_url", "api_key")}
        kwargs["api_secret"] = str(values["api_secret"])
        kwargs.update(_numbers(values))
        if values.get("seen_ids_file"):
            kwargs["seen_ids_file"] = str(values["seen_ids_file"])
        return cls(**kwargs)


_NUMBERS: dict[str, type] = {
    "batch_size": int,
    "flush_interval": float,
    "max_requests_per_second": float,
    "seen_ids_keep_days": float,
    "http_timeout": float,
    "retry_max_delay": float,
    "fault_retry_delay": float,
}


def _canonical_keys(settings: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in settings.items():
        name = _ALIASES.get(key, key)
        if name in values and value != values[name]:
            raise ConfigError(
                f"given twice (as {key!r} and its alias) with different values", key=name
            )
        values[name] = value
    known = set(_NUMBERS) | {"api_url", "api_key", "api_secret", "seen_ids_file"}
    for key in sorted(set(values) - known):
        logger.warning("credit runner: unknown setting %r ignored", key)
    return values


def _numbers(values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, kind in _NUMBERS.items():
        if key not in values:
            continue
        try:
            number = kind(str(values[key]).strip())
        except ValueError:
            raise ConfigError(f"{values[key]!r} is not a valid {kind.__name__}", key=key) from None
        if not number > 0 or number != number or number == float("inf"):
            raise ConfigError(f"must be a positive number, got {values[key]!r}", key=key)
        out[key] = number
    return out


def _check_url(url: str) -> None:
    parts = urllib.parse.urlsplit(str(url).strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{url!r} is not an http:// or https:// URL", key="api_url")


# ---------------------------------------------------------------------------------------
# HTTP


def sign(body: bytes, api_key: str, api_secret: str) -> str:
    """The ``Authorization`` header value the CreditPiggy server expects for ``body``."""
    digest = hashlib.sha256(body + api_secret.encode("utf-8")).hexdigest()
    return f"sha-256,{api_key},{digest}"


def http_post(
    url: str, body: bytes, headers: Mapping[str, str], timeout: float
) -> tuple[int, bytes]:
    """POST ``body`` to ``url`` on a fresh connection; ``(status, reply body)``.

    Raises:
        OSError: Connecting, sending or reading failed or timed out.
        http.client.HTTPException: The reply was not valid HTTP.
    """
    parts = urllib.parse.urlsplit(url)
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(parts.hostname, parts.port, timeout=timeout)
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request("POST", path or "/", body=body, headers=dict(headers))
        reply = connection.getresponse()
        return reply.status, reply.read(_MAX_REPLY)
    finally:
        connection.close()


@dataclass(frozen=True)
class _Verdict:
    """What one request's reply means."""

    kind: str  # "accepted", "transient" or "fault"
    reason: str = ""
    errors: tuple[Any, ...] = ()


def _judge(status: int, payload: bytes) -> _Verdict:
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        doc = None
    text = payload[:300].decode("utf-8", "replace").strip()
    message = doc.get("message") if isinstance(doc, dict) else None
    if status == 200:
        if isinstance(doc, dict) and doc.get("result") == "ok":
            errors = doc.get("errors") or []
            return _Verdict(
                "accepted", errors=tuple(errors if isinstance(errors, list) else [errors])
            )
        return _Verdict("transient", f"HTTP 200 without result ok: {text!r}")
    detail = f"HTTP {status}: {message or text or 'no message'}"
    if 400 <= status < 500 and status not in (408, 429):
        return _Verdict("fault", detail)
    return _Verdict("transient", detail)


# ---------------------------------------------------------------------------------------
# Batches


@dataclass(eq=False)
class _Entry:
    """One pending event and everyone waiting for its outcome (redeliveries included)."""

    event: CreditEvent
    settles: list[Settle]
    since: float


@dataclass(eq=False)
class _Batch:
    batch_id: str
    entries: list[_Entry]
    set_status: SetStatus

    def body(self) -> bytes:
        doc: dict[str, list[Any]] = {command: [] for command in COMMANDS}
        for entry in self.entries:
            doc[entry.event.command].append(dict(entry.event.args))
        return json.dumps(doc, separators=(",", ":")).encode("utf-8")

    def summary(self) -> str:
        counts = {c: sum(e.event.command == c for e in self.entries) for c in COMMANDS}
        return ", ".join(f"{c} {n}" for c, n in counts.items() if n)


_SLOT_NAMED = re.compile(r"slot: '(.*)' for project: ")
_COMMAND_HINTS = (
    ("claiming", "claim"),
    ("'machine'", "claim"),
    ("discarding", "discard"),
    ("counters", "counters"),
    ("already exists", "alloc"),
)


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return f"{error.get('message', '')} (code {error.get('code', '?')})"
    return str(error)


def _fits(error: Any) -> tuple[str | None, str | None]:
    """The command and slot a server error message names (``None`` when it names none)."""
    message = str(error.get("message", "")) if isinstance(error, dict) else str(error)
    lowered = message.lower()
    command = next((cmd for hint, cmd in _COMMAND_HINTS if hint in lowered), None)
    named = _SLOT_NAMED.search(message)
    return command, named.group(1) if named else None


def map_errors(entries: list[_Entry], errors: tuple[Any, ...]) -> tuple[dict[int, str], list[str]]:
    """Pin the server's per-item errors on items (see the module docstring).

    Returns:
        The rejection reason per matched entry index, and the texts of unmatched errors.
    """
    rejected: dict[int, str] = {}
    unmatched: list[str] = []
    for error in errors:
        command, slot = _fits(error)
        candidates = [
            i
            for i, entry in enumerate(entries)
            if i not in rejected
            and (command is None or entry.event.command == command)
            and (slot is None or entry.event.args.get("slot") == slot)
        ]
        targets = {
            (entries[i].event.command, entries[i].event.args.get("slot")) for i in candidates
        }
        if len(targets) != 1:
            unmatched.append(_error_text(error))
            continue
        target = candidates[-1]
        rejected[target] = (
            f"credit server rejected {entries[target].event.command}: {_error_text(error)}"
        )
    return rejected, unmatched


class _Throttle:
    """At most ``rate`` request starts per second (minimum spacing)."""

    def __init__(self, rate: float, clock: Callable[[], float]) -> None:
        self._spacing = 1.0 / rate
        self._clock = clock
        self._last: float | None = None

    def wait_time(self) -> float:
        if self._last is None:
            return 0.0
        return max(0.0, self._last + self._spacing - self._clock())

    def note(self) -> None:
        self._last = self._clock()


# ---------------------------------------------------------------------------------------
# The runner


class CreditRunner:
    """Batches credit events and sends them to a CreditPiggy server.

    A batching runner: the worker calls :meth:`submit` for every delivery and the
    runner settles each one later, from its flush thread.

    Args:
        settings: The runner section's keys (see :class:`CreditSettings`).
        status_factory: ``status_factory(batch_id)`` returns the ``set_status(status,
            message)`` under which a batch's progress is reported.
        clock: Monotonic time source for deadlines, throttle and backoff.
        sleep: Called with seconds to wait between retries; by default the wait is on
            the runner's condition, so :meth:`close` cuts it short.
        http: ``http(url, body, headers, timeout) -> (status, body)``; default
            :func:`http_post`.

    Raises:
        ConfigError: Missing or invalid settings, or an unusable seen-ids file.
    """

    def __init__(
        self,
        settings: Mapping[str, str],
        status_factory: Callable[[str], SetStatus],
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
        http: HttpPost | None = None,
    ) -> None:
        self.settings = CreditSettings.from_mapping(settings)
        try:
            self._seen = seen_store.SeenIds(
                self.settings.seen_ids_file, keep_days=self.settings.seen_ids_keep_days
            )
        except seen_store.SeenStoreError as exc:
            raise ConfigError(str(exc), key="seen_ids_file") from exc
        self._status_factory = status_factory
        self._clock = clock
        self._sleep = sleep
        self._http = http or http_post
        self._random = random.Random()  # noqa: S311 (jitter, not cryptography)
        self._cond = threading.Condition()
        self._pending: list[_Entry] = []
        self._by_id: dict[str, _Entry] = {}  # pending and in flight
        self._closing = False
        self._deadline = 0.0
        self._batches = 0
        self._throttle = _Throttle(self.settings.max_requests_per_second, clock)
        self._thread = threading.Thread(target=self._run, name="rbit-credit-flush", daemon=True)
        self._thread.start()

    # -- called by the worker ----------------------------------------------------------

    @property
    def batch_size(self) -> int:
        """Most events in one request: the worker takes at least this many ahead."""
        return self.settings.batch_size

    def submit(self, message: Message, set_status: SetStatus, settle: Settle) -> None:
        """Queue one delivered event; ``settle`` is called once it is decided.

        Never does network I/O. A body that is not a credit event is rejected at once;
        an event already accepted earlier is settled done without being sent again.
        """
        try:
            event = CreditEvent.from_json(message.body)
        except DecodeError as exc:
            _call(settle, Outcome.rejected(str(exc)))
            return
        outcome = self._enqueue(event, settle)
        if outcome is not None:
            _call(settle, outcome)

    def wake(self) -> None:
        """Make the flush thread look at the clock again (after a test moved it)."""
        with self._cond:
            self._cond.notify_all()

    def close(self, timeout: float) -> None:
        """Stop: send what is pending (one try per batch) within ``timeout`` seconds.

        Events not accepted by then stay unsettled; the worker requeues them.
        """
        with self._cond:
            self._closing = True
            self._deadline = self._clock() + timeout
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning(
                "credit runner: flush thread still busy after %.1f s; leaving it", timeout
            )
            return
        unsent = len(self._by_id)
        if unsent:
            logger.info(
                "credit runner: %d credit events left unsent at shutdown; they will be redelivered",
                unsent,
            )
        self._seen.close()

    # -- queueing ----------------------------------------------------------------------

    def _enqueue(self, event: CreditEvent, settle: Settle) -> Outcome | None:
        with self._cond:
            if self._closing:
                return None  # unsettled: the worker requeues it
            entry = self._by_id.get(event.id)
            if entry is not None:
                # A redelivery of an event still pending or in flight: share its fate.
                entry.settles.append(settle)
                return None
            try:
                if event.id in self._seen:
                    return Outcome.done("already accepted")
            except seen_store.SeenStoreError as exc:
                logger.error("credit runner: %s", exc)
                return Outcome.blocked(f"seen-ids store unreadable: {exc}")
            entry = _Entry(event, [settle], self._clock())
            self._by_id[event.id] = entry
            self._pending.append(entry)
            if len(self._pending) in (1, self.settings.batch_size):
                self._cond.notify_all()
        return None

    # -- the flush thread --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not self._deliver(batch):
                return

    def _next_batch(self) -> _Batch | None:
        """Wait until a batch is due and the throttle allows a request; take it."""
        with self._cond:
            while True:
                if self._closing and (not self._pending or self._clock() >= self._deadline):
                    return None
                wait = self._due_in()
                if wait is not None and wait <= 0:
                    wait = self._throttle.wait_time()
                    if wait <= 0:
                        return self._take()
                    if self._closing and self._clock() + wait > self._deadline:
                        return None
                self._cond.wait(wait)

    def _due_in(self) -> float | None:
        """Seconds until the pending batch is due; ``None`` when nothing is pending."""
        if not self._pending:
            return None
        if self._closing or len(self._pending) >= self.settings.batch_size:
            return 0.0
        return self._pending[0].since + self.settings.flush_interval - self._clock()

    def _take(self) -> _Batch:
        entries = self._pending[: self.settings.batch_size]
        del self._pending[: self.settings.batch_size]
        self._batches += 1
        batch_id = f"credit-batch-{self._batches}"
        return _Batch(batch_id, entries, self._batch_status(batch_id))

    def _batch_status(self, batch_id: str) -> SetStatus:
        try:
            return self._status_factory(batch_id)
        except Exception:  # a broken status sink must not stop credits
            logger.exception("credit runner: status factory failed for %s", batch_id)
            return lambda status, message="": None

    def _deliver(self, batch: _Batch) -> bool:
        """Send ``batch`` until accepted; ``False`` when closing cut it short."""
        failures = faults = 0
        while True:
            _report(batch, "Building", f"sending {len(batch.entries)} events ({batch.summary()})")
            verdict = self._attempt(batch)
            if verdict.kind == "accepted":
                self._accept(batch, verdict.errors)
                return True
            if self._closing:
                _report(batch, "Failed", f"not sent before shutdown ({verdict.reason})")
                return False
            if verdict.kind == "fault":
                faults += 1
                delay = self._fault(batch, verdict.reason, faults)
            else:
                failures += 1
                delay = self._transient(batch, verdict.reason, failures)
            if not self._pause(delay):
                return False

    def _attempt(self, batch: _Batch) -> _Verdict:
        body = batch.body()
        headers = {
            "Content-Type": "application/json",
            "Authorization": sign(body, self.settings.api_key, self.settings.api_secret),
        }
        timeout = self.settings.http_timeout
        if self._closing:
            timeout = max(0.1, min(timeout, self._deadline - self._clock()))
        self._throttle.note()
        try:
            status, payload = self._http(self.settings.bulk_url, body, headers, timeout)
        except (OSError, http.client.HTTPException) as exc:
            return _Verdict(
                "transient", f"cannot reach {self.settings.bulk_url}: {exc or type(exc).__name__}"
            )
        except Exception as exc:  # keep the batch whatever the transport does
            logger.exception("credit runner: unexpected error sending %s", batch.batch_id)
            return _Verdict("transient", f"unexpected error: {exc!r}")
        return _judge(status, payload)

    def _transient(self, batch: _Batch, reason: str, failures: int) -> float:
        delay = self._backoff(_FIRST_RETRY, self.settings.retry_max_delay, failures)
        logger.warning(
            "credit runner: %s failed, retrying in %.0f s: %s", batch.batch_id, delay, reason
        )
        _report(batch, "Building", f"retrying in {delay:.0f} s ({reason})")
        return delay

    def _fault(self, batch: _Batch, reason: str, faults: int) -> float:
        delay = self._backoff(_FIRST_FAULT_RETRY, self.settings.fault_retry_delay, faults)
        logger.error(
            "credit runner: the credit server at %s REFUSED the requests of api_key %s (%s). "
            "Check api_url, api_key and api_secret. %d credit events are kept unacked; "
            "next try in %.0f s.",
            self.settings.bulk_url,
            self.settings.api_key,
            reason,
            len(self._by_id),
            delay,
        )
        _report(batch, "Failed", f"{reason}; next try in {delay:.0f} s")
        return delay

    def _backoff(self, first: float, cap: float, n: int) -> float:
        # Jitter spreads the retries of many workers after a shared outage.
        delay = backoff.delay(n, first, cap, spread=(0.75, 1.0), rng=self._random.random)
        return max(self._throttle.wait_time(), delay)

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds`` between tries; ``False`` if closing began meanwhile."""
        if self._sleep is not None:
            self._sleep(seconds)
        else:
            end = self._clock() + seconds
            with self._cond:
                while not self._closing and self._clock() < end:
                    self._cond.wait(end - self._clock())
        return not self._closing

    # -- settling ----------------------------------------------------------------------

    def _accept(self, batch: _Batch, errors: tuple[Any, ...]) -> None:
        rejected, unmatched = map_errors(batch.entries, errors)
        accepted = [e for i, e in enumerate(batch.entries) if i not in rejected]
        self._remember(batch, accepted)
        outcomes = [
            Outcome.rejected(rejected[i]) if i in rejected else None
            for i in range(len(batch.entries))
        ]
        done = Outcome.done(f"accepted by the credit server in {batch.batch_id}")
        with self._cond:
            for entry in batch.entries:
                self._by_id.pop(entry.event.id, None)
            settles = [list(entry.settles) for entry in batch.entries]
        self._report_accepted(batch, rejected, unmatched)
        for entry_settles, outcome in zip(settles, outcomes, strict=True):
            for settle in entry_settles:
                _call(settle, outcome or done)

    def _remember(self, batch: _Batch, accepted: list[_Entry]) -> None:
        # Recorded before any settle: a crash after this point cannot double count.
        try:
            self._seen.add_many(entry.event.id for entry in accepted)
        except seen_store.SeenStoreError as exc:
            # Settling anyway is the lesser evil: the events were accepted, and holding
            # them back would get them redelivered and counted again.
            logger.error("credit runner: %s; %s accepted but not remembered", exc, batch.batch_id)

    def _report_accepted(
        self, batch: _Batch, rejected: dict[int, str], unmatched: list[str]
    ) -> None:
        for i, reason in sorted(rejected.items()):
            logger.warning(
                "credit runner: %s event %s: %s", batch.batch_id, batch.entries[i].event.id, reason
            )
        for text in unmatched:
            logger.warning(
                "credit runner: %s: server error not tied to one event: %s", batch.batch_id, text
            )
        message = f"accepted {len(batch.entries) - len(rejected)} events"
        if rejected:
            message += f"; {len(rejected)} rejected: " + "; ".join(
                rejected[i] for i in sorted(rejected)
            )
        if unmatched:
            message += "; server errors: " + "; ".join(unmatched)
        _report(batch, "Done", message)


def _report(batch: _Batch, status: str, message: str) -> None:
    try:
        batch.set_status(status, message)
    except Exception:  # a broken status sink must not stop credits
        logger.exception("credit runner: reporting %s of %s failed", status, batch.batch_id)


def _call(settle: Settle, outcome: Outcome) -> None:
    try:
        settle(outcome)
    except Exception:
        logger.exception("credit runner: settling an event failed")
