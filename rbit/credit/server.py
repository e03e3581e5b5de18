"""The front door's socket server: protocol lines in, confirmed publishes out.

Each accepted line becomes one :class:`~rbit.credit.events.CreditEvent` handed to an
injected *publish* function; the client gets ``OK`` only once the broker confirmed the
message, so an ``OK`` means the event is safely in RabbitMQ. A connection may pipeline
many lines: they are all published at once and their replies come back in line order as
the confirms arrive.

The front door never lies and never hangs (see docs/credits.rst, "Replies"):

* every line is answered within :attr:`Limits.reply_timeout` of its arrival; a line
  whose confirm did not come by then is answered ``ER not confirmed``;
* ``ER broker unavailable`` means the event was never written to the broker and never
  will be: with :class:`BrokerPublisher` nothing is held for a later connection;
* an event that no queue took (the credit queue was deleted) is answered ``ER credit
  queue missing``, and the queue is declared again for the lines after it;
* a line must be complete within :attr:`Limits.line_timeout` of its first byte, and a
  client must take its replies within as long, else it is closed; at most
  :attr:`Limits.max_connections` clients are served at once.

The publisher is any callable ``publish(body, message_id, on_confirm)`` that is safe to
call from the event loop's thread, does not block, and later calls
``on_confirm(True|False)`` from any thread (``False`` is answered ``ER not
confirmed``). If ``on_confirm`` has a ``fail(reason)`` method the publisher may call that
instead, with a reason of :mod:`rbit.amqp.records` (``NOT_SENT``, ``NOT_CONFIRMED``,
``RETURNED``). :func:`broker_publisher` adapts :class:`rbit.amqp.broker.Broker`.

The server is the credit protocol's by default; a :class:`LineProtocol` makes it serve
other lines with the same discipline (a ``listen`` schedule's, :mod:`rbit.schedule.listen`).
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from rbit.amqp import records
from rbit.credit.protocol import MAX_LINE_BYTES, ProtocolError, parse_line, reply_for
from rbit.credit.stats import LineStats
from rbit.errors import RbitError
from rbit.topology import QueueDecl

log = logging.getLogger(__name__)

Publish = Callable[[bytes, str, Callable[[bool], None]], None]
#: A line (without its newline) -> (body, message id, stats command or None) to publish, or
#: None to skip it; raises ProtocolError for an ``ER``.
Parse = Callable[[bytes], tuple[bytes, str, str | None] | None]

_SOCKET_MODE = 0o660
_OK = reply_for(None)
_UNAVAILABLE = reply_for(ProtocolError("broker unavailable"))
_NOT_CONFIRMED = reply_for(ProtocolError("not confirmed"))
_RETURNED = reply_for(ProtocolError("credit queue missing"))
_TOO_LONG = reply_for(ProtocolError("line too long"))
_LINE_TIMEOUT = reply_for(ProtocolError("line not completed in time"))
_TOO_MANY = reply_for(ProtocolError("too many connections"))
_FAILURES = {records.NOT_SENT: _UNAVAILABLE, records.NOT_CONFIRMED: _NOT_CONFIRMED,
             records.RETURNED: _RETURNED}

# Accepted sockets stay in blocking mode (saving a syscall each); every recv and
# send on them passes MSG_DONTWAIT instead.
_DONTWAIT = socket.MSG_DONTWAIT
_RECV_SIZE = 65536
_READS_PER_PASS = 16  # then let other connections have their turn
_ACCEPTS_PER_PASS = 256
_ACCEPT_RETRY = 1.0  # seconds to pause accepting when out of descriptors
_OUT_LIMIT = 65536  # unsent reply bytes before a connection stops being read


def parse_credit_line(raw: bytes) -> tuple[bytes, str, str | None] | None:
    """The credit protocol's :data:`Parse`: blank lines (keep-alives) get no reply."""
    if not raw.strip():
        return None
    event = parse_line(raw)
    return event.to_json(), event.id, event.command


@dataclass(frozen=True)
class LineProtocol:
    """What the server does with the lines it reads.

    Attributes:
        parse: See :data:`Parse`.
        ok_reply: The reply of a confirmed line, from its message id (None: ``OK``).
        max_line: The longest line, in bytes; a longer one is answered ``ER line too
            long`` (:attr:`parse` must refuse a complete one that is longer).
        returned: The reply when no queue took the message.
        label: What the log calls a line's message.
    """

    parse: Parse = parse_credit_line
    ok_reply: Callable[[str], bytes] | None = None
    max_line: int = MAX_LINE_BYTES
    returned: bytes = _RETURNED
    label: str = "credit event"


