"""The event loops a :class:`~rbit.amqp.broker.Broker` runs on, adapted to its needs.

* :class:`EagerConnection`: pika's ``SelectConnection``, writing a frame at once
  when nothing waits before it (a private pika API: see setup.py's bound on pika);
  it and :class:`SafeAsyncioConnection` take whole deliveries off the wire in one
  step (:mod:`rbit.amqp.inbound`) and survive undecodable content headers;
* :class:`PikaFdLoop` and :class:`PikaTimer`: the :class:`~rbit.fdloop.FdLoop` that
  ``shell!`` jobs are supervised on, served by pika's I/O loop;
* :class:`AsyncioLoop`: the few loop calls the broker makes, served by an asyncio
  event loop (for a program that already runs one, such as the credit front door).
"""

from __future__ import annotations

import asyncio
import select
import threading
from collections.abc import Callable

import pika
from pika.adapters.asyncio_connection import AsyncioConnection
from pika.adapters.select_connection import IOLoop

from rbit.amqp.frames import SafeFrames
from rbit.amqp.inbound import FastDeliveries
from rbit.fdloop import Timer

try:  # pika's transport for plain TCP, to which EagerConnection writes directly
    from pika.adapters.utils.io_services_utils import _AsyncPlaintextTransport
except ImportError:  # another pika layout: frames go out on the loop's next pass
    _AsyncPlaintextTransport = None


class SafeAsyncioConnection(FastDeliveries, SafeFrames, AsyncioConnection):
    """pika's ``AsyncioConnection``, with undecodable content headers substituted."""


class EagerConnection(FastDeliveries, SafeFrames, pika.SelectConnection):
    """pika's ``SelectConnection``, sending a frame at once when nothing waits before it.

    pika buffers every outgoing frame and watches the socket for writability: each
    ack cost a pass of the loop and two ``epoll_ctl`` calls before it left. With one
    job at a time the broker sends the next job only once the ack arrived, so that
    pass was a share of every short job. Whatever the socket does not take at once
    (or any error) goes pika's way. Plain TCP only; TLS keeps pika's own course.
    Whole deliveries are decoded in one step (:class:`~rbit.amqp.inbound.FastDeliveries`);
    content headers that cannot be decoded are substituted
    (:class:`~rbit.amqp.frames.SafeFrames`).
    """

    def _adapter_emit_data(self, data: bytes) -> None:
        transport = self._transport
        if (
            transport.__class__ is _AsyncPlaintextTransport
            and transport._state == transport._STATE_ACTIVE  # noqa: SLF001
            and not transport.get_write_buffer_size()
        ):
            try:
                sent = transport._sock.send(data)  # noqa: SLF001 -- non-blocking socket
            except OSError:  # EAGAIN, or a fault pika's own write will meet and report
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        super()._adapter_emit_data(data)


class PikaFdLoop:
    """:class:`~rbit.fdloop.FdLoop` on pika's I/O loop.

    The watched fds go into an epoll of their own, which pika watches as a single fd:
    a job's fds then cost one system call each to add and remove, instead of a pass
    through pika's handler bookkeeping (it showed in the profile of short jobs).
    """

    def __init__(self, ioloop: IOLoop) -> None:
        self._ioloop = ioloop
        self._epoll: select.epoll | None = None
        self._handlers: dict[int, Callable[[], None]] = {}

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        if self._epoll is None:
            self._epoll = select.epoll()
            self._ioloop.add_handler(self._epoll.fileno(), self._dispatch, IOLoop.READ)
        self._epoll.register(fd, select.EPOLLIN)
        self._handlers[fd] = callback

    def unwatch(self, fd: int) -> None:
        if self._epoll is not None:
            self._epoll.unregister(fd)
        del self._handlers[fd]

    def _dispatch(self, _fd: int, _events: int) -> None:
        handlers = self._handlers
        for fd, _ in self._epoll.poll(0) if self._epoll is not None else ():
            handler = handlers.get(fd)  # None: unwatched by an earlier handler
            if handler is not None:
                handler()

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        return PikaTimer(self._ioloop, self._ioloop.call_later(delay, callback))


class PikaTimer:
    """A :class:`~rbit.fdloop.Timer` of pika's I/O loop."""

    def __init__(self, ioloop: IOLoop, handle: object) -> None:
        self._ioloop, self._handle = ioloop, handle

    def cancel(self) -> None:
        self._ioloop.remove_timeout(self._handle)


class AsyncioLoop:
    """The few I/O loop calls the broker makes, served by an asyncio event loop.

    Args:
        loop: The caller's event loop; it keeps running when the broker stops.
        on_stop: Called where pika's own loop would stop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_stop: Callable[[], None]) -> None:
        self._loop, self._on_stop = loop, on_stop
        self._thread: int | None = None

    def on_loop_thread(self) -> bool:
        return threading.get_ident() == self._thread

    def add_callback_threadsafe(self, callback: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = threading.get_ident()  # start() runs on the loop's thread
        if threading.get_ident() == self._thread:
            self._loop.call_soon(callback)  # no self-pipe write on the loop's own thread
        else:
            self._loop.call_soon_threadsafe(callback)

    def call_later(self, delay: float, callback: Callable[[], None]):
        return self._loop.call_later(delay, callback)

    def stop(self) -> None:
        self._on_stop()
