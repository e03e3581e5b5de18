"""Job pools: deliveries in, outcomes out.

A pool serves one runner section. The broker's I/O thread hands it deliveries
(:meth:`JobPool.on_delivery`, which never blocks) and the pool carries out the fate
that :func:`rbit.fate.decide` chose for each outcome. Which pool serves a runner is
decided once, when the worker starts (:func:`pool_for`), from the protocol the runner
object fits (:mod:`rbit.runners.protocols`):

* :class:`EventedPool` (``shell!``) starts up to ``concurrency`` jobs on the I/O thread
  itself, and settles them there when they end, with no thread per job or per slot;
* :class:`ThreadPool` (``python!``) runs jobs in ``concurrency`` threads, created once at
  start, which take deliveries from a queue;
* :class:`BatchPool` (batch runners) hands every delivery to the runner's ``submit``
  from one thread, and settles each when the runner says so.

No job thread does network I/O itself: acks and publishes go back to the I/O thread
through the broker.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rbit import fate
from rbit.amqp.records import Delivery
from rbit.config import RunnerSettings
from rbit.credit.usage_credits import ack_after_credits
from rbit.outcome import Kind, Outcome, Status
from rbit.runners.protocols import (
    BatchRunner,
    EventedRunner,
    RunnerKind,
    ThreadRunner,
    runner_kind,
)
from rbit.status import one_line
from rbit.usage import Usage

if TYPE_CHECKING:
    from rbit.amqp.broker import Broker
    from rbit.control.observer import JobObserver

log = logging.getLogger(__name__)

# (job_id, queue, status, message), and the job's usage after them with a final status.
ReportFn = Callable[..., None]
#: Why a broadcast copy got no result: the worker stopped before it ran or ended.
STOPPING = "the worker is stopping"

_STOP = object()
_DONE, _DONE_STATUS, _BUILDING = Kind.DONE, Status.DONE, Status.BUILDING


def pool_for(runner: RunnerSettings, job_runner: Any, broker: Broker, report: ReportFn, *,
             worker: str, count_busy: bool = False) -> JobPool:
    """The pool that serves ``job_runner``, chosen by the protocol it fits.

    Args:
        runner: The section's settings.
        job_runner: An :class:`~rbit.runners.protocols.EventedRunner`,
            :class:`~rbit.runners.protocols.BatchRunner` or
            :class:`~rbit.runners.protocols.ThreadRunner`.
        broker: Where settlements go.
        report: Status sink (thread-safe, non-blocking).
        worker: This worker's name, recorded on dead letters.
        count_busy: Count deliveries not yet settled (poll mode's capacity).

    Raises:
        RunnerLoadError: ``job_runner`` fits none of the protocols.
    """
    kind = runner_kind(job_runner, f"runner:{runner.queue}")
    return _POOLS[kind](runner, job_runner, broker, report, worker=worker,
                        count_busy=count_busy)


class JobPool:
    """What the pools of the three runner kinds share: settling, statuses, shutdown.

    Args:
        runner: The section's settings.
        job_runner: The runner object, of the kind the subclass serves.
        broker: Where settlements go.
        report: Status sink (thread-safe, non-blocking).
        worker: This worker's name, recorded on dead letters.
        count_busy: Count deliveries not yet settled (poll mode's capacity).
    """

    def __init__(self, runner: RunnerSettings, job_runner: Any, broker: Broker,
                 report: ReportFn, *, worker: str, count_busy: bool = False) -> None:
        self.settings = runner
        self.runner = job_runner
        self._broker = broker
        self._report = report
        self._worker = worker
        self._closing = False
        self._cancelled = False
        self._lock = threading.Lock()
        # Deliveries taken and not yet settled: poll mode's capacity. Consume mode has
        # the broker's prefetch for that and skips the locking.
        self._count_busy = count_busy
        self._busy = 0
        #: Told of each job's start and settlement (the metrics), when set.
        self.metrics: Any = None
        #: Keeps each job's entry from its start to its fate (running jobs, counts,
        #: history, the jobs PyBit's commands find), if set.
        self.observer: JobObserver | None = None
        #: PyBit's commands (:mod:`rbit.pybit`) can cancel this pool's jobs, when set.
        self.tracker: Any = None
        #: ``sealer(delivery, publish) -> publish``: counter-signs retry copies of signed
        #: jobs (rbit.security.gate), when set.
        self.sealer: Callable[[Delivery, Any], Any] | None = None

    def start(self) -> None:
        """Start the pool's threads, if it has any."""

    def on_delivery(self, delivery: Delivery) -> None:
        """Take a delivery (on the I/O thread; never blocks)."""
        raise NotImplementedError

    def capacity(self) -> int:
        """How many more deliveries to take (poll mode keeps one per thread)."""
        limit = max(self.settings.prefetch, self.settings.concurrency)
        return 0 if self._closing else limit - self._busy

    # -------------------------------------------------------------------- shutdown

    def stop_taking(self) -> None:
        """Requeue what was delivered but not started; let running jobs go on."""
        self._closing = True

    def wait(self, deadline: float) -> bool:
        """Wait for running jobs until ``deadline`` (monotonic); True if all ended."""
        raise NotImplementedError

    def close(self, timeout: float) -> None:
        """Close the runner.

        A batch runner sends what it holds; a shell runner removes its body files'
        directory.
        """

    @property
    def interruptible(self) -> bool:
        """Whether :meth:`cancel` can end running jobs."""
        return True

    def cancel(self) -> None:
        """Stop running jobs now (children killed); their deliveries are redelivered."""
        self._cancelled = True

    # ------------------------------------------------------------------ job's path

    def _dismissed(self, delivery: Delivery) -> bool:
        """Settle a delivery that must not start now; True if it was one.

        When the pool is closing it goes back to its queue; when its connection is
        gone the broker redelivers it anyway.
        """
        message = delivery.message
        if self._closing:
            self._requeue(delivery)
        elif self._broker.is_current(delivery):
            if not message.is_cancelled():
                return False
            # Cancelled (a PyBit CancelRequest) while it waited here: never started.
            set_status = JobStatus(self._report, message.job_id, self.settings.queue, message)
            self._settle(delivery, Outcome.cancelled("cancelled before it started"),
                         set_status)
            return True
        if self.observer is not None:  # PyBit's commands keep jobs not started there
            self.observer.dropped(message)
        self._settled()
        return True

    def _status_callback(self, delivery: Delivery) -> JobStatus:
        """The job's ``set_status``, which is also its entry in the observer's books."""
        message = delivery.message
        queue_name = self.settings.queue
        set_status = JobStatus(self._report, message.job_id, queue_name, message)
        if self.metrics is not None:
            self.metrics.job_started(queue_name)
        if self.observer is not None:
            self.observer.started(set_status)
        return set_status

    def _requeue(self, delivery: Delivery) -> None:
        """Give back a delivery that will not run here (the pool is closing)."""
        if delivery.message.broadcast:  # never requeued: its caller hears why at once
            delivery.answer(None, STOPPING)  # type: ignore[attr-defined]
        else:
            self._broker.requeue(delivery)

    def _answer(self, delivery: Delivery, outcome: Outcome, set_status: JobStatus) -> None:
        """Settle a broadcast copy (:mod:`rbit.broadcast`): its caller gets the outcome.

        It is neither retried nor dead-lettered, and counted only when it is done.
        """
        message = delivery.message
        queue_name = self.settings.queue
        ok = outcome.kind is Kind.DONE and not self._cancelled
        status = (outcome.status or Status.DONE) if ok else Status.FAILED
        note = "" if ok else (STOPPING if self._cancelled else outcome.reason)
        if self.metrics is not None:
            self.metrics.job_settled(queue_name, outcome, fate.Settlement(None, status, note),
                                     set_status.started)
        if self.observer is not None:
            self.observer.ended(set_status, status if ok else None, message.attempt, note,
                                not ok)
        last = set_status.last  # a runner that ended on Done itself has said it all
        set_status.final(None if ok and last is not None and last.terminal else status, note)
        self._settled()
        if self._cancelled:
            delivery.answer(None, STOPPING)  # type: ignore[attr-defined]
        else:
            delivery.answer(outcome, "")  # type: ignore[attr-defined]

    def _settle(self, delivery: Delivery, outcome: Outcome, set_status: JobStatus) -> None:
        message = delivery.message
        if (outcome.kind is _DONE and outcome.status is None and not outcome.reason
                and not message.broadcast and not self._cancelled
                and (self.tracker is None or not message.is_cancelled())):
            self._settle_done(delivery, outcome, set_status)
            return
        if message.broadcast:
            self._answer(delivery, outcome, set_status)
            return
        if (self.tracker is not None and message.is_cancelled()
                and outcome.status is not Status.CANCELLED):
            # Stopped for a CancelRequest (or a runner that saw message.cancelled):
            # whatever the try returned, the job was cancelled, and is not retried.
            outcome = Outcome.cancelled()
        if self._cancelled:  # cut short by a second signal: left unacked, so redelivered
            set_status.final(None)
            log.warning("job %s: stopped before it ended; the broker will redeliver it",
                        message.job_id)
            if self.observer is not None:
                self.observer.ended(set_status, None, 0, "", False)
            self._settled()
            return
        settlement = fate.decide(outcome, delivery, self.settings, worker=self._worker)
        usage = outcome.usage
        if self.metrics is not None:
            self.metrics.job_settled(self.settings.queue, outcome, settlement, set_status.started)
        if self.observer is not None:
            self.observer.ended(set_status, settlement.status, message.attempt,
                                settlement.note or outcome.reason,
                                outcome.kind is not Kind.DONE, usage)
        last = set_status.last
        # A runner that ended on Done, Uploaded or Cancelled itself has said it all: a
        # Done from rbit after its Uploaded would move the job backwards.
        said = settlement.status is Status.DONE and last is not None and last.terminal
        if settlement.status is not None and not said and (
            settlement.status is not last or settlement.note or usage is not None
        ):
            set_status.final(settlement.status, settlement.note, usage)
        else:
            set_status.final(None)
        # Free the slot before handing over: in poll mode the I/O thread asks for the
        # next job as soon as it carried out the ack, and must see the capacity then.
        self._settled()
        if settlement.publish is None:
            ended = last if said else settlement.status
            if (usage is None or self.settings.pricing is None
                    or (ended is not Status.DONE and ended is not Status.UPLOADED)):
                self._broker.ack(delivery)
            else:
                ack_after_credits(self._broker, self.settings, delivery, usage)
        else:
            # The note quotes the runner's error, which may be megabytes long.
            log.info("job %s: %s", delivery.message.job_id, one_line(settlement.note))
            publish = settlement.publish
            if self.sealer is not None:
                publish = self.sealer(delivery, publish)
            self._broker.publish_then_ack(delivery, publish)

    def _settle_done(self, delivery: Delivery, outcome: Outcome,
                     set_status: JobStatus) -> None:
        """:meth:`_settle` of nearly every job: Done, nothing to add, not a broadcast.

        The steps the general path takes for the settlement :data:`rbit.fate.ACK`,
        without the questions whose answer is known then.
        """
        usage = outcome.usage
        if self.metrics is not None:
            self.metrics.job_settled(self.settings.queue, outcome, fate.ACK,
                                     set_status.started)
        if self.observer is not None:
            self.observer.ended(set_status, _DONE_STATUS, delivery.message.attempt, "",
                                False, usage)
        last = set_status.last
        # A runner that ended on Done, Uploaded or Cancelled itself has said it all.
        if last is not None and last.terminal:
            set_status.final(None)
        else:
            set_status.final(_DONE_STATUS, "", usage)
        self._settled()
        if usage is None or self.settings.pricing is None or (
                last is not None and last.terminal and last is not _DONE_STATUS
                and last is not Status.UPLOADED):
            self._broker.ack(delivery)
        else:
            ack_after_credits(self._broker, self.settings, delivery, usage)

    def _settled(self) -> None:
        if self._count_busy:
            with self._lock:
                self._busy -= 1


class _QueuedPool(JobPool):
    """A pool whose threads take deliveries from a queue filled by the I/O thread."""

    def __init__(self, runner: RunnerSettings, job_runner: Any, broker: Broker,
                 report: ReportFn, *, worker: str, count_busy: bool = False) -> None:
        super().__init__(runner, job_runner, broker, report, worker=worker,
                         count_busy=count_busy)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{runner.queue}-{n}", daemon=True)
            for n in range(self._thread_count())
        ]

    def _thread_count(self) -> int:
        return 1

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def on_delivery(self, delivery: Delivery) -> None:
        if self._closing:
            # Pushed before the broker saw our cancel: the job threads may be gone
            # already, so give it back now rather than when the connection closes.
            self._requeue(delivery)
            return
        if self._count_busy:
            with self._lock:
                self._busy += 1
        self._queue.put(delivery)

    def stop_taking(self) -> None:
        self._closing = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                self._requeue(item)
                self._settled()
        for _ in self._threads:
            self._queue.put(_STOP)

    def wait(self, deadline: float) -> bool:
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def _work(self) -> None:
        get = self._queue.get
        while True:
            delivery = get()
            if delivery is _STOP:
                return
            if not self._dismissed(delivery):
                self._start(delivery)

    def _start(self, delivery: Delivery) -> None:
        raise NotImplementedError


class ThreadPool(_QueuedPool):
    """Serves a :class:`~rbit.runners.protocols.ThreadRunner` from its threads.

    One thread per ``concurrency`` slot, created once at start.
    """

    runner: ThreadRunner

    def _thread_count(self) -> int:
        return self.settings.concurrency

    @property
    def interruptible(self) -> bool:
        # An in-thread python! job cannot be stopped: waiting for it after a second
        # signal would only delay the exit.
        return self.runner.in_child

    def start(self) -> None:
        # Optional: a runner with warm child processes starts them before any job.
        start = getattr(self.runner, "start", None)
        if start is not None:
            start()
        super().start()

    def close(self, timeout: float) -> None:
        close = getattr(self.runner, "close", None)
        if close is not None:
            close(timeout)

    def cancel(self) -> None:
        self._cancelled = True
        self.runner.cancel()

    def _start(self, delivery: Delivery) -> None:
        set_status = self._status_callback(delivery)
        set_status.building()
        try:
            outcome = self.runner.run(delivery.message, set_status)
        except BaseException as exc:  # a runner must not take a worker thread down
            outcome = Outcome.failed(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        self._settle(delivery, outcome, set_status)


class BatchPool(_QueuedPool):
    """Serves a :class:`~rbit.runners.protocols.BatchRunner`.

    One thread submits every delivery; the runner settles each when its batch is
    decided.
    """

    runner: BatchRunner

    def close(self, timeout: float) -> None:
        self.runner.close(timeout)

    @property
    def interruptible(self) -> bool:
        return False  # its work runs in this process: nothing to stop but the process

    def _start(self, delivery: Delivery) -> None:
        set_status = self._status_callback(delivery)
        self.runner.submit(delivery.message, set_status,
                           lambda outcome: self._settle(delivery, outcome, set_status))


class EventedPool(JobPool):
    """Serves an :class:`~rbit.runners.protocols.EventedRunner` on the I/O thread.

    Deliveries wait in a deque for a free slot; a job is started, supervised and
    settled on the connection's loop, with no hand-over between threads.
    """

    runner: EventedRunner

    def __init__(self, runner: RunnerSettings, job_runner: Any, broker: Broker,
                 report: ReportFn, *, worker: str, count_busy: bool = False) -> None:
        super().__init__(runner, job_runner, broker, report, worker=worker,
                         count_busy=count_busy)
        self._waiting: collections.deque[Delivery] = collections.deque()
        self._running = 0
        self._starting = False
        self._idle = threading.Event()
        self._idle.set()

    def on_delivery(self, delivery: Delivery) -> None:
        if self._closing:
            self._requeue(delivery)  # see _QueuedPool.on_delivery
            return
        if self._count_busy:
            with self._lock:
                self._busy += 1
        self._waiting.append(delivery)
        self._start_waiting()

    def stop_taking(self) -> None:
        self._closing = True
        while True:  # popleft is atomic: each waiting delivery goes one way only
            try:
                delivery = self._waiting.popleft()
            except IndexError:
                break
            self._requeue(delivery)
            self._settled()

    def wait(self, deadline: float) -> bool:
        return self._idle.wait(max(0.0, deadline - time.monotonic()))

    def close(self, timeout: float) -> None:
        self.runner.close(timeout)

    def cancel(self) -> None:
        self._cancelled = True
        self.runner.cancel()

    def _start_waiting(self) -> None:
        """Start waiting deliveries while slots are free (on the I/O thread)."""
        if self._starting:  # a job that ended at once, inside the loop below
            return
        self._starting = True
        try:
            waiting = self._waiting
            while waiting and self._running < self.settings.concurrency:
                try:
                    delivery = waiting.popleft()
                except IndexError:  # taken back by stop_taking meanwhile
                    return
                # Busy before looking at _closing: a shutdown that finds the pool idle
                # must not see a job start after it.
                self._running += 1
                self._idle.clear()
                if self._dismissed(delivery):
                    self._slot_freed()
                else:
                    self._start_job(delivery)
        finally:
            self._starting = False

    def _slot_freed(self) -> None:
        self._running -= 1
        if not self._running:
            self._idle.set()

    def _start_job(self, delivery: Delivery) -> None:
        set_status = self._status_callback(delivery)
        ended = False

        def done(outcome: Outcome) -> None:
            nonlocal ended
            if ended:
                return
            ended = True
            try:
                self._settle(delivery, outcome, set_status)
            finally:
                self._slot_freed()
            self._start_waiting()

        set_status.building()
        try:
            job = self.runner.start_job(delivery.message, set_status, done,
                                        self._broker.fd_loop())
            if job is not None and self.tracker is not None:
                # A CancelRequest arrives on this (the I/O) thread, the job's own loop.
                delivery.message.on_cancel(lambda: job.stop("cancelled"))
        except Exception as exc:  # a runner must not take the I/O thread down
            log.exception("job %s: cannot start", delivery.message.job_id)
            done(Outcome.failed(f"{type(exc).__name__}: {exc}"))


_POOLS: dict[RunnerKind, type[JobPool]] = {
    RunnerKind.EVENTED: EventedPool,
    RunnerKind.BATCH: BatchPool,
    RunnerKind.THREAD: ThreadPool,
}


class JobStatus:
    """The ``set_status`` of one job: validates, reports, remembers the last status.

    Once the job is settled (:meth:`final`), later calls -- from a thread the runner
    left behind, say -- are logged at DEBUG and dropped: a job's statuses never go on
    after its final one.

    It is also the job's one entry in the worker's books
    (:class:`rbit.control.observer.JobObserver`): the observer keeps it while the job
    runs, notes its fate on it, and hands it to the history, whose writer thread makes
    the row (:meth:`history_row`). A job's path thus builds no other record of it.

    Args:
        report: The status sink.
        job_id: The job's id.
        queue_name: Its queue.
        message: The job, when the observer keeps an entry for it (its key there).
    """

    __slots__ = ("_report", "job_id", "queue", "message", "last", "_settled", "started",
                 "since", "fate", "attempt", "note", "usage", "ended")

    since: float
    ended: float
    fate: Status
    attempt: int
    note: str
    usage: Usage | None

    def __init__(self, report: ReportFn, job_id: str, queue_name: str,
                 message: Any = None) -> None:
        self._report, self.job_id, self.queue = report, job_id, queue_name
        self.message = message
        self.last: Status | None = None
        self._settled = False
        self.started = time.monotonic()  # the job's start, for its duration
        # The rest is set by the observer, and only read after it set them: when the
        # job started and ended (Unix seconds), and its fate (the settlement's status,
        # the try, the note, what it used). Left unset meanwhile: nothing to pay.

    def __call__(self, status: str | Status, message: str = "") -> None:
        parsed = status if status.__class__ is Status else Status.parse(status)
        text = message if message.__class__ is str else str(message)
        with _FINAL_LOCK:  # against a settlement on another thread meanwhile
            if self._settled:
                log.debug("job %s: status %s set after the job was settled; ignored",
                          self.job_id, parsed.value)
                return
            self.last = parsed
            self._report(self.job_id, self.queue, parsed, text)

    def building(self) -> None:
        """Report Building, rbit's own first status of every job, as it starts.

        No lock: nothing can settle a job that has not been handed to its runner yet.
        """
        self.last = _BUILDING
        self._report(self.job_id, self.queue, _BUILDING, "")

    def final(self, status: Status | None, message: str = "", usage: Usage | None = None) -> None:
        """Reports the job's final status (None: none to add); no status follows it.

        ``usage``, what the job used, travels with that status (the amqp sink's event).
        """
        with _FINAL_LOCK:
            self._settled = True
            if status is not None:
                self.last = status
                if usage is None:
                    self._report(self.job_id, self.queue, status, message)
                else:
                    self._report(self.job_id, self.queue, status, message, usage)

    def history_row(self) -> tuple[Any, ...]:
        """The job's history row (:data:`rbit.control.state.RecordTuple`), once ended."""
        return (self.job_id, self.queue, self.fate.value, self.attempt, self.since, self.ended,
                self.ended - self.since, self.note, self.usage)


# One lock for all jobs: held only while a status is handed to the (non-blocking) sink.
_FINAL_LOCK = threading.Lock()
