"""The control plane of one worker, wired from its settings.

:class:`ControlPlane` owns the state store, the job observer and the controller, and
attaches them to the worker's broker and job pools, so that the worker itself only
calls :meth:`ControlPlane.start` and :meth:`ControlPlane.close`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rbit.control.handler import Controller
from rbit.control.observer import JobObserver
from rbit.control.state import StateStore
from rbit.errors import ConfigError, DuplicateWorker

if TYPE_CHECKING:
    from rbit.amqp.broker import Broker
    from rbit.config import Settings
    from rbit.control.authority import CommandAuthority
    from rbit.dispatch import JobPool

log = logging.getLogger(__name__)


class ControlPlane:
    """History, pause state, counts and ``rbit ctl`` commands for one worker.

    Args:
        settings: The worker's settings (``[control]``, ``[rbit] state_dir``...).
        broker: The worker's broker (before it starts).
        pools: The worker's job pools.
        backlog: Status events not yet delivered.
        request_stop: Starts the graceful stop (the ``shutdown`` command).

    Raises:
        ConfigError: The state directory cannot be created or opened.
    """

    def __init__(self, settings: Settings, broker: Broker, pools: Sequence[JobPool], *,
                 backlog: Callable[[], int], request_stop: Callable[[], None]) -> None:
        state = settings.state
        try:
            self.store = StateStore(state.state_dir, state.history_depth)
        except Exception as exc:  # OSError, sqlite3.Error...
            raise ConfigError(f"cannot open the state directory {state.state_dir!r}: {exc}",
                              file=settings.file, section="rbit", key="state_dir") from exc
        self.observer = JobObserver(self.store.keeper if state.history_depth else None)
        queues = [pool.settings.queue for pool in pools]
        for pool in pools:
            pool.observer = self.observer
        paused = self.store.paused() & set(queues)
        if paused:
            log.warning("queues paused (by rbit ctl, before this start): %s",
                        ", ".join(sorted(paused)))
        broker.set_paused(sorted(paused))
        # Signed commands ([control] trusted_keys): a config asking for them without a
        # usable key fails here, before the worker connects.
        self.authority = _authority(settings)
        self.controller = Controller(
            settings.worker.name, settings.control.users, broker=broker, queues=queues,
            observer=self.observer, store=self.store, backlog=backlog,
            request_stop=request_stop, authority=self.authority)
        self._broker = broker
        #: Whether outcomes are recorded (``[rbit] history_depth`` > 0).
        self.history_enabled = state.history_depth > 0
        if settings.control.enabled:
            broker.set_control(self.controller.handle, self.controller.announce,
                               quorum=settings.worker.queue_type == "quorum")

    def start(self) -> None:
        self.store.start()

    def check_start(self) -> None:
        """After the broker's start: raise if the worker's name is taken.

        Raises:
            DuplicateWorker: Another worker of this name holds its control queue.
        """
        control = self._broker.control
        if control is not None and control.duplicate:
            raise DuplicateWorker(control.name)

    def say_goodbye(self, timeout: float = 2.0) -> None:
        """Tell the fleet this worker stops on purpose (not to be reported missing)."""
        control = self._broker.control
        if control is None or not self._broker.connected:
            return
        done = threading.Event()
        control.announce("bye", lambda _ok: done.set())
        done.wait(timeout)

    def close(self) -> None:
        self.store.close()
        if self.authority is not None:
            self.authority.close()

    # The worker's reports, for any reader (an HTTP endpoint, say).

    def status(self, verbose: bool = False) -> dict[str, Any]:
        """See :meth:`rbit.control.handler.Controller.status`."""
        return self.controller.status(verbose)

    def history(self, queue: str, depth: int) -> list[dict[str, Any]]:
        """See :meth:`rbit.control.handler.Controller.history`."""
        return self.controller.history(queue, depth)


def _authority(settings: Settings) -> CommandAuthority | None:
    """The worker's check of signed commands, or None when they need no signature.

    :mod:`rbit.control.authority` is imported only then: it loads ``cryptography``.
    """
    if not settings.control.trusted_keys:
        return None
    from rbit.control.authority import CommandAuthority
    return CommandAuthority.for_worker(settings, settings.worker.name)
