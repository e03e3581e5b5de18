"""Signed control commands: a command obeyed only with a trusted operator's signature.

With ``[control] trusted_keys = DIR`` on a worker, every ``rbit ctl`` command must carry,
beside an authorized AMQP ``user_id`` (:mod:`rbit.control.handler`), a signature by one
of the operator keys in ``DIR``. It is a job signature (:mod:`rbit.security.signing`,
the same format and headers) made for the control exchange and the routing key the
command was sent with (``all`` or ``worker:<name>``): it covers the command document,
that target, the message id, the signing time and the content type. A worker refuses a
command that is unsigned, signed by an unknown or removed key, changed, sent to another
target, signed more than ``[control] max_skew`` seconds from its clock, or already taken
(the replay window, a SQLite file in the state directory, remembers each command by key
id and message id until it would be stale anyway, across restarts).

``rbit ctl`` signs with ``[control] signing_key``, else ``[security] signing_key``.

What this adds to the ``user_id`` check: a broker account that may publish as an
authorized user (a shared password, a leaked one) cannot command the fleet without an
operator's private key, and a captured command cannot be sent again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rbit.config import Settings
from rbit.errors import ConfigError, SignatureError
from rbit.security import keys as keyfiles
from rbit.security.replay import ReplayWindow
from rbit.security.signing import Signer, verify

if TYPE_CHECKING:
    from rbit.amqp.control import CommandEnvelope

log = logging.getLogger(__name__)

#: The replay window of commands, in the worker's state directory.
REPLAY_FILE = "control.replay.sqlite3"
#: The exchange commands are published to (see :mod:`rbit.amqp.control`).
_EXCHANGE = "rbit.control"


class CommandAuthority:
    """Checks the signatures of the commands sent to one worker.

    Args:
        settings: The worker's settings; ``[control] trusted_keys`` is set.
        targets: The (exchange, routing key) pairs that reach this worker.
        queue: The worker's control queue (named in refusals).
        clock: Wall clock in seconds (injected by tests).

    Raises:
        ConfigError: No usable key in ``trusted_keys``, or the replay window cannot be
            opened; naming file, section and key.
    """

    def __init__(self, settings: Settings, targets: set[tuple[str, str]], queue: str,
                 clock: Callable[[], float] = time.time) -> None:
        control = settings.control
        self.keys = keyfiles.trusted_keys(control.trusted_keys, file=settings.file,
                                          section="control", key="trusted_keys")
        path = os.path.join(settings.state.state_dir, REPLAY_FILE)
        try:
            self.window = ReplayWindow(path)
        except Exception as exc:  # OSError, sqlite3.Error
            raise ConfigError(f"cannot open {path}: {exc}", file=settings.file,
                              section="rbit", key="state_dir") from exc
        self.max_skew = control.max_skew
        self._targets = targets
        self._queue = queue
        self._clock = clock

    @classmethod
    def for_worker(cls, settings: Settings, name: str) -> CommandAuthority | None:
        """The worker's authority, or None when commands need no signature."""
        if not settings.control.trusted_keys:
            return None
        targets = {(_EXCHANGE, "all"), (_EXCHANGE, f"worker:{name}")}
        return cls(settings, targets, f"rbit.control.{name}")

    def check(self, body: bytes, envelope: CommandEnvelope | None) -> str:
        """Verify a command's signature and take it out of the replay window.

        Returns:
            The id of the key that signed it.

        Raises:
            SignatureError: Why it must not be obeyed (``.key_id`` when known).
        """
        if envelope is None:
            raise SignatureError("unsigned command")
        now = self._clock()
        headers = envelope.headers
        # A command is never one of rbit's copies: no retry, hold or replay bypass.
        if any(name.startswith(("x-rbit-retry-", "x-rbit-hold-", "x-rbit-replay"))
               or name == "x-rbit-attempts" for name in headers):
            raise SignatureError("a command carries a job copy's headers")
        try:
            verified = verify(self.keys, body=body, headers=headers,
                              message_id=envelope.message_id,
                              content_type=envelope.content_type, targets=self._targets,
                              queue=self._queue, now=now, max_skew=self.max_skew,
                              redelivered=False)
        except SignatureError as exc:
            if str(exc) == "unsigned job":
                raise SignatureError("unsigned command") from None
            raise
        if not self.window.first_time(verified.replay_key, verified.expires, now):
            error = SignatureError("a replay: this signed command was already taken")
            error.key_id = verified.key_id  # type: ignore[attr-defined]
            raise error
        return verified.key_id

    def close(self) -> None:
        self.window.close()


def command_signer(settings: Settings) -> Signer | None:
    """The key ``rbit ctl`` signs with: ``[control]``'s, else ``[security]``'s, or None.

    Raises:
        ConfigError: The key file is unusable (naming the section and key it came from).
    """
    if settings.control.signing_key:
        return Signer(keyfiles.signing_key(settings.control.signing_key, file=settings.file,
                                           section="control", key="signing_key"))
    if settings.security.signing_key:
        return Signer(keyfiles.signing_key(settings.security.signing_key, file=settings.file))
    return None


def sign_command(signer: Signer, routing_key: str, message_id: str, content_type: str,
                 body: bytes) -> dict[str, Any]:
    """The signature headers of a command sent to ``routing_key``."""
    return signer.sign(_EXCHANGE, routing_key, message_id, content_type, {}, body)
