"""The fleet as the dashboard shows it, gathered every ``[dashboard] refresh`` seconds.

One round, from one background thread, through the paths ``rbit ctl`` and ``rbit
dead-letters`` use:

* one ``status --verbose`` command to every worker (:func:`rbit.control.client.ask`):
  who answered and who was seen lately (``rbit.fleet.seen``) but did not;
* one ``history`` command per queue, for the recent jobs: the full
  ``history_rows`` on the first round and every :data:`FULL_HISTORY_EVERY` rounds, the
  last :data:`SHORT_HISTORY` outcomes otherwise (live statuses fill in between);
* a passive declare per queue and per dead-letter queue: ready messages and
  consumers. Unacknowledged counts are not in AMQP's answer (only RabbitMQ's
  management API has them), so the page shows the jobs the workers say they run;
* the first ``dead_letters_shown`` dead letters of each queue that has any, read
  with :func:`rbit.deadletters.peek` on a session closed at once (which hands them
  back).

So the dashboard adds one status command per round and one history command per queue
per round to each worker, at most every 2 seconds (5 by default).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from rbit.amqp.admin import AdminSession
from rbit.amqp.control import ALL_KEY
from rbit.amqp.fleet import FleetSession
from rbit.config import Settings
from rbit.control.authority import sign_command
from rbit.control.client import ask
from rbit.control.commands import Command
from rbit.dashboard.jobs import JobLog, history_row
from rbit.deadletters import peek
from rbit.errors import BrokerError, BrokerUnreachable, QueueNotFound
from rbit.safetext import escape
from rbit.topology import dead_letter_queue

log = logging.getLogger(__name__)

#: How long a round waits for the workers' replies (it stops once all answered).
REPLY_TIMEOUT = 3.0
FULL_HISTORY_EVERY = 12
SHORT_HISTORY = 50
#: The least time between two rounds, even when an action asks for one sooner.
MIN_GAP = 2.0


def _clean(value: Any, limit: int = 255) -> Any:
    """Values from the network, kept as JSON types but bounded."""
    if isinstance(value, str):
        return value[:limit]
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, list):
        return [_clean(item, limit) for item in value[:1000]]
    if isinstance(value, dict):
        return {str(k)[:100]: _clean(v, limit) for k, v in list(value.items())[:100]}
    return str(value)[:limit]


def worker_view(reply: dict[str, Any]) -> dict[str, Any]:
    """A worker's ``status --verbose`` reply as the page shows it."""
    keys = ("name", "host", "version", "uptime", "broker_connected", "queues", "running",
            "running_count", "counts", "schedules", "ok", "error", "refused")
    view = {key: _clean(reply.get(key)) for key in keys if key in reply}
    view["name"] = _clean(reply.get("worker"), 100)
    return view


