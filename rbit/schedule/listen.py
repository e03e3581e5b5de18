"""``listen = unix:PATH | tcp:HOST:PORT``: one job per line received on a socket.

Each line (without its newline, and a carriage return before it) is the body of one job,
whose id is ``NAME@<32 hex digits>`` (a random UUID). The sender gets ``OK <job id>`` once
the broker confirmed the job, or ``ER <reason>``:

* ``ER empty line``, ``ER not UTF-8``, ``ER line too long`` (over :data:`MAX_LINE`
  bytes): nothing was published; the connection stays usable for the next line;
* ``ER broker unavailable`` (the worker is not connected: nothing was published, nor
  will be), ``ER not confirmed`` (no confirm within 5 s: the job may or may not be in
  RabbitMQ), ``ER no queue takes the job`` (the routing reaches no queue).

The socket is served like ``rbit-credit``'s front door (:mod:`rbit.credit.server`, whose
server this is): many lines per connection, pipelined, replies in line order; a line
must be complete within 10 s; a connection idle for 1 s with no reply due is closed (so
``echo ... | nc -U`` returns); at most :data:`MAX_CONNECTIONS` clients at once. A unix
socket is created 0660 (its directory 0755 when created); ``tcp:PORT`` binds the
loopback address, and another host only when named (a warning says that anyone who
reaches it can submit jobs). A listen schedule is local: each worker carrying the
section listens on its own socket.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rbit.amqp import records
from rbit.credit.protocol import ProtocolError, reply_for
from rbit.credit.server import Limits, LineProtocol, LineServer, ServerError
from rbit.schedule.fire import SCHEDULE_HEADER

if TYPE_CHECKING:
    from rbit.config import Settings
    from rbit.schedule.settings import ScheduleSettings

log = logging.getLogger(__name__)

#: The longest line, in bytes (without the newline).
MAX_LINE = 64 * 1024
MAX_CONNECTIONS = 256
LIMITS = Limits(max_connections=MAX_CONNECTIONS)
BIND_RETRY = 5.0  # seconds between tries to bind an address that is taken
STOP_GRACE = 5.0


@dataclass(frozen=True)
class ListenSocket:
    """The ``listen`` trigger: a unix socket ``path``, or a TCP ``host`` and ``port``."""

    path: str | None = None
    host: str | None = None
    port: int | None = None

    def describe(self) -> str:
        if self.path is not None:
            return f"listen unix:{self.path}"
        return f"listen tcp:{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        if self.path is not None or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host or "").is_loopback
        except ValueError:
            return False


def parse_listen(section: Any, value: str) -> ListenSocket:
    """``listen = unix:/run/rbit/in.sock``, ``tcp:127.0.0.1:PORT`` or ``tcp:PORT``."""
    text = value.strip()
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest.startswith("/"):
        return ListenSocket(path=rest)
    if kind == "tcp" and rest:
        host, sep, port = rest.rpartition(":")
        host = host.strip("[]") if sep else "127.0.0.1"
        if port.isdigit() and 0 < int(port) < 65536 and (host or not sep):
            return ListenSocket(host=host, port=int(port))
    raise section.error("listen", "expected unix:/ABSOLUTE/PATH, tcp:HOST:PORT or tcp:PORT "
                                  f"(port 1-65535), got {text[:200]!r}")


class ListenPublisher:
    """Publishes lines as jobs of ``schedule`` on the worker's connection.

    Mandatory and failing fast, as the credit front door's publisher (see
    :class:`rbit.credit.server.BrokerPublisher`): a line is never held for a later
    connection after its sender was told ``ER``. Signed when a key is set.
    """

    def __init__(self, broker: Any, schedule: ScheduleSettings, signer: Any = None) -> None:
        self._broker, self._schedule, self._signer = broker, schedule, signer
        self._headers = {**schedule.headers, SCHEDULE_HEADER: schedule.name}

    def _message(self, body: bytes, job_id: str, on_confirm: Callable[[bool], None]):
        schedule, headers = self._schedule, self._headers
        if self._signer is not None:
            headers = {**headers, **self._signer.sign(
                schedule.exchange, schedule.routing_key, job_id, schedule.content_type,
                headers, body)}
        return records.Publish(schedule.exchange, schedule.routing_key, body,
                               headers=headers, message_id=job_id,
                               content_type=schedule.content_type, mandatory=True,
                               fail_fast=True, on_failure=getattr(on_confirm, "fail", None))

    def __call__(self, body: bytes, job_id: str, on_confirm: Callable[[bool], None]) -> None:
        self._broker.send(self._message(body, job_id, on_confirm), on_confirm)

    def publish_many(self, items: list[tuple[bytes, str, Callable[[bool], None]]]) -> None:
        message = self._message
        self._broker.send_many([(message(b, i, cb), cb) for b, i, cb in items])


def line_protocol(name: str) -> LineProtocol:
    """The lines of schedule ``name``: each one a job, answered ``OK <job id>``."""
    def parse(raw: bytes) -> tuple[bytes, str, None]:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if len(line) > MAX_LINE:
            raise ProtocolError("line too long")
        if not line.strip():
            raise ProtocolError("empty line")
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("not UTF-8") from None
        return line, f"{name}@{uuid.uuid4().hex}", None

    return LineProtocol(parse=parse, ok_reply=lambda job_id: f"OK {job_id}\n".encode(),
                        max_line=MAX_LINE,
                        returned=reply_for(ProtocolError("no queue takes the job")),
                        label=f"listen {name}")


class ListenSource:
    """Serves one schedule's socket from an event loop in a thread of its own.

    Args:
        schedule: The ``[schedule:NAME]`` section, with a :class:`ListenSocket` trigger.
        settings: The worker's settings (for ``[security] signing_key``).
        broker: The worker's :class:`rbit.amqp.broker.Broker`, which publishes.
    """

    def __init__(self, schedule: ScheduleSettings, settings: Settings, broker: Any) -> None:
        self.schedule = schedule
        self.trigger: ListenSocket = schedule.trigger
        self._publish = ListenPublisher(broker, schedule, _signer(settings))
        self._loop = asyncio.new_event_loop()
        self._stopped = self._loop.create_future()
        self._thread: threading.Thread | None = None
        self.server: LineServer | None = None
        self.listening = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop.run_until_complete,
                                        args=(self._serve(),), daemon=True,
                                        name=f"rbit-listen-{self.schedule.name}")
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting; lines in flight get their replies (up to a grace period)."""
        if self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._stop_soon)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()

    def _stop_soon(self) -> None:
        if not self._stopped.done():
            self._stopped.set_result(None)

    def describe(self) -> dict[str, Any]:
        """The schedule as ``rbit ctl status`` shows it."""
        return {"name": self.schedule.name, "trigger": self.trigger.describe(),
                "role": "local", "last_fire": None, "next_fire": None}

    async def _serve(self) -> None:
        trigger = self.trigger
        server = LineServer(self._publish, unix_path=trigger.path, host=trigger.host,
                            port=trigger.port, limits=LIMITS,
                            protocol=line_protocol(self.schedule.name))
        while not await self._bound(server):
            if await self._wait_stop(BIND_RETRY):
                return
        self.server = server
        self.listening.set()
        if not trigger.loopback:
            log.warning("schedule %s listens on %s: whoever reaches it can submit jobs",
                        self.schedule.name, trigger.describe())
        await self._stopped
        await server.stop(STOP_GRACE)

    async def _bound(self, server: LineServer) -> bool:
        try:
            await server.start()
        except ServerError as exc:
            log.error("schedule %s: %s; trying again in %.0f s", self.schedule.name, exc,
                      BIND_RETRY)
            return False
        return True

    async def _wait_stop(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self._stopped), seconds)
        except TimeoutError:
            return False
        return True


def _signer(settings: Settings) -> Any:
    if not settings.security.signing_key:
        return None
    from rbit.security import keys
    from rbit.security.signing import Signer
    return Signer(keys.signing_key(settings.security.signing_key, file=settings.file))
