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
import contextlib
import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any, Callable

from rbit.credit.events import CreditEvent
from rbit.credit.protocol import MAX_LINE_BYTES, ProtocolError, parse_line, reply_for
from rbit.errors import RbitError

log = logging.getLogger(__name__)

Publish = Callable[[bytes, str, Callable[[bool], None]], None]

_READ_SIZE = 65536
_SOCKET_MODE = 0o660
_BROKER_UNAVAILABLE = "broker unavailable"


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


def broker_publisher(broker: Any, queue: str) -> Publish:
    """Adapt :class:`rbit.broker.Broker` to the server's publish function.

    Events go to the default exchange, routed straight to ``queue``, as JSON with the
    event id as ``message_id`` (the credit runner de-duplicates on it).
    """

    def publish(body: bytes, message_id: str, on_confirm: Callable[[bool], None]) -> None:
        broker.publish(
            "",
            queue,
            body,
            message_id=message_id,
            content_type="application/json",
            on_confirm=on_confirm,
        )

    return publish


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
        self._connections: set[asyncio.Task[None]] = set()
        self._readers: set[asyncio.Task[None]] = set()
        self._socket_inode: int | None = None

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
        if self._unix_path is not None:
            sock = _bind_unix(self._unix_path)
            self._socket_inode = os.stat(self._unix_path).st_ino
            self._server = await asyncio.start_unix_server(
                self._accept, sock=sock, limit=_READ_SIZE
            )
        else:
            self._server = await _start_tcp(self._accept, self._host, self._port)
        log.info("credit front door listening on %s", self.address)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let lines in flight get their replies, then close.

        Args:
            grace: Seconds to wait for outstanding confirms; connections still waiting
                after that are closed without their replies (those events may or may not
                be in RabbitMQ; the client saw no ``OK``).
        """
        if self._server is not None:
            self._server.close()
        for reader in list(self._readers):
            reader.cancel()
        if self._connections:
            _, late = await asyncio.wait(set(self._connections), timeout=grace)
            for task in late:
                task.cancel()
            if late:
                log.warning("closed %d connection(s) still waiting for confirms", len(late))
                await asyncio.wait(late)
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

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - asyncio always runs the callback as a task
            return
        self._connections.add(task)
        try:
            await _Connection(reader, writer, self._publish, self._limits, self._readers).run()
        except asyncio.CancelledError:
            pass  # stop() gave up on this connection; asyncio's stream glue must not see it
        except Exception:  # noqa: BLE001 - one client must never take the server down
            log.exception("credit connection failed")
        finally:
            self._connections.discard(task)


class _Connection:
    """One client: a reading task feeding futures, a writing loop replying in order."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        publish: Publish,
        limits: Limits,
        readers: set[asyncio.Task[None]],
    ) -> None:
        self._reader, self._writer = reader, writer
        self._publish, self._limits = publish, limits
        self._readers = readers
        self._loop = asyncio.get_running_loop()
        self._replies: asyncio.Queue[asyncio.Future[bytes] | None] = asyncio.Queue(
            limits.in_flight
        )
        self._pending = 0  # lines read whose reply is not written yet
        self._writable = True

    async def run(self) -> None:
        replying = asyncio.create_task(self._write_replies())
        reading = asyncio.create_task(self._read_lines())
        self._readers.add(reading)
        try:
            await asyncio.wait([reading])  # a cancelled read (server stop) is no error
        finally:
            self._readers.discard(reading)
            if not reading.cancelled() and reading.exception() is not None:
                log.warning("credit connection: %s", reading.exception())
            try:
                await self._replies.put(None)
                await replying
            finally:
                replying.cancel()
                self._writer.close()

    # -- reading -------------------------------------------------------------------

    async def _read_lines(self) -> None:
        buffer = bytearray()
        discarding = False  # inside an over-long line, waiting for its end
        while True:
            chunk = await self._read_chunk(buffer)
            if chunk is None:
                continue
            if not chunk:
                break
            buffer += chunk
            discarding = await self._take_lines(buffer, discarding)
        if buffer and not discarding:
            await self._line(bytes(buffer))  # a last line without "\n" still counts

    async def _read_chunk(self, buffer: bytearray) -> bytes | None:
        timeout = self._limits.idle_timeout
        try:
            return await _read_within(self._reader, timeout)
        except asyncio.TimeoutError:
            if self._pending or buffer:
                return None  # not idle: keep waiting
            return b""
        except ConnectionError:
            return b""

    async def _take_lines(self, buffer: bytearray, discarding: bool) -> bool:
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if discarding:
                discarding = False
            else:
                await self._line(line)
        if not discarding and len(buffer) > MAX_LINE_BYTES + 1:
            # Reply now, in order, and drop the rest of the line as it arrives.
            await self._refuse(ProtocolError("line too long"))
            buffer.clear()
            discarding = True
        elif discarding:
            buffer.clear()
        return discarding

    async def _line(self, raw: bytes) -> None:
        if not raw.strip():
            return  # blank lines (e.g. "\r\n" keep-alives) get no reply
        try:
            event = parse_line(raw)
        except ProtocolError as exc:
            log.info("refused a credit line: %s", exc.reason)
            await self._refuse(exc)
            return
        await self._enqueue(self._published(event))

    async def _refuse(self, error: ProtocolError) -> None:
        done: asyncio.Future[bytes] = self._loop.create_future()
        done.set_result(reply_for(error))
        await self._enqueue(done)

    async def _enqueue(self, reply: asyncio.Future[bytes]) -> None:
        self._pending += 1
        await self._replies.put(reply)

    def _published(self, event: CreditEvent) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = self._loop.create_future()

        def on_confirm(ok: bool) -> None:
            # A closed loop (RuntimeError) means nobody waits for this reply any more.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(_settle, future, event, ok)

        try:
            self._publish(event.to_json(), event.id, on_confirm)
        except Exception:  # noqa: BLE001 - any publisher failure means "not counted"
            log.exception("publishing credit event %s failed", event.id)
            _settle(future, event, False)
        return future

    # -- writing -------------------------------------------------------------------

    async def _write_replies(self) -> None:
        while True:
            reply = await self._replies.get()
            if reply is None:
                return
            data = await reply
            self._pending -= 1
            await self._send(data)

    async def _send(self, data: bytes) -> None:
        if not self._writable:
            return
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (ConnectionError, OSError):
            # The client left; keep consuming replies so that every confirm is awaited.
            self._writable = False


async def _read_within(reader: asyncio.StreamReader, timeout: float | None) -> bytes:
    if hasattr(asyncio, "timeout"):
        # Python 3.11+: unlike wait_for, wraps no extra task around every read (about
        # half of the per-connection cost).
        async with asyncio.timeout(timeout):
            return await reader.read(_READ_SIZE)
    return await asyncio.wait_for(reader.read(_READ_SIZE), timeout)


def _settle(future: asyncio.Future[bytes], event: CreditEvent, ok: bool) -> None:
    if future.done():
        return
    if ok:
        log.debug("credit event %s (%s) confirmed", event.id, event.command)
        future.set_result(reply_for(None))
    else:
        log.warning("credit event %s (%s) not confirmed by the broker", event.id, event.command)
        future.set_result(reply_for(ProtocolError(_BROKER_UNAVAILABLE)))


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


async def _start_tcp(accept: Any, host: str | None, port: int | None) -> asyncio.AbstractServer:
    try:
        return await asyncio.start_server(
            accept, host, port or 0, reuse_address=True, limit=_READ_SIZE
        )
    except OSError as exc:
        raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc

