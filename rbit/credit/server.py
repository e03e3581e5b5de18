"""The front door's socket server: protocol lines in, confirmed publishes out.

Each accepted line becomes one :class:`~rbit.credit.events.CreditEvent` handed to an
injected *publish* function; the client gets ``OK`` only once the broker confirmed the
message, so an ``OK`` means the event is safely in RabbitMQ. A connection may pipeline
many lines: they are all published at once and their replies come back in line order as
the confirms arrive.

The publisher is any callable ``publish(body, message_id, on_confirm)`` that is safe to
call from the event loop's thread, does not block, and later calls
``on_confirm(True|False)`` from any thread (:func:`broker_publisher` adapts
:class:`rbit.amqp.broker.Broker`).
"""

from __future__ import annotations

import _socket
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

from rbit.amqp import records
from rbit.credit.protocol import MAX_LINE_BYTES, ProtocolError, parse_line, reply_for
from rbit.errors import RbitError

log = logging.getLogger(__name__)

Publish = Callable[[bytes, str, Callable[[bool], None]], None]

_SOCKET_MODE = 0o660
_OK = reply_for(None)
_UNAVAILABLE = reply_for(ProtocolError("broker unavailable"))
_TOO_LONG = reply_for(ProtocolError("line too long"))

# Accepted sockets stay in blocking mode (saving a syscall each); every recv and
# send on them passes MSG_DONTWAIT instead.
_DONTWAIT = socket.MSG_DONTWAIT
_RECV_SIZE = 65536
_READS_PER_PASS = 16  # then let other connections have their turn
_ACCEPTS_PER_PASS = 256
_ACCEPT_RETRY = 1.0  # seconds to pause accepting when out of descriptors
_OUT_LIMIT = 65536  # unsent reply bytes before a connection stops being read


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
    """Adapt :class:`rbit.amqp.broker.Broker` to the server's publish function.

    Events go to the default exchange, routed straight to ``queue``, as JSON with the
    event id as ``message_id`` (the credit runner de-duplicates on it). The server
    hands over every line of one event-loop pass at once (:meth:`publish_many`), so the
    broker's I/O loop is woken once per pass, not once per line.
    """

    def __init__(self, broker: Any, queue: str) -> None:
        self._broker, self._queue, self._new = broker, queue, records.Publish

    def _message(self, body: bytes, message_id: str):
        return self._new("", self._queue, body, message_id=message_id,
                         content_type="application/json")

    def __call__(self, body: bytes, message_id: str, on_confirm: Callable[[bool], None]) -> None:
        self._broker.send(self._message(body, message_id), on_confirm)

    def publish_many(self, items: list[tuple[bytes, str, Callable[[bool], None]]]) -> None:
        message = self._message
        self._broker.send_many([(message(b, i), cb) for b, i, cb in items])


def broker_publisher(broker: Any, queue: str) -> BrokerPublisher:
    """The publish function for ``broker`` (see :class:`BrokerPublisher`)."""
    return BrokerPublisher(broker, queue)