CREDIT = LineProtocol()


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
        reply_timeout: Every line is answered within this many seconds; a line whose
            confirm has not come by then is answered ``ER not confirmed``.
        line_timeout: Seconds from a line's first byte to its end, and for a client to
            take the replies it is sent; a client slower than that is answered ``ER
            line not completed in time`` (if it still reads) and closed.
        max_connections: Clients served at once; one more is answered ``ER too many
            connections`` and closed at once.
    """

    in_flight: int = 1024
    idle_timeout: float | None = 1.0
    reply_timeout: float = 5.0
    line_timeout: float = 10.0
    max_connections: int = 1000


class BrokerPublisher:
    """Adapt :class:`rbit.amqp.broker.Broker` to the server's publish function.

    Events go to the default exchange, routed straight to ``queue``, as JSON with the
    event id as ``message_id`` (the credit runner de-duplicates on it). The server
    hands over every line of one event-loop pass at once (:meth:`publish_many`), so the
    broker's I/O loop is woken once per pass, not once per line.

    Publishes are mandatory (a deleted queue is noticed, answered and declared again)
    and fail fast: while there is no connection, or a resource alarm blocks it, a line
    is refused at once rather than held. A held line would be published after the
    reconnect although its client already had its ``ER`` -- and a client that retried
    would be counted twice.
    """

    def __init__(self, broker: Any, queue: str,
                 arguments: Mapping[str, Any] | None = None) -> None:
        self._broker, self._queue, self._new = broker, queue, records.Publish
        # Declared as the daemon's topology declares it (a quorum queue in a cluster).
        self._declare = QueueDecl(queue, arguments=MappingProxyType(dict(arguments or {})))

    def _message(self, body: bytes, message_id: str, on_confirm: Callable[[bool], None]):
        return self._new("", self._queue, body, message_id=message_id,
                         content_type="application/json", declare=self._declare,
                         mandatory=True, fail_fast=True,
                         on_failure=getattr(on_confirm, "fail", None))

    def __call__(self, body: bytes, message_id: str, on_confirm: Callable[[bool], None]) -> None:
        self._broker.send(self._message(body, message_id, on_confirm), on_confirm)

    def publish_many(self, items: list[tuple[bytes, str, Callable[[bool], None]]]) -> None:
        message = self._message
        self._broker.send_many([(message(b, i, cb), cb) for b, i, cb in items])


def broker_publisher(broker: Any, queue: str,
                     arguments: Mapping[str, Any] | None = None) -> BrokerPublisher:
    """The publish function for ``broker`` (see :class:`BrokerPublisher`).

    Args:
        broker: A started :class:`rbit.amqp.broker.Broker`.
        queue: The credit queue.
        arguments: Its declaration arguments (``CreditSettings.credit_queue_arguments``).
    """
    return BrokerPublisher(broker, queue, arguments)


class LineServer:
    """Listens on a unix socket or TCP and serves the credit line protocol (or another).

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
        protocol: The lines served (default: the credit protocol).
    """

    def __init__(
        self,
        publish: Publish,
        *,
        unix_path: str | None = None,
        host: str | None = None,
        port: int | None = None,
        limits: Limits = Limits(),
        protocol: LineProtocol = CREDIT,
    ) -> None:
        if (unix_path is None) == (host is None):
            raise ValueError("give either unix_path or host and port")
        self._publish = publish
        self._unix_path = unix_path
        self._host, self._port = host, port
        self._limits = limits
        self._protocol = protocol
        self._listeners: list[socket.socket] = []
        self._shared: _Shared | None = None
        self._socket_inode: int | None = None
        self._stopping = False
        #: Lines by command and result, reply latency, confirms due (for the metrics).
        self.stats = LineStats()

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
        self._shared = _Shared(loop, self._publish, self._limits, tcp=self._unix_path is None,
                               stats=self.stats, protocol=self._protocol)
        if self._unix_path is not None:
            self._listeners = [_bind_unix(self._unix_path)]
            self._socket_inode = os.stat(self._unix_path).st_ino
        else:
            self._listeners = _bind_tcp(self._host, self._port)
        for listener in self._listeners:
            loop.add_reader(listener.fileno(), self._accept, listener)
        log.info("%s front door listening on %s", self._protocol.label, self.address)

    def _accept(self, listener: socket.socket) -> None:
        shared = self._shared
        family, kind, proto = shared.socket_kind(listener)
        connections, most = shared.connections, shared.max_connections
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
            sock = _socket.socket(family, kind, proto, fd)
            if len(connections) >= most:
                _turn_away(sock, shared.label)
                continue
            _Connection(sock, shared).open()
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
            self._shared.deadlines.cancel()
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


#: The server under the name the credit front door knows it by.
CreditServer = LineServer


def _turn_away(sock: _socket.socket, label: str) -> None:
    """One client too many: say so at once rather than leave it waiting."""
    log.warning("too many clients at once (%s front door); one turned away", label)
    with contextlib.suppress(OSError):
        sock.send(_TOO_MANY, _DONTWAIT)
    sock.close()


class _Shared:
    """What every connection of one server uses: loop, outbox, confirms, limits."""

    def __init__(self, loop: asyncio.AbstractEventLoop, publish: Publish, limits: Limits,
                 *, tcp: bool, stats: LineStats | None = None,
                 protocol: LineProtocol = CREDIT) -> None:
        self.loop = loop
        self.parse, self.ok_reply = protocol.parse, protocol.ok_reply
        self.max_line, self.label = protocol.max_line, protocol.label
        self.failures = {**_FAILURES, records.RETURNED: protocol.returned}
        self.stats = LineStats() if stats is None else stats
        self.loop_thread = threading.get_ident()
        self.deadlines = _ReplyDeadlines(loop, limits.reply_timeout)
        self.outbox = _Outbox(loop, publish, self.deadlines)
        self.confirms = _ConfirmQueue(loop)
        self.in_flight = limits.in_flight
        timeout = limits.idle_timeout
        self.idle_timeout = timeout if timeout is not None and timeout > 0 else None
        self.line_timeout = limits.line_timeout
        self.max_connections = limits.max_connections
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
        self._items: collections.deque[tuple[_Reply, bytes]] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, reply: _Reply, data: bytes) -> None:
        self._items.append((reply, data))
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
            reply, data = items.popleft()
            reply.settle(data)
            touched.add(reply.owner)
        for owner in touched:
            owner.flush()


class _ReplyDeadlines:
    """Every published line is answered within ``timeout`` seconds, confirmed or not.

    Kept per publish batch (one entry for all the lines of one loop pass, in the
    order they were published, so the oldest deadline is always first) and checked by
    one timer, armed only while something waits.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._loop, self._timeout = loop, timeout
        self._batches: collections.deque[tuple[float, list]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, items: list[tuple[bytes, str, _Reply]]) -> None:
        """Answer ``items``' replies (the last element of each) in time."""
        when = self._loop.time() + self._timeout
        self._batches.append((when, items))
        if self._timer is None:
            self._timer = self._loop.call_at(when, self._expire)

    def _expire(self) -> None:
        self._timer = None
        now, batches = self._loop.time(), self._batches
        late: set[_Connection] = set()
        while batches and batches[0][0] <= now:
            for *_, reply in batches.popleft()[1]:
                if reply.data is None:
                    reply.settle(_NOT_CONFIRMED)
                    late.add(reply.owner)
        for owner in late:
            owner.flush()
        if batches:
            self._timer = self._loop.call_at(batches[0][0], self._expire)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._batches.clear()


