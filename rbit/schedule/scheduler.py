"""The worker's scheduler: leader or follower of each time schedule, and the fires.

Leader election is RabbitMQ's: every worker carrying schedule NAME consumes its state
queue ``rbit.schedule.NAME`` (durable, ``x-single-active-consumer``, of the ``[rbit]
queue_type``); RabbitMQ delivers only to the active consumer, so the worker that
receives the token is the leader. It holds the token unacked. Each write goes:

1. publish the due fires (confirmed);
2. publish the new token, sequence number + 1 (confirmed);
3. ack the old token(s) and the requests folded in.

Crash windows: a leader that dies before 1 completes loses nothing (the next leader
sees the old token and fires, late, per ``catch_up``). A fire for a runner section's
queue, or one with ``exchange =`` left empty, goes through the default exchange and
leaves a copy in the state queue in the same publish
(:func:`rbit.schedule.fire.publish_fire`): a leader that dies between 1 and 2 leaves the
old token and those copies, and the next leader takes the copies as fired
(:func:`rbit.schedule.leader.apply_fired`) and publishes nothing again. Fires to a named
exchange leave no copy: for them the next leader publishes the fires of that one pass
again, with the same job ids (a duplicate message, never a lost fire). One that dies
between 2 and 3 leaves two tokens: the next leader keeps the newer
(:func:`rbit.schedule.leader.newest`) and fires nothing twice. Before any write the
leader checks that nothing is left undelivered in the state queue (a passive declare),
so that it acts on the newest token and on every copy.

Hand-over: when the leader's connection closes, RabbitMQ requeues its token and makes
the next consumer active at once. A killed process's socket is closed by its kernel,
so that is immediate; when the leader's host vanishes, the broker notices by the
connection's heartbeat (``[amqp] heartbeat``; the connection is dropped after about two
missed heartbeats) or by TCP, whichever first. The new leader then fires any due fire
within :data:`PASS_SECONDS`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from rbit.errors import BrokerError, Unroutable
from rbit.schedule import leader, nextrun
from rbit.schedule.fire import fire_time_of, iso_utc, parse_iso, publish_fire, schedule_of

if TYPE_CHECKING:
    from rbit.config import Settings
    from rbit.schedule.settings import ScheduleSettings

log = logging.getLogger(__name__)

#: How often the scheduler looks at the clock when nothing is due sooner.
PASS_SECONDS = 0.5
#: How long the leader holds one token before writing a fresh copy: well inside
#: RabbitMQ's delivery-ack timeout (``consumer_timeout``, 30 min by default), which
#: would otherwise close the channel under a leader that has nothing to fire for hours.
TOKEN_REFRESH = 300.0
RECONNECT_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
QUEUE_PREFIX = "rbit.schedule."

Clock = Callable[[], datetime]


def _watch(schedule: ScheduleSettings, settings: Settings, broker: Any) -> Any:
    from rbit.schedule.watch import WatchSource
    return WatchSource(schedule, settings)


def _listen(schedule: ScheduleSettings, settings: Settings, broker: Any) -> Any:
    from rbit.schedule.listen import ListenSource  # it needs the credit server: load late
    return ListenSource(schedule, settings, broker)


#: The local triggers (``watch``, ``listen``): trigger kind -> ``factory(schedule,
#: settings, broker)`` returning an object with ``start()``, ``stop(timeout)`` and
#: ``describe() -> dict`` (as :meth:`Seat.describe`); ``broker`` is the worker's
#: :class:`rbit.amqp.broker.Broker`. Each worker carrying such a schedule runs it
#: itself; no leader is involved.
LOCAL_TRIGGERS: dict[str, Callable[[ScheduleSettings, Settings, Any], Any]] = {
    "watch": _watch,
    "listen": _listen,
}


def state_queue(name: str) -> str:
    """The state queue of schedule ``name``."""
    return QUEUE_PREFIX + name


def utc_now() -> datetime:
    return datetime.now(UTC)


class Seat:
    """This worker's place in one schedule: the tokens and requests it holds."""

    def __init__(self, schedule: ScheduleSettings) -> None:
        self.schedule = schedule
        self.queue = state_queue(schedule.name)
        self.reset()

    def reset(self) -> None:
        self.leader = False
        self.tokens: dict[int, leader.State] = {}
        self.requests: list[tuple[int, str, datetime]] = []
        self.fired: list[tuple[int, datetime]] = []  # copies of fires (fire.publish_fire)
        self.junk: list[int] = []
        self.state: leader.State | None = None
        self.held_since = time.monotonic()
        self.leading_since: datetime | None = None  # the clock's time of the first token

    def on_state(self, tag: int, body: bytes, headers: dict | None = None) -> None:
        """A delivery: only the active consumer gets any, so this worker leads."""
        if not self.leader:
            log.info("schedule %s: leading (a delivery of its state queue)", self.schedule.name)
        self.leader = True
        try:
            at = fire_time_of(self.schedule.name, headers)
            if at is not None:
                self.fired.append((tag, at))
                return
            data = json.loads(body)
            if data.get("kind") == "next":
                self.requests.append((tag, str(data["fire"]), parse_iso(data["at"])))
            else:
                self.tokens[tag] = leader.State.decode(data)
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("schedule %s: dropping a malformed state message", self.schedule.name)
            self.junk.append(tag)

    def describe(self) -> dict[str, Any]:
        """The schedule as ``rbit ctl status`` shows it."""
        state, schedule = self.state, self.schedule
        coming = state and leader.next_fire(schedule, state)
        return {
            "name": schedule.name, "trigger": schedule.trigger.describe(),
            "role": "leader" if self.leader else "follower",
            "last_fire": state.last and iso_utc(state.last) if state else None,
            "next_fire": coming and iso_utc(coming) or None,
        }