class CreditServer:
    """Listens on a unix socket or TCP and serves the credit line protocol.

    Connections are plain non-blocking sockets driven by the event loop's readiness
    callbacks, not asyncio transports: most clients send one line and half-close at
    once (``echo ... | nc -U``), and such a connection is served by one accept, two
    reads, one write and a close, without ever being registered with the selector.

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
        self._listeners: list[socket.socket] = []
        self._shared: _Shared | None = None
        self._socket_inode: int | None = None
        self._stopping = False

    @property
    def address(self) -> str | tuple[str, int]:
        """The unix socket path, or the bound ``(host, port)``."""
        if self._unix_path is not None:
            return self._unix_path
        if not self._listeners:
            raise ServerError("the server is not started")
        return self._listeners[0].getsockname()[:2]

    async def start(self) -> None:
        """Bind and start accepting connections.

        Raises:
            ServerError: The address is in use (another daemon answers on the unix
                socket, or the TCP port is taken) or cannot be bound.
        """
        loop = asyncio.get_running_loop()
        self._shared = _Shared(loop, self._publish, self._limits, tcp=self._unix_path is None)
        if self._unix_path is not None:
            self._listeners = [_bind_unix(self._unix_path)]
            self._socket_inode = os.stat(self._unix_path).st_ino
        else:
            self._listeners = _bind_tcp(self._host, self._port)
        for listener in self._listeners:
            loop.add_reader(listener.fileno(), self._accept, listener)
        log.info("credit front door listening on %s", self.address)

    def _accept(self, listener: socket.socket) -> None:
        shared = self._shared
        family, kind, proto = shared.socket_kind(listener)
        for _ in range(_ACCEPTS_PER_PASS):
            try:
                # _accept() gives the bare descriptor; socket.accept() would wrap it in
                # a Python-level socket object, which costs more than the accept itself.
                fd, _ = listener._accept()
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._accept_failed(listener, exc)
                break
            _Connection(_socket.socket(family, kind, proto, fd), shared).open()
        # Most lines arrive with their connection: publish this batch now rather than
        # on the next pass of the loop.
        shared.outbox.flush()

    def _accept_failed(self, listener: socket.socket, exc: OSError) -> None:
        # Out of descriptors or memory: the listener stays readable, so retrying at
        # once would spin. Pause accepting for a moment instead.
        log.error("cannot accept a connection: %s; retrying in %.0f s",
                  exc.strerror or exc, _ACCEPT_RETRY)
        loop = self._shared.loop
        loop.remove_reader(listener.fileno())
        loop.call_later(_ACCEPT_RETRY, self._resume_accepting, listener)

    def _resume_accepting(self, listener: socket.socket) -> None:
        if not self._stopping:
            self._shared.loop.add_reader(listener.fileno(), self._accept, listener)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let lines in flight get their replies, then close.

        Args:
            grace: Seconds to wait for outstanding confirms; connections still waiting
                after that are closed without their replies (those events may or may not
                be in RabbitMQ; the client saw no ``OK``).
        """
        self._stopping = True
        self._close_listeners()
        if self._shared is not None:
            await self._drain_connections(self._shared, grace)
        self._remove_socket_file()

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            if self._shared is not None:
                self._shared.loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners = []

    @staticmethod
    async def _drain_connections(shared: _Shared, grace: float) -> None:
        connections = shared.connections
        for connection in list(connections):
            connection.stop_reading()
        deadline = shared.loop.time() + grace
        while connections and shared.loop.time() < deadline:
            await asyncio.sleep(0.01)
        if connections:
            log.warning("closed %d connection(s) still waiting for confirms", len(connections))
            for connection in list(connections):
                connection.abort()

    def _remove_socket_file(self) -> None:
        # Only our own socket: a newer daemon may have replaced it in the meantime.
        path = self._unix_path
        try:
            if path is not None and os.stat(path).st_ino == self._socket_inode:
                os.unlink(path)
        except FileNotFoundError:
            pass


class _Shared:
    """What every connection of one server uses: loop, outbox, confirms, limits."""

    def __init__(self, loop: asyncio.AbstractEventLoop, publish: Publish, limits: Limits,
                 *, tcp: bool) -> None:
        self.loop = loop
        self.loop_thread = threading.get_ident()
        self.outbox = _Outbox(loop, publish)
        self.confirms = _ConfirmQueue(loop)
        self.in_flight = limits.in_flight
        timeout = limits.idle_timeout
        self.idle_timeout = timeout if timeout is not None and timeout > 0 else None
        self.tcp = tcp
        self.connections: set[_Connection] = set()
        self._kinds: dict[int, tuple[int, int, int]] = {}

    def socket_kind(self, listener: socket.socket) -> tuple[int, int, int]:
        """Family, type and protocol for sockets accepted on ``listener``."""
        kind = self._kinds.get(listener.fileno())
        if kind is None:
            kind = (int(listener.family), int(listener.type), listener.proto)
            self._kinds[listener.fileno()] = kind
        return kind