class _Outbox:
    """Lines accepted during one pass of the event loop, published together."""

    def __init__(self, loop: asyncio.AbstractEventLoop, publish: Publish,
                 deadlines: _ReplyDeadlines) -> None:
        self._loop, self._publish, self._deadlines = loop, publish, deadlines
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
        self._deadlines.add(items)
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
    """One line's reply slot: filled at once (ER), on the broker's confirm, or late.

    A pending reply is itself the publisher's ``on_confirm`` callback (one object
    per line instead of a reply and a closure). The first answer wins: a confirm that
    comes after the reply timeout answered ``ER not confirmed`` changes nothing.
    """

    __slots__ = ("owner", "data", "event_id", "command", "read_at")

    def __init__(self, owner: _Connection, data: bytes | None, event_id: str | None = None,
                 command: str | None = None, read_at: float = 0.0):
        self.owner, self.data, self.event_id = owner, data, event_id
        self.command, self.read_at = command, read_at  # a published line's, for the stats

    def __call__(self, ok: bool) -> None:
        data = _OK if ok else _NOT_CONFIRMED
        shared = self.owner.shared
        if threading.get_ident() == shared.loop_thread:  # a broker on our own loop
            self.settle(data)
            self.owner.flush()
        else:
            shared.confirms.put(self, data)

    def fail(self, reason: str) -> None:
        """The publish failed for ``reason`` (one of :mod:`rbit.amqp.records`')."""
        shared = self.owner.shared
        data = shared.failures.get(reason, _NOT_CONFIRMED)
        if threading.get_ident() == shared.loop_thread:
            self.settle(data)
            self.owner.flush()
        else:
            shared.confirms.put(self, data)

    def settle(self, data: bytes) -> None:
        if self.data is not None:
            return
        shared = self.owner.shared
        ok = data is _OK
        if not ok:
            log.warning("%s %s answered %s", shared.label, self.event_id,
                        data.decode("utf-8", "replace").strip())
        elif shared.ok_reply is not None:
            data = shared.ok_reply(self.event_id)
        self.data = data
        if self.command is not None:
            shared.stats.replied(self.command, ok, shared.loop.time() - self.read_at)

    def refuse(self) -> None:
        """The publisher raised: the event was not sent (on the loop's thread)."""
        self.settle(_UNAVAILABLE)
        self.owner.flush()


