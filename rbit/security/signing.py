"""What a job's signature covers, and how it travels.

A publisher with a signing key signs each job; the signature and what the worker needs
to check it travel in the message's headers:

* ``x-rbit-sig-key`` -- the key id (:func:`rbit.security.keys.fingerprint`);
* ``x-rbit-sig-time`` -- when it was signed (integer seconds since the epoch, UTC);
* ``x-rbit-sig-exchange``, ``x-rbit-sig-route`` -- the target it was published to;
* ``x-rbit-sig`` -- the Ed25519 signature, base64.

The signed bytes are the UTF-8 JSON array (no spaces, ``ensure_ascii``)::

    ["rbit-job-v1", exchange, routing_key, message_id, time, content_type, headers, body]

where ``time`` is an integer, ``content_type`` is ``""`` when unset, ``body`` is the
body in standard base64, and ``headers`` is the list of ``[name, tag, value]`` of every
*signed* header, sorted by name: ``tag`` is ``"s"`` (text), ``"b"`` (bytes, value in
base64), ``"i"`` (integer, value in decimal text) or ``"t"`` (boolean, value ``"1"`` or
``"0"``). Signed headers are all the application headers except those whose name starts
with ``x-rbit-`` (rbit's own: tries, last error, the signature itself) and those RabbitMQ
sets when it dead-letters a message (``x-death``, ``x-first-death-*``,
``x-last-death-*``, ``x-delivery-count``, ``x-received-from``). A publisher may not set
an ``x-rbit-`` header itself; headers of other types (floats, tables, lists) cannot be
signed.

A retry is a copy rbit publishes to a delay queue with ``x-rbit-attempts`` set. The
worker that publishes it counter-signs it with its own key (which the fleet trusts):

* ``x-rbit-retry-key``, ``x-rbit-retry-until`` (integer seconds: after this the copy is
  stale), ``x-rbit-retry-sig``, over the UTF-8 JSON array
  ``["rbit-retry-v1", original_signature, queue, attempts, until]``.

A copy claiming to be a retry (``x-rbit-attempts`` set) without a valid counter-signature
is refused, so a captured job cannot be passed off as a retry to skip the replay check.

Two more copies of a signed job are counter-signed the same way, each over
``["rbit-<kind>-v1", base_signature, queue, tag, until]``:

* a *held* copy (kind ``hold``): the copy a worker parks in its holding queue to renew
  a long job's lease (:mod:`rbit.amqp.leases`), which comes back to the work queue if
  that worker dies. Headers ``x-rbit-hold-key``, ``x-rbit-hold-until``,
  ``x-rbit-hold-sig``; the tag is the copy's hold id (``x-rbit-hold-id``), so each
  held copy is taken at most once;
* a *replay* from the dead letters (kind ``replay``), counter-signed by the key of the
  operator who ran ``rbit dead-letters replay``. Headers ``x-rbit-replay-key``,
  ``x-rbit-replay-until``, ``x-rbit-replay-sig``; the tag is the replay count
  (``x-rbit-replayed``).

The base signature is the job's own ``x-rbit-sig``; for a retry of a replayed job it is
the replay's counter-signature, so that the replay count a retry is remembered by is
covered too. A counter-signer must be a trusted key: a publisher without one cannot make
any of these copies.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rbit.amqp.records import HOLD_ID_HEADER
from rbit.errors import SignatureError
from rbit.message import ATTEMPTS_HEADER
from rbit.security.keys import TrustedKeys, fingerprint

KEY_HEADER = "x-rbit-sig-key"
TIME_HEADER = "x-rbit-sig-time"
EXCHANGE_HEADER = "x-rbit-sig-exchange"
ROUTE_HEADER = "x-rbit-sig-route"
SIG_HEADER = "x-rbit-sig"
RETRY_KEY_HEADER = "x-rbit-retry-key"
RETRY_UNTIL_HEADER = "x-rbit-retry-until"
RETRY_SIG_HEADER = "x-rbit-retry-sig"
HOLD_KEY_HEADER = "x-rbit-hold-key"
HOLD_UNTIL_HEADER = "x-rbit-hold-until"
HOLD_SIG_HEADER = "x-rbit-hold-sig"
REPLAY_KEY_HEADER = "x-rbit-replay-key"
REPLAY_UNTIL_HEADER = "x-rbit-replay-until"
REPLAY_SIG_HEADER = "x-rbit-replay-sig"
#: Header counting a job's replays from the dead letters (set by :mod:`rbit.deadletters`).
REPLAYED_HEADER = "x-rbit-replayed"
#: Every counter-signature header: a new copy drops the ones it does not renew.
COUNTER_HEADERS = (RETRY_KEY_HEADER, RETRY_UNTIL_HEADER, RETRY_SIG_HEADER, HOLD_KEY_HEADER,
                   HOLD_UNTIL_HEADER, HOLD_SIG_HEADER, REPLAY_KEY_HEADER,
                   REPLAY_UNTIL_HEADER, REPLAY_SIG_HEADER)
_COUNTER = {"retry": (RETRY_KEY_HEADER, RETRY_UNTIL_HEADER, RETRY_SIG_HEADER),
            "hold": (HOLD_KEY_HEADER, HOLD_UNTIL_HEADER, HOLD_SIG_HEADER),
            "replay": (REPLAY_KEY_HEADER, REPLAY_UNTIL_HEADER, REPLAY_SIG_HEADER)}

#: Prefix of rbit's own headers, never signed by a publisher.
OWN_PREFIX = "x-rbit-"
_BROKER_HEADERS = frozenset({"x-death", "x-delivery-count", "x-received-from"})
_BROKER_PREFIXES = ("x-first-death-", "x-last-death-")
_MAX_SIGNATURE = 200  # base64 of 64 bytes is 88 characters


def signed_headers(headers: Mapping[str, Any]) -> list[list[str]]:
    """The ``[name, tag, value]`` list a signature covers (see the module docstring).

    Raises:
        SignatureError: A signed header's value is of a type that cannot be signed.
    """
    items = []
    for name in sorted(headers):
        if name.startswith(OWN_PREFIX) or name in _BROKER_HEADERS or \
                name.startswith(_BROKER_PREFIXES):
            continue
        items.append([name, *_tagged(name, headers[name])])
    return items


def _tagged(name: str, value: Any) -> tuple[str, str]:
    if value.__class__ is str:
        return "s", value
    if isinstance(value, (bytes, bytearray)):
        return "b", base64.b64encode(bytes(value)).decode("ascii")
    if value.__class__ is bool:
        return "t", "1" if value else "0"
    if value.__class__ is int:
        return "i", str(value)
    raise SignatureError(f"header {name!r} has a value of type {type(value).__name__}, "
                         "which cannot be signed")


def payload(exchange: str, routing_key: str, message_id: str, stamp: int,
            content_type: str | None, headers: Mapping[str, Any], body: bytes) -> bytes:
    """The bytes a job's signature covers (see the module docstring)."""
    document = ["rbit-job-v1", exchange, routing_key, message_id, stamp, content_type or "",
                signed_headers(headers), base64.b64encode(body).decode("ascii")]
    return json.dumps(document, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _counter_payload(kind: str, signature: str, queue: str, tag: int | str,
                     until: int) -> bytes:
    document = [f"rbit-{kind}-v1", signature, queue, tag, until]
    return json.dumps(document, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _base_signature(kind: str, headers: Mapping[str, Any]) -> str:
    """What a counter-signature of ``kind`` covers: the job's, or its replay's, signature."""
    if kind == "retry" and REPLAY_SIG_HEADER in headers:
        return str(headers[REPLAY_SIG_HEADER])
    return str(headers.get(SIG_HEADER, ""))


class Signer:
    """Signs jobs (publishers) and counter-signs retries (workers).

    Args:
        key: The Ed25519 private key.
        clock: Wall clock in seconds (injected by tests).
    """

    def __init__(self, key: Ed25519PrivateKey, clock=time.time) -> None:
        self._key = key
        self.key_id = fingerprint(key.public_key())
        self._clock = clock

    def sign(self, exchange: str, routing_key: str, message_id: str,
             content_type: str | None, headers: Mapping[str, Any],
             body: bytes) -> dict[str, Any]:
        """The signature headers for a job; add them to ``headers`` to publish.

        Raises:
            SignatureError: ``headers`` holds an ``x-rbit-`` header or a value that
                cannot be signed.
        """
        own = [name for name in headers if name.startswith(OWN_PREFIX)]
        if own:
            raise SignatureError(f"header {own[0]!r}: x-rbit- headers are rbit's own")
        stamp = int(self._clock())
        data = payload(exchange, routing_key, message_id, stamp, content_type, headers, body)
        return {
            KEY_HEADER: self.key_id,
            TIME_HEADER: stamp,
            EXCHANGE_HEADER: exchange,
            ROUTE_HEADER: routing_key,
            SIG_HEADER: base64.b64encode(self._key.sign(data)).decode("ascii"),
        }

    def countersign(self, headers: Mapping[str, Any], queue: str, attempts: int,
                    until: int) -> dict[str, Any]:
        """The counter-signature headers of a retry copy of a signed job."""
        return self.countersign_copy("retry", headers, queue, attempts, until)

    def countersign_copy(self, kind: str, headers: Mapping[str, Any], queue: str,
                         tag: int | str, until: int) -> dict[str, Any]:
        """The counter-signature headers of rbit's own copy of a signed job.

        Args:
            kind: ``retry`` (tag: the try number), ``hold`` (tag: the hold id) or
                ``replay`` (tag: the replay count).
            headers: The copy's headers (with the job's signature).
            queue: The queue the copy is for.
            tag: See ``kind``.
            until: After this (epoch seconds) the copy is stale.
        """
        key_header, until_header, sig_header = _COUNTER[kind]
        data = _counter_payload(kind, _base_signature(kind, headers), queue, tag, until)
        return {
            key_header: self.key_id,
            until_header: until,
            sig_header: base64.b64encode(self._key.sign(data)).decode("ascii"),
        }


@dataclass(frozen=True)
class Verified:
    """A delivery whose signature checked out.

    Attributes:
        key_id: The publisher's key.
        replay_key: What the replay window remembers it by.
        expires: Until when (epoch seconds) the replay window must remember it.
        retry: Whether it is one of rbit's counter-signed copies (retry, held copy,
            replay).
    """

    key_id: str
    replay_key: str
    expires: float
    retry: bool


def _text(headers: Mapping[str, Any], name: str, limit: int = 255) -> str:
    value = headers.get(name)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str) or not value or len(value) > limit:
        raise SignatureError(f"header {name} is missing or malformed")
    return value


def _integer(headers: Mapping[str, Any], name: str) -> int:
    value = headers.get(name)
    if value.__class__ is not int:
        raise SignatureError(f"header {name} is missing or malformed")
    return value


def _signature(headers: Mapping[str, Any], name: str) -> bytes:
    try:
        raw = base64.b64decode(_text(headers, name, _MAX_SIGNATURE), validate=True)
    except ValueError:
        raise SignatureError(f"header {name} is not base64") from None
    return raw


def verify(keys: TrustedKeys, *, body: bytes, headers: Mapping[str, Any],
           message_id: str | None, content_type: str | None, targets: set[tuple[str, str]],
           queue: str, now: float, max_skew: float, redelivered: bool) -> Verified:
    """Check a delivery's signature (and counter-signature, for a retry).

    Args:
        keys: The trusted keys.
        body: The body as delivered.
        headers: The headers as delivered.
        message_id: The AMQP ``message_id``.
        content_type: The AMQP ``content_type``.
        queue: The queue it was delivered from.
        now: The time (epoch seconds).
        max_skew: How far the signing time may be from ``now``.
        targets: The (exchange, routing key) pairs that lead to ``queue``; the signed
            target must be one of them.
        redelivered: The broker's own redelivered flag (a publisher cannot set it): an
            earlier delivery of this very message was not acked.

    Raises:
        SignatureError: With the reason; the key id, when known, is in ``.key_id``.
    """
    key_id = _text(headers, KEY_HEADER) if KEY_HEADER in headers else None
    if key_id is None:
        raise SignatureError("unsigned job")
    public = keys.get(key_id)
    if public is None:
        raise _error(f"signed with an unknown or revoked key {key_id}", key_id)
    if not isinstance(message_id, str) or not message_id:
        raise _error("a signed job must carry a message id", key_id)
    stamp = _integer(headers, TIME_HEADER)
    target = (_text(headers, EXCHANGE_HEADER, 255) if headers.get(EXCHANGE_HEADER) else "",
              _text(headers, ROUTE_HEADER))
    signature = _signature(headers, SIG_HEADER)
    try:
        data = payload(target[0], target[1], message_id, stamp, content_type, headers, body)
        public.verify(signature, data)
    except InvalidSignature:
        raise _error("bad signature (the job was changed after signing)", key_id) from None
    except SignatureError as exc:
        raise _error(str(exc), key_id) from None
    if target not in targets:
        raise _error(f"signed for exchange {target[0]!r} route {target[1]!r}, "
                     f"which does not lead to queue {queue!r}", key_id)
    if HOLD_SIG_HEADER in headers:
        hold_id = _text(headers, HOLD_ID_HEADER, 64)
        return _verify_copy("hold", keys, headers, key_id, message_id, queue, now, hold_id)
    if ATTEMPTS_HEADER in headers:
        attempts = headers.get(ATTEMPTS_HEADER)
        if attempts.__class__ is not int or RETRY_SIG_HEADER not in headers:
            raise _error("a retry without a worker's counter-signature", key_id)
        verified = _verify_copy("retry", keys, headers, key_id, message_id, queue, now,
                                attempts)
        if REPLAY_SIG_HEADER in headers:
            # The replay's counter-signature (covered by the retry's) covers the count;
            # its own deadline has passed, the retry's applies.
            replayed = _integer(headers, REPLAYED_HEADER)
            _verify_copy("replay", keys, headers, key_id, message_id, queue, now, replayed,
                         check_time=False)
            return dataclasses.replace(
                verified, replay_key=f"{verified.replay_key} replay {replayed}")
        return verified
    if REPLAY_SIG_HEADER in headers:
        return _verify_copy("replay", keys, headers, key_id, message_id, queue, now,
                            _integer(headers, REPLAYED_HEADER))
    if not redelivered and abs(now - stamp) > max_skew:
        raise _error(f"signed at {stamp}, more than {max_skew:g} s from now ({int(now)})",
                     key_id)
    return Verified(key_id, f"{key_id} {message_id}", stamp + max_skew, False)


def _verify_copy(kind: str, keys: TrustedKeys, headers: Mapping[str, Any], key_id: str,
                 message_id: str, queue: str, now: float, tag: int | str, *,
                 check_time: bool = True) -> Verified:
    key_header, until_header, sig_header = _COUNTER[kind]
    what = {"retry": "retry", "hold": "held copy", "replay": "replay"}[kind]
    if sig_header not in headers:
        raise _error(f"a {what} without a counter-signature", key_id)
    counter_key = keys.get(_text(headers, key_header))
    if counter_key is None:
        raise _error(f"a {what} counter-signed by an unknown or revoked key", key_id)
    until = _integer(headers, until_header)
    data = _counter_payload(kind, _base_signature(kind, headers), queue, tag, until)
    try:
        counter_key.verify(_signature(headers, sig_header), data)
    except InvalidSignature:
        raise _error(f"bad {what} counter-signature", key_id) from None
    if check_time and now > until:
        raise _error(f"a stale {what} (valid until {until}, now {int(now)})", key_id)
    return Verified(key_id, f"{key_id} {message_id} {kind} {tag}", until, True)


def _error(reason: str, key_id: str | None) -> SignatureError:
    error = SignatureError(reason)
    error.key_id = key_id  # type: ignore[attr-defined]
    return error
