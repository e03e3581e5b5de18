"""The worker side of ``rbit ctl``: authorize a command, carry it out, answer.

:class:`Controller` runs on the broker's I/O thread (each command arrives there) and
answers with a reply document (:func:`rbit.control.commands.reply`). A command is
obeyed only if its AMQP ``user_id`` is one of ``[control] users``. RabbitMQ checks that
property: a message whose ``user_id`` differs from the user its connection logged in
as is refused by the broker itself (``PRECONDITION_FAILED``), so it cannot be forged by
a client of the broker. A command without ``user_id`` is refused here. With
``[control] trusted_keys``, a command must also carry a trusted operator's signature
(:mod:`rbit.control.authority`). Refusals are answered ``refused`` with the reason,
change nothing, and are logged at WARNING with the user (and the key id).

:meth:`Controller.status` and :meth:`Controller.history` are the worker's status
snapshot and history query, for any reader (they are also what an HTTP endpoint
serves).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from rbit import __version__
from rbit.control.commands import Command, CommandError, parse, reply
from rbit.control.observer import JobObserver
from rbit.errors import SignatureError
from rbit.safetext import escape

if TYPE_CHECKING:
    from rbit.amqp.broker import Broker
    from rbit.amqp.control import CommandEnvelope
    from rbit.control.authority import CommandAuthority
    from rbit.control.state import StateStore

log = logging.getLogger(__name__)


class Controller:
    """Carries out control commands for one worker, and reports on it.

    Args:
        name: The worker's name.
        users: AMQP users whose commands are obeyed.
        broker: The worker's broker (pause, resume, connection state).
        queues: The worker's queues, in config order.
        observer: Running jobs and counts.
        store: History and paused queues (None: neither is kept).
        backlog: Status events not yet delivered by the sinks.
        request_stop: Starts the graceful stop (as SIGTERM does).
        authority: Checks command signatures (None: the ``user_id`` check only).
        clock: Wall-clock time; ``monotonic`` measures the uptime.
    """

    def __init__(self, name: str, users: Collection[str], *, broker: Broker,
                 queues: Collection[str], observer: JobObserver,
                 store: StateStore | None, backlog: Callable[[], int],
                 request_stop: Callable[[], None], clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 authority: CommandAuthority | None = None) -> None:
        self.name = name
        self._authority = authority
        self._users = frozenset(users)
        self._broker = broker
        self._queues = tuple(queues)
        self._observer = observer
        self._store = store
        self._backlog = backlog
        self._request_stop = request_stop
        self._clock = clock
        self._monotonic = monotonic
        self._started = monotonic()
        self._host = socket.gethostname()
        #: The worker's schedules for ``status`` (:meth:`rbit.schedule.scheduler.Scheduler.status`).
        self.schedules: Callable[[], list[dict[str, Any]]] | None = None

    # ---------------------------------------------------------------- commands

    def handle(self, body: bytes, user_id: str | None,
               envelope: CommandEnvelope | None = None) -> bytes:
        """Answer one command document sent by ``user_id`` (None: no user_id given).

        ``envelope`` (routing key, headers, message id, content type) is what the
        signature check reads.
        """
        if user_id is None or user_id not in self._users:
            reason = ("no user_id property" if user_id is None
                      else f"user {user_id!r} is not in [control] users")
            log.warning("control command refused: %s (user %s)", escape(reason, 300),
                        escape(user_id, 100))
            return reply(self.name, refused=reason)
        if self._authority is not None:
            try:
                self._authority.check(body, envelope)
            except SignatureError as exc:
                reason = f"signature refused: {exc}"
                log.warning("control command refused: %s (user %s, key %s, message id %s)",
                            escape(reason, 300), escape(user_id, 100),
                            escape(getattr(exc, "key_id", None) or "-", 100),
                            escape(envelope.message_id if envelope else None, 200))
                return reply(self.name, refused=reason)
        try:
            command = parse(body)
        except CommandError as exc:
            log.warning("bad control command from %s: %s", escape(user_id, 100),
                        escape(str(exc), 300))
            return reply(self.name, error=str(exc))
        log.info("control command %s from %s", command.name, escape(user_id, 100))
        try:
            return reply(self.name, command=command.name, **self._carry_out(command))
        except CommandError as exc:
            return reply(self.name, command=command.name, error=str(exc))

    def _carry_out(self, command: Command) -> dict[str, Any]:
        name = command.name
        if name == "ping":
            return self.identity()
        if name == "status":
            return self.status(verbose=command.verbose)
        if name in ("pause", "resume"):
            return self._pause(command)
        if name == "shutdown":
            self._request_stop()
            return {"stopping": True}
        if name == "loglevel":
            return self._loglevel(command)
        return {"queue": command.queue, "history": self.history(command.queue, command.depth)}

    def _pause(self, command: Command) -> dict[str, Any]:
        queues = self._queues if command.all else (command.queue,)
        unknown = [q for q in queues if q not in self._queues]
        if unknown:
            raise CommandError(f"not a queue of this worker: {unknown[0]!r}")
        paused = set(self._broker.paused())
        for queue in queues:
            if command.name == "pause":
                paused.add(queue)
                self._broker.pause(queue)
            else:
                paused.discard(queue)
                self._broker.resume(queue)
        if self._store is not None:
            self._store.set_paused(paused)  # before answering: a pause must outlive us
        return {"paused": sorted(paused)}

    @staticmethod
    def _loglevel(command: Command) -> dict[str, Any]:
        name = "" if command.logger in ("", "root") else command.logger
        level = command.level.upper()
        logging.getLogger(name or None).setLevel(level)
        return {"logger": name or "root", "level": level}

    # --------------------------------------------------------- public reports

    def identity(self) -> dict[str, Any]:
        """Name, host, pid, version and uptime (seconds) of this worker."""
        return {"name": self.name, "host": self._host, "pid": os.getpid(),
                "version": __version__,
                "uptime": round(self._monotonic() - self._started, 3)}

    def announce(self) -> dict[str, Any]:
        """What the worker tells the fleet on each connection."""
        return {**self.identity(), "time": self._clock()}

    def status(self, verbose: bool = False) -> dict[str, Any]:
        """The worker's status snapshot (JSON-serialisable; any thread).

        Returns:
            name, host, pid, version, uptime; ``queues`` (queue, consuming, paused);
            ``running_count`` and, when ``verbose``, ``running`` (job_id, queue, since
            in Unix seconds); ``counts`` since start (done, failed, retried,
            dead_lettered); ``broker_connected``; ``status_backlog``; ``schedules``
            (name, trigger, role, last_fire, next_fire) when the worker has any.
        """
        consuming, paused = self._broker.consuming(), self._broker.paused()
        running = self._observer.running_jobs()
        snapshot = {
            **self.identity(),
            "queues": [{"queue": q, "consuming": q in consuming, "paused": q in paused}
                       for q in self._queues],
            "running_count": len(running),
            "counts": self._observer.snapshot_counts(),
            "broker_connected": self._broker.connected,
            "status_backlog": self._backlog(),
        }
        if self.schedules is not None:
            snapshot["schedules"] = self.schedules()
        if verbose:
            snapshot["running"] = running
        return snapshot

    def history(self, queue: str, depth: int) -> list[dict[str, Any]]:
        """The last ``depth`` outcomes of ``queue`` on this worker, newest first.

        Each: job_id, queue, status, attempt, started, ended, duration (seconds,
        times in Unix seconds), message. Empty when no history is kept.
        """
        if self._store is None:
            return []
        return self._store.history(queue, depth)