class Scheduler:
    """Runs the time schedules of ``settings`` in a thread of its own.

    Args:
        settings: The worker's settings (``schedules``, ``[amqp]``, ``[rbit]``).
        publish: ``publish(exchange, routing_key, body, on_confirm)`` on the worker's
            connection, for next-run requests of jobs this worker ran.
        clock: Returns the current time (UTC-aware); tests inject their own.
        session_factory: Opens the scheduler's session (default: a
            :class:`rbit.amqp.schedules.StateSession`).
        broker: The worker's broker, for the local triggers (``listen`` publishes
            through it).
    """

    def __init__(self, settings: Settings, *, publish: Callable[..., None] | None = None,
                 clock: Clock = utc_now,
                 session_factory: Callable[[], Any] | None = None,
                 broker: Any = None) -> None:
        self.settings = settings
        self.seats = [Seat(s) for s in settings.schedules if s.timed]
        self.local = [LOCAL_TRIGGERS[s.kind](s, settings, broker) for s in settings.schedules
                      if not s.timed and s.kind in LOCAL_TRIGGERS]
        self._publish = publish
        self._clock = clock
        self._session_factory = session_factory or self._open_session
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._session: Any = None
        self._client: Any = None
        timeout = settings.worker.consumer_timeout
        self._refresh = min(TOKEN_REFRESH, timeout / 2) if timeout else TOKEN_REFRESH

    def start(self) -> None:
        """Start the local triggers, and the scheduler thread if there are time schedules."""
        for trigger in self.local:
            trigger.start()
        if self._publish is not None:
            # Also on workers without schedules: the job of a fire may run anywhere.
            nextrun.install(self.send_next)
        if not self.seats:
            return
        self._thread = threading.Thread(target=self._run, name="rbit-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop firing and close the connection (the tokens go to the next leader)."""
        self._stop.set()
        for trigger in self.local:
            trigger.stop(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
        if self._publish is not None:
            nextrun.install(None)

    def status(self) -> list[dict[str, Any]]:
        """One entry per schedule: name, trigger, role, last and next fire."""
        return [seat.describe() for seat in self.seats] + [t.describe() for t in self.local]

    def send_next(self, job_id: str, at: datetime) -> None:
        """Carry a job's next run to its schedule's leader (thread-safe)."""
        name = schedule_of(job_id)
        if name is None:
            log.warning("job %s named a next run, but is no fire of a schedule", job_id)
            return
        body = json.dumps({"kind": "next", "fire": job_id, "at": iso_utc(at)}).encode()

        def confirmed(ok: bool) -> None:
            if not ok:
                log.error("job %s: its next run was not recorded (publish failed)", job_id)

        self._publish("", state_queue(name), body, on_confirm=confirmed)

    # -- the thread -------------------------------------------------------------------

    def _open_session(self) -> Any:
        from rbit.amqp.schedules import StateSession
        return StateSession(self.settings.amqp, f"rbit scheduler {self.settings.worker.name}")

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
            try:
                self._connect()
                failures = 0
                while not self._stop.is_set():
                    self.run_pass()
            except BrokerError as exc:
                failures += 1
                log.warning("scheduler: %s; reconnecting in %.0f s", exc, delay)
            except Exception:  # the thread must outlive any bug in one pass
                failures = len(RECONNECT_DELAYS)
                log.exception("scheduler: unexpected error; reconnecting in %.0f s", delay)
            finally:
                self._disconnect()
            self._stop.wait(delay)

    def _connect(self) -> None:
        from rbit.client import Client

        self._session = self._session_factory()
        self._client = Client(self.settings, session=self._session)
        queue_type = self.settings.worker.queue_type
        for seat in self.seats:
            seat.reset()
            ready, consumers = self._session.declare_state(seat.queue, queue_type)
            if ready == 0 and consumers == 0:
                # Nobody holds a token: seed one. Two workers seeding at once leave two
                # tokens; the leader keeps one (leader.newest).
                initial = leader.initial_state(seat.schedule, self._clock(), self._name)
                self._session.put_state(seat.queue, initial.encode())
            self._session.consume(seat.queue, seat.on_state)
        log.info("scheduler: following %s", ", ".join(s.schedule.name for s in self.seats))

    def _disconnect(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = self._session = None
        for seat in self.seats:
            seat.reset()

    @property
    def _name(self) -> str:
        return self.settings.worker.name

    def run_pass(self) -> None:
        """Serve the connection for a moment, then act for each schedule led here."""
        self._session.pump(self._pause())
        for seat in self.seats:
            if seat.tokens or seat.junk or seat.fired:
                self._act(seat, self._clock())

    def _pause(self) -> float:
        now, soonest = self._clock(), PASS_SECONDS
        for seat in self.seats:
            coming = seat.state and leader.next_fire(seat.schedule, seat.state)
            if coming:
                soonest = min(soonest, max(0.01, (coming - now).total_seconds()))
        return soonest

    def _act(self, seat: Seat, now: datetime) -> None:
        best = leader.newest(list(seat.tokens.values())) if seat.tokens else None
        if best is None:
            # No token yet: keep the requests and copies for it, drop what is malformed.
            for tag in seat.junk:
                self._session.ack(tag)
            seat.junk.clear()
            return
        state = best
        for _tag, at in seat.fired:
            state = leader.apply_fired(seat.schedule, state, at)
        recorded = state == best  # every copy read is of a fire the token records
        for _tag, job_id, at in seat.requests:
            state = leader.apply_next(seat.schedule, state, job_id, at)
        if seat.leading_since is None:
            seat.leading_since = now
        fires, state = leader.plan(seat.schedule, state, now, seat.leading_since)
        seat.state = state
        refresh = time.monotonic() - seat.held_since > self._refresh
        if not (fires or seat.requests or len(seat.tokens) > 1 or seat.junk or refresh
                or not recorded):
            self._ack_fired(seat)
            return
        if self._stale(seat):
            return  # tokens were still on their way: decide again with all of them
        for fire in fires:
            self._fire(seat, fire)
        written = leader.State(best.seq + 1, state.created, state.last, state.next_at,
                               self._name)
        self._session.put_state(seat.queue, written.encode())
        seat.state = written
        seat.held_since = time.monotonic()
        self._ack_all(seat, list(seat.tokens))

    def _stale(self, seat: Seat) -> bool:
        """Whether messages of ``seat``'s queue were not yet delivered here."""
        def held() -> int:
            return len(seat.tokens) + len(seat.requests) + len(seat.fired)

        before = held()
        if self._session.ready(seat.queue) == 0:
            self._session.pump(0)
            return held() != before
        return True

    def _fire(self, seat: Seat, fire: Any) -> None:
        schedule = seat.schedule
        try:
            publish_fire(self._client, schedule, fire, record_in=seat.queue)
            log.info("schedule %s: fired job %s", schedule.name, fire.job_id)
        except Unroutable as exc:
            # Recorded as fired: retrying a route that takes nothing would block the
            # schedule forever; the operator sees the error.
            log.error("schedule %s: fire %s was not delivered: %s", schedule.name,
                      fire.job_id, exc)

    def _ack_all(self, seat: Seat, tags: list[int]) -> None:
        for tag in tags + [tag for tag, _job, _at in seat.requests] + seat.junk:
            self._session.ack(tag)
        self._ack_fired(seat)
        seat.tokens.clear()
        seat.requests.clear()
        seat.junk.clear()

    def _ack_fired(self, seat: Seat) -> None:
        """Ack the copies of fires read: the token held or written records them."""
        for tag, _at in seat.fired:
            self._session.ack(tag)
        seat.fired.clear()