class _Connection:
    """One client connection: lines in, replies out in line order.

    The socket is read until it would block; it is registered with the loop for
    reading only while more input may come, and for writing only while a reply does
    not fit into the socket buffer. A connection not finished in its first pass has
    one timer, re-armed when it fires: it closes the connection when idle, when a line
    takes longer than the line timeout, or when the client stops taking its replies.
    """

    __slots__ = ("shared", "_sock", "_fd", "_replies", "_buffer", "_discarding", "_eof",
                 "_reading", "_closed", "_out", "_last_input", "_line_start", "_out_since",
                 "_timer")

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
        self._last_input = 0.0  # loop time of the last read
        self._line_start = 0.0  # loop time of the first byte of the incomplete line
        self._out_since = 0.0  # loop time since which _out has not shrunk
        self._timer: asyncio.TimerHandle | None = None

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
        self._last_input = shared.loop.time()
        self._receive()
        self.flush()
        if not (self._eof or self._closed) and self._timer is None:
            self._arm(self._last_input + (shared.idle_timeout or shared.line_timeout))

    # -- input -------------------------------------------------------------------

    def _on_readable(self) -> None:
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

    def _feed(self, data: bytes) -> None:
        continued = bool(self._buffer)  # this data goes on with a line begun earlier
        if continued:
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
            if start or not continued:
                self._line_start = self._last_input  # a new line begins in this read
            rest = data[start:]
            if len(rest) > self.shared.max_line + 1:
                # Reply now, in order, and drop the rest of the line as it arrives.
                self._replies.append(_Reply(self, _TOO_LONG))
                self._discarding = True
            else:
                self._buffer = rest

    def _line(self, raw: bytes) -> None:
        shared = self.shared
        try:
            parsed = shared.parse(raw)
        except ProtocolError as exc:
            log.info("refused a line (%s front door): %s", shared.label, exc.reason)
            shared.stats.malformed()
            self._replies.append(_Reply(self, reply_for(exc)))
            return
        if parsed is None:
            return  # e.g. blank credit lines ("\r\n" keep-alives) get no reply
        body, event_id, command = parsed
        reply = _Reply(self, None, event_id, command, shared.loop.time())
        if command is not None:
            shared.stats.sent()
        self._replies.append(reply)
        shared.outbox.put(body, event_id, reply)

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
            loop = self.shared.loop
            loop.add_writer(self._fd, self._on_writable)
            self._out_since = loop.time()
            if self._timer is None:  # the client must take its replies in time
                self._arm(self._out_since + self.shared.line_timeout)

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
        elif sent:
            self._out_since = self.shared.loop.time()

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

    # -- timeouts and close ------------------------------------------------------

    def _arm(self, when: float) -> None:
        self._timer = self.shared.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        due = self._check(self.shared.loop.time())
        if due is not None and not self._closed:
            self._arm(due)

    def _check(self, now: float) -> float | None:
        """Close the connection if a limit ran out; else when to look again."""
        shared = self.shared
        limit = shared.line_timeout
        if self._out:
            if now - self._out_since < limit:
                return self._out_since + limit
            log.info("closed a credit client that took no replies for %.0f s", limit)
            self._close()
            return None
        if self._eof:
            return None  # replies come within the reply timeout; flush() then closes
        if self._buffer or self._discarding:
            if now - self._line_start < limit:
                return self._line_start + limit
            self._line_timed_out(limit)
            return now + limit  # the ER may not fit: see that the client takes it
        if self._replies or shared.idle_timeout is None:
            # Not idle (replies are due), or idle allowed: look again in a while, for a
            # line that may have begun meanwhile.
            return now + min(limit, shared.idle_timeout or limit)
        quiet = now - self._last_input
        if quiet < shared.idle_timeout:
            return self._last_input + shared.idle_timeout
        self._close()
        return None

    def _line_timed_out(self, limit: float) -> None:
        log.info("closing a credit client whose line did not end within %.0f s", limit)
        self._buffer = b""  # a half-sent line is not a line
        self._discarding = False
        self._replies.append(_Reply(self, _LINE_TIMEOUT))
        self._eof = True
        self.flush()

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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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

