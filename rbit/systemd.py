"""systemd's ``Type=notify`` protocol (``sd_notify``), without a library.

A service started by systemd finds a datagram socket's address in ``$NOTIFY_SOCKET``
(a path, or an abstract name written with a leading ``@``) and sends it newline-separated
``KEY=VALUE`` lines: ``READY=1`` once it serves, ``STATUS=...`` for ``systemctl status``,
``WATCHDOG=1`` at least every ``$WATCHDOG_USEC`` microseconds when the unit has
``WatchdogSec=``, and ``STOPPING=1`` when it begins to stop. Without ``$NOTIFY_SOCKET``
every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

#: How often ``STATUS=`` is refreshed when no watchdog asks for more (seconds).
STATUS_INTERVAL = 10.0


class Notifier:
    """Sends notifications to systemd's socket, if there is one.

    Args:
        address: The ``$NOTIFY_SOCKET`` value (None: notifications are dropped).
        watchdog_usec: The ``$WATCHDOG_USEC`` value, when it is meant for this process.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address or None
        #: How often to send ``WATCHDOG=1`` (half the watchdog's timeout), or None.
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec else None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None,
                     pid: int | None = None) -> Notifier:
        """The notifier systemd's variables describe (``os.environ`` by default)."""
        env = os.environ if environ is None else environ
        usec_text = env.get("WATCHDOG_USEC", "")
        owner = env.get("WATCHDOG_PID", "")
        mine = not owner or owner == str(os.getpid() if pid is None else pid)
        usec = int(usec_text) if usec_text.isdigit() and int(usec_text) > 0 and mine else None
        return cls(env.get("NOTIFY_SOCKET"), usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram; False if there is nowhere or it failed."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode("utf-8"), target)
        except OSError as exc:
            log.debug("cannot notify systemd: %s", exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")


class Heartbeat:
    """A daemon thread that keeps systemd informed while the process is well.

    Every period it refreshes ``STATUS=`` and, when a watchdog is set, sends
    ``WATCHDOG=1`` only if ``alive(timeout)`` says the process's I/O loop still turns:
    a hung loop then gets the unit restarted.

    Args:
        notifier: Where to send.
        alive: ``(timeout) -> bool``: the I/O loop answered within ``timeout`` seconds.
        status: The current ``STATUS=`` text.
    """

    def __init__(self, notifier: Notifier, alive: Callable[[float], bool],
                 status: Callable[[], str]) -> None:
        self._notifier, self._alive, self._status = notifier, alive, status
        watchdog = notifier.watchdog_interval
        self.period = min(watchdog, STATUS_INTERVAL) if watchdog else STATUS_INTERVAL
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rbit-systemd", daemon=True)

    def start(self) -> None:
        if self._notifier.enabled:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def beat(self) -> None:
        """One period's notifications."""
        lines = [f"STATUS={self._status()}"]
        if self._notifier.watchdog_interval and self._alive(self.period / 4):
            lines.append("WATCHDOG=1")
        self._notifier.notify(*lines)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.beat()
