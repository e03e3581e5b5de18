"""Sending credit events: to the daemon's socket, or straight to RabbitMQ.

From Python::

    from rbit.credit.client import send
    send("ALLOC,slot=job42,credits=10")                       # default unix socket
    send(CreditEvent("claim", {"slot": "job42", "machine": "m1"}), host="h", port=9999)

From a shell, without the daemon: ``rbit-credit --config FILE send ALLOC,slot=job42``.
"""

from __future__ import annotations

import socket
import threading

from rbit.credit.events import CreditEvent
from rbit.credit.protocol import ProtocolError, format_line, parse_line
from rbit.credit.settings import DEFAULT_SOCKET, CreditSettings
from rbit.errors import RbitError

#: Seconds to wait for the daemon's reply (it answers once RabbitMQ confirmed).
DEFAULT_TIMEOUT = 30.0


class DaemonUnavailable(RbitError):
    """The daemon could not be reached, or hung up without replying."""


def send(
    line_or_event: str | bytes | CreditEvent,
    *,
    socket_path: str | None = None,
    host: str | None = None,
    port: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Send one event to the ``rbit-credit`` daemon and wait for its ``OK``.

    An event is sent with its id (``event_id=``): sending the same event again, after
    an error or a timeout, cannot count it twice. A line is sent as it is.

    Args:
        line_or_event: A protocol line (``"ALLOC,slot=job42,credits=10"``) or an event.
        socket_path: The daemon's unix socket (the default when no ``host`` is given:
            ``/run/rbit/credit.socket``).
        host: The daemon's TCP host, with ``port``.
        port: The daemon's TCP port.
        timeout: Seconds to wait for the connection and the reply.

    Raises:
        ProtocolError: The daemon answered ``ER <reason>`` (or the line holds a newline);
            ``reason`` is the daemon's.
        DaemonUnavailable: No daemon answered.
    """
    line = _line(line_or_event)
    reply = _exchange(line, socket_path, host, port, timeout)
    if reply == "OK":
        return
    if reply.startswith("ER"):
        raise ProtocolError(reply[3:] or "refused")
    raise DaemonUnavailable(f"unexpected reply from the daemon: {reply[:80]!r}")


def _line(line_or_event: str | bytes | CreditEvent) -> bytes:
    if isinstance(line_or_event, CreditEvent):
        text = format_line(line_or_event, with_id=True)  # a resend keeps its id
    elif isinstance(line_or_event, bytes):
        text = line_or_event.decode("utf-8", "surrogateescape")
    else:
        text = line_or_event
    text = text.rstrip("\r\n")
    if "\n" in text or "\r" in text:
        raise ProtocolError("one command per call: the line holds a line break")
    return text.encode("utf-8", "surrogateescape") + b"\n"


def _exchange(line: bytes, path: str | None, host: str | None, port: int | None,
              timeout: float) -> str:
    if host is not None:
        if port is None:
            raise ValueError("a TCP host needs a port")
        where = f"{host}:{port}"
        connect = lambda: socket.create_connection((host, port), timeout=timeout)  # noqa: E731
    else:
        where = path or DEFAULT_SOCKET
        connect = lambda: _unix(where, timeout)  # noqa: E731
    try:
        with connect() as sock:
            sock.sendall(line)
            sock.shutdown(socket.SHUT_WR)  # one line: let the daemon hang up after it
            reply = _read_line(sock)
    except OSError as exc:
        raise DaemonUnavailable(f"cannot talk to the credit daemon at {where}: {exc}") from exc
    if reply is None:
        raise DaemonUnavailable(f"the credit daemon at {where} hung up without a reply")
    return reply


def _unix(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def _read_line(sock: socket.socket) -> str | None:
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk
    return data.partition(b"\n")[0].decode("utf-8", "replace").strip()


def publish_direct(settings: CreditSettings, line: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Parse ``line`` and publish it straight to the credit queue, waiting for the confirm.

    Used by ``rbit-credit send``: no daemon needed.

    Raises:
        ProtocolError: The line is malformed.
        BrokerUnreachable: RabbitMQ could not be reached.
        DaemonUnavailable: RabbitMQ did not confirm the message (reason "broker
            unavailable").
    """
    from rbit.credit.daemon import connect_broker  # pika only when publishing
    from rbit.credit.server import broker_publisher

    event = parse_line(line)
    broker = connect_broker(settings)
    try:
        done = threading.Event()
        outcome: list[bool] = []

        def on_confirm(ok: bool) -> None:
            outcome.append(ok)
            done.set()

        broker_publisher(broker, settings.credit_queue,
                         settings.credit_queue_arguments)(event.to_json(), event.id, on_confirm)
        if not done.wait(timeout) or not outcome[0]:
            raise DaemonUnavailable("broker unavailable")
    finally:
        broker.stop(5.0)