class Gatherer:
    """Gathers the fleet's state in rounds, from a daemon thread, until :meth:`close`.

    Args:
        settings: The dashboard's config (``[amqp]``, runner sections, ``[dashboard]``).
        jobs: Where history rows go.
        signer: Signs the control commands (None: unsigned).
        clock: Wall-clock time (the snapshot's ``time``).
    """

    def __init__(self, settings: Settings, jobs: JobLog, signer: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._dash = settings.dashboard
        self._jobs = jobs
        self._signer = signer
        self._clock = clock
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] = {"time": None, "workers": [], "missing": [],
                                          "queues": [], "schedules": [], "dead": {},
                                          "error": "not gathered yet"}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._rounds = 0
        self._fleet: FleetSession | None = None
        self._admin: AdminSession | None = None
        self._thread = threading.Thread(target=self._run, name="rbit-dashboard-gather",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(REPLY_TIMEOUT + 10)
        self._drop_sessions()

    def snapshot(self) -> dict[str, Any]:
        """The last round's view of the fleet (a JSON-ready dict)."""
        with self._lock:
            return self._snapshot

    def poke(self) -> None:
        """Start the next round soon (after an action), :data:`MIN_GAP` apart at least."""
        self._wake.set()

    def queues(self) -> list[str]:
        """The queues known: the config's runner sections, then those workers consume."""
        names = [runner.queue for runner in self._settings.runners]
        for worker in self.snapshot()["workers"]:
            for item in worker.get("queues") or []:
                if isinstance(item, dict) and isinstance(item.get("queue"), str):
                    names.append(item["queue"])
        return list(dict.fromkeys(names))

    # ------------------------------------------------------------------- rounds

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.gather_once()
            self._wake.wait(self._dash.refresh)
            self._wake.clear()
            self._stop.wait(max(0.0, MIN_GAP - (time.monotonic() - started)))

    def gather_once(self) -> None:
        """One round; a broker error is shown on the page and the sessions reopened."""
        try:
            snapshot = self._round()
        except (BrokerUnreachable, BrokerError) as exc:
            log.warning("gathering the fleet failed: %s", exc)
            self._drop_sessions()
            with self._lock:
                self._snapshot = {**self._snapshot, "error": escape(str(exc), 500)}
            return
        with self._lock:
            self._snapshot = snapshot
        self._rounds += 1

    def _round(self) -> dict[str, Any]:
        fleet = self._fleet = self._fleet or FleetSession(self._settings.amqp,
                                                          "rbit dashboard")
        status = ask(fleet, Command("status", verbose=True), None, REPLY_TIMEOUT,
                     signer=self._signer)
        workers = sorted((worker_view(r) for r in status["replies"]),
                         key=lambda w: str(w["name"]))
        missing = [_clean(m, 100) for m in status["missing"]]
        with self._lock:
            self._snapshot = {**self._snapshot, "workers": workers}
        queues = self.queues()
        self._gather_history(fleet, queues)
        counts, dead = self._depths(queues, workers)
        return {"time": self._clock(), "workers": workers, "missing": missing,
                "queues": counts, "schedules": _schedules(workers), "dead": dead,
                "error": None}

    def _gather_history(self, fleet: FleetSession, queues: list[str]) -> None:
        full = self._rounds % FULL_HISTORY_EVERY == 0
        depth = self._dash.history_rows if full else min(SHORT_HISTORY, self._dash.history_rows)
        answering = {str(w["name"]) for w in self.snapshot()["workers"]}
        for queue in queues:
            replies = self._ask_answering(fleet, Command("history", queue=queue, depth=depth),
                                          answering)
            self._jobs.add_history([history_row(item, str(reply.get("worker")))
                                    for reply in replies
                                    for item in reply.get("history") or []
                                    if isinstance(item, dict)])

    def _ask_answering(self, fleet: FleetSession, command: Command,
                       answering: set[str]) -> list[dict[str, Any]]:
        """Ask every worker, waiting only for those that answered ``status`` this round.

        A worker seen lately but gone (killed) would otherwise cost the full reply
        timeout for every queue, every round.
        """
        def enough(raw: list[bytes]) -> bool:
            return answering <= {doc.get("worker") for doc in _documents(raw)}

        sign = None
        if self._signer is not None:
            def sign(key: str, message_id: str, body: bytes) -> dict[str, Any]:
                return sign_command(self._signer, key, message_id, "application/json", body)
        if not answering:
            return []
        return _documents(fleet.ask(ALL_KEY, command.to_json(), REPLY_TIMEOUT, enough,
                                    sign=sign))

    def _depths(self, queues: list[str], workers: list[dict[str, Any]],
                ) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, str]]]]:
        admin = self._admin = self._admin or AdminSession(self._settings.amqp,
                                                          "rbit dashboard")
        counts = []
        for queue in queues:
            ready = consumers = dead = None
            with contextlib.suppress(QueueNotFound):
                ready, consumers = admin.depth(queue)
            try:
                dead = admin.depth(dead_letter_queue(queue))[0]
            except QueueNotFound:
                dead = 0
            counts.append({"queue": queue, "ready": ready, "consumers": consumers,
                           "dead": dead, **_queue_state(queue, workers)})
        return counts, self._dead_letters([c["queue"] for c in counts if c["dead"]])

    def _dead_letters(self, queues: list[str]) -> dict[str, list[dict[str, str]]]:
        if not queues or not self._dash.dead_letters_shown:
            return {}
        # A session of its own, closed at once: the letters peeked at go back then.
        with AdminSession(self._settings.amqp, "rbit dashboard peek") as session:
            found = {}
            for queue in queues:
                try:
                    found[queue] = peek(session, queue, self._dash.dead_letters_shown)
                except QueueNotFound:
                    continue
            return found

    def _drop_sessions(self) -> None:
        for session in (self._fleet, self._admin):
            if session is not None:
                session.close()
        self._fleet = self._admin = None


def _documents(raw: list[bytes]) -> list[dict[str, Any]]:
    found = []
    for body in raw:
        try:
            doc = json.loads(body)
        except ValueError:
            continue
        if isinstance(doc, dict):
            found.append(doc)
    return found


def _queue_state(queue: str, workers: list[dict[str, Any]]) -> dict[str, Any]:
    """Which workers consume ``queue``, which paused it, how many of its jobs run."""
    consuming, paused, running = [], [], 0
    for worker in workers:
        for item in worker.get("queues") or []:
            if isinstance(item, dict) and item.get("queue") == queue:
                (paused if item.get("paused") else consuming).append(worker["name"])
        running += sum(1 for job in worker.get("running") or []
                       if isinstance(job, dict) and job.get("queue") == queue)
    return {"consuming_on": consuming, "paused_on": paused, "running": running}


def _schedules(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each schedule once: its trigger, its leader, and the leader's last and next fire."""
    found: dict[str, dict[str, Any]] = {}
    for worker in workers:
        for item in worker.get("schedules") or []:
            if not isinstance(item, dict):
                continue
            name = str(item.get("name"))
            entry = found.setdefault(name, {"name": name, "trigger": item.get("trigger"),
                                            "leader": None, "last_fire": None,
                                            "next_fire": None})
            if item.get("role") == "leader" or entry["leader"] is None:
                entry.update(last_fire=item.get("last_fire"), next_fire=item.get("next_fire"))
            if item.get("role") == "leader":
                entry["leader"] = worker["name"]
    return sorted(found.values(), key=lambda s: s["name"])
