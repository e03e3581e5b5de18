"""The few event-loop calls a job needs to be supervised without a thread of its own.

A supervised child process (:mod:`rbit.supervisor`) and its pipes need to hear when an
fd becomes readable and when a deadline passes, nothing more. :class:`FdLoop` names those calls.
The worker serves them from the AMQP connection's own loop
(:meth:`rbit.amqp.broker.Broker.fd_loop`), so a job starts, runs and is acked on the I/O
thread with no hand-over between threads; :class:`PollLoop` serves them from a single
blocking ``poll`` for a caller that waits for its job (``ShellRunner.run``, and
``python!`` jobs in a child process).

Callbacks run on the loop's thread, one at a time, and must not block.
"""

from __future__ import annotations

import heapq
import itertools
import math
import select
import time
from collections.abc import Callable
from typing import Protocol

#: Cancelled timers the heap may hold before a purge (also: at most half of it).
_PURGE_MIN = 64


class Timer(Protocol):
    def cancel(self) -> None: ...


class FdLoop(Protocol):
    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever ``fd`` is readable (or at EOF or hang-up)."""

    def unwatch(self, fd: int) -> None:
        """Stop watching ``fd``; must be called before it is closed."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Call ``callback()`` once, ``delay`` seconds from now, unless cancelled."""


class _PollTimer:
    __slots__ = ("callback", "_loop")

    def __init__(self, callback: Callable[[], None] | None, loop: PollLoop) -> None:
        self.callback = callback
        self._loop = loop

    def cancel(self) -> None:
        if self.callback is not None:
            self.callback = None
            self._loop._cancelled += 1


class PollLoop:
    """An :class:`FdLoop` run by its caller's thread until a condition holds."""

    def __init__(self) -> None:
        # select.poll, not a selectors object: a few fds for a few milliseconds, where
        # epoll's extra fd and the selectors bookkeeping would cost more than they save.
        self._poll = select.poll()
        self._handlers: dict[int, Callable[[], None]] = {}
        self._timers: list[tuple[float, int, _PollTimer]] = []
        self._order = itertools.count()
        # Cancelled timers still in the heap. A warm child's loop sets a deadline per
        # job and cancels it when the job ends: without a purge, thousands of dead
        # timers (a ``timeout`` apart) would pile up in the heap.
        self._cancelled = 0

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        self._poll.register(fd, select.POLLIN)
        self._handlers[fd] = callback

    def unwatch(self, fd: int) -> None:
        self._poll.unregister(fd)
        del self._handlers[fd]

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        if self._cancelled > _PURGE_MIN and self._cancelled * 2 > len(self._timers):
            self._purge()
        timer = _PollTimer(callback, self)
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._order), timer))
        return timer

    @property
    def poller(self) -> select.poll:
        """The poll object every watched fd is registered with.

        For a caller that waits for one fd by itself while no timer is due (see
        :meth:`has_timers`); whatever else it finds ready is left for :meth:`run_until`
        (poll is level-triggered: it is still ready then).
        """
        return self._poll

    def has_timers(self) -> bool:
        """Whether a timer not cancelled is waiting."""
        return self._cancelled < len(self._timers)

    def run_until(self, done: Callable[[], bool]) -> None:
        """Dispatch events and timers until ``done()`` is true."""
        timers = self._timers
        while not done():
            while timers and timers[0][2].callback is None:  # cancelled: no wake-up for it
                heapq.heappop(timers)
                self._cancelled -= 1
            timeout = None
            if timers:
                timeout = max(0, math.ceil((timers[0][0] - time.monotonic()) * 1000))
            for fd, _ in self._poll.poll(timeout):
                handler = self._handlers.get(fd)  # None: unwatched by an earlier handler
                if handler is not None:
                    handler()
            while timers and timers[0][0] <= time.monotonic():
                timer = heapq.heappop(timers)[2]
                callback, timer.callback = timer.callback, None
                if callback is not None:
                    callback()
                else:
                    self._cancelled -= 1

    def _purge(self) -> None:
        """Drops cancelled timers from the heap (in place: run_until holds the list)."""
        self._timers[:] = [entry for entry in self._timers if entry[2].callback is not None]
        heapq.heapify(self._timers)
        self._cancelled = 0