class _ConfirmQueue:
    """Confirms from a broker on another thread are applied by the loop in batches.

    One wake-up of the loop (``call_soon_threadsafe``) serves every confirm queued
    before it runs, instead of one wake-up per event. (A broker on the server's own
    loop -- the daemon's case -- has its confirms applied at once, see :class:`_Reply`.)
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[tuple[_Reply, bool]] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, reply: _Reply, ok: bool) -> None:
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
        self._items: list[tuple[bytes, str, _Reply]] = []

    def put(self, body: bytes, event_id: str, reply: _Reply) -> None:
        """Publish ``body`` at the end of this pass; ``reply`` is its ``on_confirm``."""
        if not self._items:
            self._loop.call_soon(self.flush)
        self._items.append((body, event_id, reply))

    def flush(self) -> None:
        items = self._items
        if not items:
            return  # already published by an earlier flush in this pass
        self._items = []
        if self._many is not None:
            try:
                self._many(items)
            except Exception:  # noqa: BLE001 - any publisher failure means "not counted"
                log.exception("publishing %d credit events failed", len(items))
                for *_, reply in items:
                    reply.refuse()
            return
        for body, event_id, reply in items:
            try:
                self._publish(body, event_id, reply)
            except Exception:  # noqa: BLE001 - any publisher failure means "not counted"
                log.exception("publishing credit event %s failed", event_id)
                reply.refuse()


class _Reply:
    """One line's reply slot: filled at once (ER) or when the broker confirms.

    A pending reply is itself the publisher's ``on_confirm`` callback (one object
    per line instead of a reply and a closure).
    """

    __slots__ = ("owner", "data", "event_id")

    def __init__(self, owner: _Connection, data: bytes | None, event_id: str | None = None):
        self.owner, self.data, self.event_id = owner, data, event_id

    def __call__(self, ok: bool) -> None:
        shared = self.owner.shared
        if threading.get_ident() == shared.loop_thread:  # a broker on our own loop
            self.settle(ok)
            self.owner.flush()
        else:
            shared.confirms.put(self, ok)

    def settle(self, ok: bool) -> None:
        if self.data is not None:
            return
        if ok:
            self.data = _OK
        else:
            log.warning("credit event %s not confirmed by the broker", self.event_id)
            self.data = _UNAVAILABLE

    def refuse(self) -> None:
        """The publisher failed: answer "broker unavailable" (on the loop's thread)."""
        self.settle(False)
        self.owner.flush()


class _Connection:
    """One client connection: lines in, replies out in line order.

    The socket is read until it would block; it is registered with the loop for
    reading only while more input may come, and for writing only while a reply does
    not fit into the socket buffer.
    """

    __slots__ = ("shared", "_sock", "_fd", "_replies", "_buffer", "_discarding", "_eof",
                 "_reading", "_closed", "_out", "_last_input", "_idle")

    def __init__(self, sock: _socket.socket, shared: _Shared) -> None:
        self.shared = shared
        self._sock, self._fd = sock, sock.fileno()
        self._replies: collections.deque[_Reply] = collections.deque()
        self._buffer = b""  # a line not yet complete
        self._discarding = False  # inside an over-long line, waiting for its end
        self._eof = False  # no more input will be read (client half-closed, or stop)
        self._reading = False  # registered with the loop for reading
        self._closed = False
        self._out = b""  # replies the socket did not take yet
        self._last_input = 0.0
        self._idle: asyncio.TimerHandle | None = None

    def open(self) -> None:
        """Start serving: read what is there already, then wait for more if needed."""
        shared = self.shared
        shared.connections.add(self)
        if shared.tcp:
            # Replies are tiny: without this a pipelining client's second reply waits
            # for the first one's (delayed) ACK. (A client already gone is found out
            # by the first read.)
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._receive()
        self.flush()
        if not (self._eof or self._closed) and shared.idle_timeout is not None:
            self._last_input = shared.loop.time()
            self._idle = shared.loop.call_later(shared.idle_timeout, self._on_idle)

    # -- input -------------------------------------------------------------------

    def _on_readable(self) -> None:
        if self._idle is not None:
            self._last_input = self.shared.loop.time()
        self._receive()
        self.flush()

    def _receive(self) -> None:
        # Read until the socket would block, so that a line and the client's
        # half-close are both taken in one pass, without another trip through epoll.
        sock, limit = self._sock, self.shared.in_flight
        for _ in range(_READS_PER_PASS):
            try:
                data = sock.recv(_RECV_SIZE, _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # reset by the client: its replies have nowhere to go
                self._close()
                return
            if not data:
                self._end_of_input()
                return
            self._feed(data)
            if len(self._replies) >= limit:
                return  # back-pressure: flush() stops reading until replies went out

    def _end_of_input(self) -> None:
        if self._buffer and not self._discarding:
            self._line(self._buffer)  # a last line without "\n" still counts
        self._buffer = b""
        self._eof = True
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _feed(self, data: bytes) -> None:
        if self._buffer:
            data, self._buffer = self._buffer + data, b""
        start = 0
        if self._discarding:
            start = data.find(b"\n") + 1
            if not start:
                return
            self._discarding = False
        find, line = data.find, self._line
        end = find(b"\n", start)
        while end >= 0:
            line(data[start:end])
            start = end + 1
            end = find(b"\n", start)
        if start < len(data):
            rest = data[start:]
            if len(rest) > MAX_LINE_BYTES + 1:
                # Reply now, in order, and drop the rest of the line as it arrives.
                self._replies.append(_Reply(self, _TOO_LONG))
                self._discarding = True
            else:
                self._buffer = rest

    def _line(self, raw: bytes) -> None:
        if not raw.strip():
            return  # blank lines (e.g. "\r\n" keep-alives) get no reply
        try:
            event = parse_line(raw)
        except ProtocolError as exc:
            log.info("refused a credit line: %s", exc.reason)
            self._replies.append(_Reply(self, reply_for(exc)))
            return
        reply = _Reply(self, None, event.id)
        self._replies.append(reply)
        self.shared.outbox.put(event.to_json(), event.id, reply)

    # -- replies -----------------------------------------------------------------

    def flush(self) -> None:
        """Write the replies that are ready, in line order; close when all is said."""
        replies = self._replies
        if self._closed:
            replies.clear()
            return
        if replies and replies[0].data is not None:
            data = replies.popleft().data
            if replies and replies[0].data is not None:
                out = [data]
                while replies and replies[0].data is not None:
                    out.append(replies.popleft().data)
                data = b"".join(out)
            self._write(data)
            if self._closed:
                return
        if self._eof and not replies and not self._out:
            self._close()
        else:
            self._update_reading()

    def _write(self, data: bytes) -> None:
        if self._out:
            self._out += data
            return
        try:
            sent = self._sock.send(data, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the client is gone
            self._close()
            return
        if sent < len(data):
            self._out = data[sent:]
            self.shared.loop.add_writer(self._fd, self._on_writable)

    def _on_writable(self) -> None:
        try:
            sent = self._sock.send(self._out, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close()
            return
        self._out = self._out[sent:]
        if not self._out:
            self.shared.loop.remove_writer(self._fd)
            self.flush()

    def _update_reading(self) -> None:
        # Back-pressure on a client that sends lines but never reads its replies.
        want = not self._eof and (len(self._replies) < self.shared.in_flight
                                  and len(self._out) < _OUT_LIMIT)
        if want != self._reading:
            self._reading = want
            if want:
                self.shared.loop.add_reader(self._fd, self._on_readable)
            else:
                self.shared.loop.remove_reader(self._fd)

    # -- idle and close ----------------------------------------------------------

    def _on_idle(self) -> None:
        self._idle = None
        if self._closed or self._eof:
            return
        timeout = self.shared.idle_timeout
        loop = self.shared.loop
        if self._replies or self._buffer or self._out:
            quiet = 0.0  # not idle: a reply is still due or a line is half read
        else:
            quiet = loop.time() - self._last_input
            if quiet >= timeout:
                self._close()
                return
        # One timer per connection, re-armed when it fires rather than on every read.
        self._idle = loop.call_later(timeout - quiet, self._on_idle)

    def stop_reading(self) -> None:
        """Server stop: take no more lines; close once the pending replies are out."""
        if not self._closed:
            self._buffer = b""  # a half-sent line is not a line
            self._eof = True
            self.flush()

    def abort(self) -> None:
        """Close at once; replies still due are lost."""
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = self.shared.loop
        if self._reading:
            loop.remove_reader(self._fd)
        if self._out:
            loop.remove_writer(self._fd)
            self._out = b""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._sock.close()
        self._replies.clear()
        self.shared.connections.discard(self)


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


def _bind_tcp(host: str | None, port: int | None) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to (as asyncio does)."""
    try:
        infos = socket.getaddrinfo(host, port or 0, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            listeners.append(_listen_tcp(family, kind, proto, address))
    except OSError as exc:
        for listener in listeners:
            listener.close()
        raise ServerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return listeners


def _listen_tcp(family: int, kind: int, proto: int, address: Any) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock

