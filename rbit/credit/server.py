"""The front door's socket server: protocol lines in, confirmed publishes out.

Each accepted line becomes one :class:`~rbit.credit.events.CreditEvent` handed to an
injected *publish* function; the client gets ``OK`` only once the broker confirmed the
message, so an ``OK`` means the event is safely in RabbitMQ. A connection may pipeline
many lines: they are all published at once and their replies come back in line order as
the confirms arrive.

The publisher is any callable ``publish(body, message_id, on_confirm)`` that is safe to
call from the event loop's thread, does not block, and later calls
``on_confirm(True|False)`` from any thread (:func:`broker_publisher` adapts
:class:`rbit.broker.Broker`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import socket
import stat
import threading
from dataclasses import dataclass
from typing import Any, Callable

from rbit.credit.events import CreditEvent
from rbit.credit.protocol import MAX_LINE_BYTES, ProtocolError, parse_line, reply_for
from rbit.errors import RbitError

log = logging.getLogger(__name__)

Publish = Callable[[bytes, str, Callable[[bool], None]], None]

_SOCKET_MODE = 0o660
_BROKER_UNAVAILABLE = "broker unavailable"
_OK = reply_for(None)


class ServerError(RbitError):
    """The server cannot listen (address in use, another daemon answers, bad path)."""


@dataclass(frozen=True)
class Limits:
    """Per-connection limits.

    Attributes:
        in_flight: Lines awaiting their reply before the server stops reading from that
            connection (back-pressure on a client that never reads its replies).
        idle_timeout: A connection with nothing in flight and no input for this many
            seconds is closed, so that ``echo ... | nc -U`` (which waits for the server
            to hang up) returns; ``None`` keeps idle connections open.
    """

    in_flight: int = 1024
    idle_timeout: float | None = 1.0


class BrokerPublisher:
    """Adapt :class:`rbit.broker.Broker` to the server's publish function.

    Events go to the default exchange, routed straight to ``queue``, as JSON with the
    event id as ``message_id`` (the credit runner de-duplicates on it). The server
    hands over every line of one event-loop pass at once (:meth:`publish_many`), so the
    broker's I/O thread is woken once per pass, not once per line.
    """

    def __init__(self, broker: Any, queue: str) -> None:
        self._broker, self._queue = broker, queue

    def _message(self, body: bytes, message_id: str):
        from rbit.broker import Publish as Message  # pika only where we publish

        return Message("", self._queue, body, message_id=message_id,
                       content_type="application/json")

    def __call__(self, body: bytes, message_id: str, on_confirm: Callable[[bool], None]) -> None:
        self._broker.send(self._message(body, message_id), on_confirm)

    def publish_many(self, items: list[tuple[bytes, str, Callable[[bool], None]]]) -> None:
        self._broker.send_many([(self._message(b, i), cb) for b, i, cb in items])


def broker_publisher(broker: Any, queue: str) -> BrokerPublisher:
    """The publish function for ``broker`` (see :class:`BrokerPublisher`)."""
    return BrokerPublisher(broker, queue)


class CreditServer:
    """Listens on a unix socket or TCP and serves the credit line protocol.

    Args:
        publish: Where accepted events go (see the module docstring).
        unix_path: Listen on this unix socket path ...
        host: ... or on this TCP host and ``port`` (0 picks a free port).
        port: The TCP port.
        limits: Per-connection limits.
    """

    def __init__(
        self,
        publish: Publish,
        *,
        unix_path: str | None = None,
        host: str | None = None,
        port: int | None = None,
        limits: Limits = Limits(),
    ) -> None:
        if (unix_path is None) == (host is None):
            raise ValueError("give either unix_path or host and port")
        self._publish = publish
        self._unix_path = unix_path
        self._host, self._port = host, port
        self._limits = limits
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_LineProtocol] = set()
        self._socket_inode: int | None = None
        self._confirms: _ConfirmQueue | None = None
        self._outbox: _Outbox | None = None

    @property
    def address(self) -> str | tuple[str, int]:
        """The unix socket path, or the bound ``(host, port)``."""
        if self._unix_path is not None:
            return self._unix_path
        if self._server is None:
            raise ServerError("the server is not started")
        return self._server.sockets[0].getsockname()[:2]

    async def start(self) -> None:
        """Bind and start accepting connections.

        Raises:
            ServerError: The address is in use (another daemon answers on the unix
                socket, or the TCP port is taken) or cannot be bound.
        """
        loop = asyncio.get_running_loop()
        self._confirms = _ConfirmQueue(loop)
        self._outbox = _Outbox(loop, self._publish)
        if self._unix_path is not None:
            sock = _bind_unix(self._unix_path)
            self._socket_inode = os.stat(self._unix_path).st_ino
            self._server = await loop.create_unix_server(self._protocol, sock=sock)
        else:
            self._server = await _start_tcp(self._protocol, self._host, self._port)
        log.info("credit front door listening on %s", self.address)

    def _protocol(self) -> _LineProtocol:
        assert self._confirms is not None
        return _LineProtocol(self._outbox, self._limits, self._confirms, self._connections)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let lines in flight get their replies, then close.

        Args:
            grace: Seconds to wait for outstanding confirms; connections still waiting
                after that are closed without their replies (those events may or may not
                be in RabbitMQ; the client saw no ``OK``).
        """
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.stop_reading()
        deadline = asyncio.get_running_loop().time() + grace
        while self._connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        if self._connections:
            log.warning("closed %d connection(s) still waiting for confirms",
                        len(self._connections))
            for connection in list(self._connections):
                connection.abort()
        if self._server is not None:
            await self._server.wait_closed()
        self._remove_socket_file()

    def _remove_socket_file(self) -> None:
        # Only our own socket: a newer daemon may have replaced it in the meantime.
        path = self._unix_path
        try:
            if path is not None and os.stat(path).st_ino == self._socket_inode:
                os.unlink(path)
        except FileNotFoundError:
            pass


class _ConfirmQueue:
    """Confirms from a broker on another thread are applied by the loop in batches.

    One wake-up of the loop (``call_soon_threadsafe``) serves every confirm queued
    before it runs, instead of one wake-up per event. A broker running on the server's
    own loop (the daemon's case) has its confirms applied at once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._items: collections.deque[tuple[_Reply, bool]] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, reply: _Reply, ok: bool) -> None:
        if threading.get_ident() == self._loop_thread:  # a broker on our own loop
            reply.settle(ok)
            reply.owner.flush()
            return
        self._items.append((reply, ok))
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # loop closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._apply)

    def _apply(self) -> None:
        with self._lock:
            self._scheduled = False
        items = self._items
        touched = set()
        while items:
            reply, ok = items.popleft()
            reply.settle(ok)
            touched.add(reply.owner)
        for owner in touched:
            owner.flush()


class _Outbox:
    """Lines accepted during one pass of the event loop, published together."""

    def __init__(self, loop: asyncio.AbstractEventLoop, publish: Publish) -> None:
        self._loop, self._publish = loop, publish
        self._many = getattr(publish, "publish_many", None)
        self._items: list[tuple[bytes, str, Callable[[bool], None], _Reply]] = []

    def put(self, body: bytes, event_id: str, on_confirm: Callable[[bool], None],
            reply: _Reply) -> None:
        if not self._items:
            self._loop.call_soon(self.flush)
        self._items.append((body, event_id, on_confirm, reply))

    def flush(self) -> None:
        items, self._items = self._items, []
        if self._many is not None:
            try:
                self._many([item[:3] for item in items])
                return
            except Exception:  # noqa: BLE001 - any publisher failure means "not counted"
                log.exception("publishing %d credit events failed", len(items))
                for *_, reply in items:
                    reply.settle(False)
                    reply.owner.flush()
                return
        for body, event_id, on_confirm, reply in items:
            try:
                self._publish(body, event_id, on_confirm)
            except Exception:  # noqa: BLE001 - any publisher failure means "not counted"
                log.exception("publishing credit event %s failed", event_id)
                reply.settle(False)
                reply.owner.flush()


class _Reply:
    """One line's reply slot: filled at once (ER) or when the broker confirms."""

    __slots__ = ("owner", "data", "event")

    def __init__(self, owner: _LineProtocol, data: bytes | None, event: CreditEvent | None):
        self.owner, self.data, self.event = owner, data, event

    def settle(self, ok: bool) -> None:
        if self.data is not None:
            return
        if ok:
            self.data = _OK
        else:
            log.warning("credit event %s not confirmed by the broker", self.event.id)
            self.data = reply_for(ProtocolError(_BROKER_UNAVAILABLE))


class _LineProtocol(asyncio.Protocol):
    """One client connection: lines in, replies out in line order."""

    def __init__(self, outbox: _Outbox, limits: Limits, confirms: _ConfirmQueue,
                 registry: set[_LineProtocol]) -> None:
        self._outbox, self._limits, self._confirms = outbox, limits, confirms
        self._registry = registry
        self._replies: collections.deque[_Reply] = collections.deque()
        self._buffer = bytearray()
        self._discarding = False  # inside an over-long line, waiting for its end
        self._eof = False
        self._paused = False
        self._transport: asyncio.Transport | None = None
        self._idle: asyncio.TimerHandle | None = None

    # -- asyncio callbacks ---------------------------------------------------------

    def connection_made(self, transport) -> None:
        self._transport = transport
        self._registry.add(self)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._take_lines()
        self._arm_idle()
        self.flush()
        if len(self._replies) >= self._limits.in_flight and not self._paused:
            self._paused = True  # back-pressure on a client that never reads replies
            self._transport.pause_reading()

    def eof_received(self) -> bool:
        if self._buffer and not self._discarding:
            self._line(bytes(self._buffer))  # a last line without "\n" still counts
        self._buffer.clear()
        self._eof = True
        self.flush()
        return True  # keep the transport open to write the replies still to come

    def connection_lost(self, exc: Exception | None) -> None:
        self._registry.discard(self)
        self._transport = None
        if self._idle is not None:
            self._idle.cancel()

    # -- lines -------------------------------------------------------------------

    def _take_lines(self) -> None:
        buffer = self._buffer
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if self._discarding:
                self._discarding = False
            else:
                self._line(line)
        if self._discarding:
            buffer.clear()
        elif len(buffer) > MAX_LINE_BYTES + 1:
            # Reply now, in order, and drop the rest of the line as it arrives.
            self._replies.append(_Reply(self, reply_for(ProtocolError("line too long")), None))
            buffer.clear()
            self._discarding = True

    def _line(self, raw: bytes) -> None:
        if not raw.strip():
            return  # blank lines (e.g. "\r\n" keep-alives) get no reply
        try:
            event = parse_line(raw)
        except ProtocolError as exc:
            log.info("refused a credit line: %s", exc.reason)
            self._replies.append(_Reply(self, reply_for(exc), None))
            return
        reply = _Reply(self, None, event)
        self._replies.append(reply)
        confirms = self._confirms
        self._outbox.put(event.to_json(), event.id, lambda ok: confirms.put(reply, ok), reply)

    # -- replies -----------------------------------------------------------------

    def flush(self) -> None:
        """Write the replies that are ready, in line order; close when all is said."""
        replies, transport = self._replies, self._transport
        if transport is None:
            replies.clear()
            return
        out = []
        while replies and replies[0].data is not None:
            out.append(replies.popleft().data)
        if out:
            transport.write(b"".join(out))
        if self._paused and len(replies) < self._limits.in_flight:
            self._paused = False
            transport.resume_reading()
        if self._eof and not replies:
            transport.close()

    def _arm_idle(self) -> None:
        timeout = self._limits.idle_timeout
        if timeout is None or timeout <= 0:
            return
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(timeout, self._on_idle)

    def _on_idle(self) -> None:
        if self._transport is None:
            return
        if self._replies or self._buffer:
            self._arm_idle()  # not idle: a reply is still due or a line is half read
            return
        self._transport.close()

    def stop_reading(self) -> None:
        """Server stop: take no more lines; close once the pending replies are out."""
        if self._transport is not None and not self._paused:
            self._transport.pause_reading()
        self._eof = True
        self.flush()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


# ---------------------------------------------------------------------------------------
# Binding


def _bind_unix(path: str) -> socket.socket:
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise ServerError(f"cannot create {directory}: {exc.strerror or exc}") from exc
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask makes bind() create the file 0660 at once: a chmod afterwards would
    # leave a moment in which any local user could connect.
    old_umask = os.umask(0o117)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ServerError(f"cannot bind {path}: {exc.strerror or exc}") from exc
    finally:
        os.umask(old_umask)
    os.chmod(path, _SOCKET_MODE)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ServerError(f"{path} exists and is not a socket; refusing to replace it")
    if _answers(path):
        raise ServerError(f"another daemon is listening on {path}")
    log.info("removing stale socket %s", path)
    os.unlink(path)


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise ServerError(f"cannot probe {path}: {exc.strerror or exc}") from exc
    finally:
        probe.close()
    return True


async def _start_tcp(factory: Any, host: str | None, port: int | None) -> asyncio.AbstractServer:
    try:
        loop = asyncio.get_running_loop()
        return await loop.create_server(factory, host, port or 0, reuse_address=True)
    except OSError as exc:
        raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc

