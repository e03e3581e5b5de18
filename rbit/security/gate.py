"""The worker's side of signed jobs: every delivery checked before its runner sees it.

The check runs on the broker's I/O thread, in the delivery callback, before the pool
takes the delivery: an Ed25519 verification costs about 50-100 microseconds and the
replay window's SQLite insert (WAL, no fsync) tens more, less than the frame decoding
the same delivery already cost, and doing it there means a refused job never reaches a
queue of work, a thread or a child. A refused job goes straight to its queue's dead
letters with the reason (like :meth:`rbit.outcome.Outcome.rejected`) and is logged once
at WARNING with its key id and message id.

Retries: the worker that republishes a signed job to a delay queue counter-signs the
copy with its own ``signing_key`` (:meth:`WorkerSecurity.seal`); so does the worker
that parks a copy in its holding queue to renew a long job's lease
(:meth:`WorkerSecurity.seal_hold`), since that copy comes back to the work queue if the
worker dies. See :mod:`rbit.security.signing`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from rbit import fate
from rbit.amqp.records import HELD_BY_HEADER, HOLD_ID_HEADER, Delivery, Publish
from rbit.config import RunnerSettings, Settings
from rbit.errors import ConfigError, SignatureError
from rbit.message import ATTEMPTS_HEADER
from rbit.outcome import Status
from rbit.safetext import escape
from rbit.security import keys as keyfiles
from rbit.security.replay import ReplayWindow
from rbit.security.signing import COUNTER_HEADERS, SIG_HEADER, Signer, verify

if TYPE_CHECKING:
    from rbit.amqp.broker import Broker

log = logging.getLogger(__name__)

_HOLD_HEADERS = frozenset({HELD_BY_HEADER, HOLD_ID_HEADER,
                           *(name for name in COUNTER_HEADERS if "-hold-" in name)})


class WorkerSecurity:
    """Trusted keys, replay window and the worker's own key, for the signed runners.

    Args:
        settings: The worker's settings; at least one runner requires signatures.
        clock: Wall clock in seconds (injected by tests).

    Raises:
        ConfigError: No usable trusted key, no signing key while signed jobs may be
            retried, or the replay file cannot be opened; naming file, section, key.
    """

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        security = settings.security
        self._clock = clock
        self.max_skew = security.max_skew
        self.keys = keyfiles.trusted_keys(security.trusted_keys, file=settings.file)
        self.signer: Signer | None = None
        if security.signing_key:
            self.signer = Signer(keyfiles.signing_key(security.signing_key,
                                                      file=settings.file), clock)
        elif any(settings.require_signed(r) and r.retry.max_retries for r in settings.runners):
            raise ConfigError("signed jobs may be retried, and a retry must be counter-signed "
                              "by this worker: set signing_key (its .pub among the trusted "
                              "keys), or max_retries = 0", file=settings.file,
                              section="security", key="signing_key")
        else:
            log.warning("[security] signing_key is not set: a long signed job whose worker "
                        "dies while it holds the job's lease comes back without a "
                        "counter-signature and is refused (stale or replay)")
        try:
            self.window = ReplayWindow(security.replay_file)
        except (OSError, Exception) as exc:  # sqlite3.Error too
            raise ConfigError(f"cannot open {security.replay_file}: {exc}", file=settings.file,
                              section="security", key="replay_file") from exc
        self.exchange = settings.worker.exchange
        self.worker_name = settings.worker.name

    def gate(self, runner: RunnerSettings, broker: Broker,
             on_delivery: Callable[[Delivery], None],
             report: Callable[[str, str, Status, str], None]) -> Callable[[Delivery], None]:
        """``on_delivery`` behind the signature check for ``runner``'s queue.

        ``report(job_id, queue, status, message)`` is told of each refused job (Failed).
        """
        targets = {(self.exchange, runner.routing_key), ("", runner.queue)}
        queue = runner.queue

        def checked(delivery: Delivery) -> None:
            try:
                self.check(delivery, targets, queue)
            except SignatureError as exc:
                reason = self._refuse(delivery, exc, broker)
                report(delivery.message.job_id, queue, Status.FAILED, reason)
                return
            on_delivery(delivery)

        return checked

    def check(self, delivery: Delivery, targets: set[tuple[str, str]], queue: str) -> None:
        """Verify a delivery and record it in the replay window.

        Raises:
            SignatureError: Why it must not run.
        """
        message = delivery.message
        # Message.redelivered also counts a held copy's header, which a publisher could
        # set; only the broker's own flag (without that header) proves a redelivery.
        redelivered = message.redelivered and HELD_BY_HEADER not in message.headers
        now = self._clock()
        verified = verify(self.keys, body=message.body, headers=message.headers,
                          message_id=message.message_id, content_type=message.content_type,
                          targets=targets, queue=queue, now=now, max_skew=self.max_skew,
                          redelivered=redelivered)
        if not self.window.first_time(verified.replay_key, verified.expires, now) \
                and not redelivered:
            error = SignatureError("a replay: this signed job was already taken")
            error.key_id = verified.key_id  # type: ignore[attr-defined]
            raise error

    def _refuse(self, delivery: Delivery, exc: SignatureError, broker: Broker) -> str:
        message = delivery.message
        key_id = getattr(exc, "key_id", None)
        reason = f"signature refused: {exc}"
        log.warning("job %s: %s (key %s, message id %s); sent to the dead letters",
                    message.job_id, reason, escape(key_id or "-", 100),
                    escape(message.message_id or "-", 200))
        settlement = fate.refuse(delivery, message.queue, reason, worker=self.worker_name)
        broker.publisher.publish_then_ack(delivery, settlement.publish, None)  # I/O thread
        return reason

    def seal(self, delivery: Delivery, publish: Publish) -> Publish:
        """Counter-sign a retry copy of a signed job; other copies pass unchanged."""
        headers = publish.headers or {}
        if publish.expiration_ms is None or self.signer is None or SIG_HEADER not in headers:
            return publish
        attempts = headers.get(ATTEMPTS_HEADER)
        if attempts.__class__ is not int:
            return publish
        until = int(self._clock() + publish.expiration_ms / 1000 + self.max_skew)
        # A retry of a held copy: the hold's counter-signature was for that copy only.
        kept = {name: value for name, value in headers.items() if name not in _HOLD_HEADERS}
        extra = self.signer.countersign(kept, delivery.message.queue, attempts, until)
        return dataclasses.replace(publish, headers={**kept, **extra})

    def seal_hold(self, delivery: Delivery, publish: Publish, valid_for: float) -> Publish:
        """Counter-sign the held copy of a signed job (a lease renewal).

        Args:
            delivery: The job being held.
            publish: Its copy for the holding queue (with its hold id).
            valid_for: How long (seconds) the copy may take to come back to the work
                queue should this worker die.
        """
        headers = publish.headers or {}
        if self.signer is None or SIG_HEADER not in headers or HOLD_ID_HEADER not in headers:
            return publish
        until = int(self._clock() + valid_for + self.max_skew)
        extra = self.signer.countersign_copy("hold", headers, delivery.message.queue,
                                             str(headers[HOLD_ID_HEADER]), until)
        return dataclasses.replace(publish, headers={**headers, **extra})

    def close(self) -> None:
        self.window.close()


