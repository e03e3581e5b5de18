"""The worker: builds the parts from the settings and runs them until told to stop.

It only orchestrates. The broker owns the network, the job pools own the work, the
status reporter owns the statuses, the control plane (:mod:`rbit.control`) owns the
history, the pause state and the answers to ``rbit ctl``. Shutdown runs in the order
that keeps heartbeats alive while jobs finish: stop consuming, requeue what never
started, wait for running jobs (up to ``shutdown_grace``), flush statuses, and only
then close the connection.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rbit import broadcast, decoding, jobguard, pybit
from rbit.amqp.broker import Broker
from rbit.amqp.records import ConsumerSpec
from rbit.config import RunnerSettings, Settings
from rbit.control.plane import ControlPlane
from rbit.dispatch import JobPool, JobStatus, pool_for
from rbit.errors import BrokerUnreachable, ConfigError
from rbit.runners.protocols import BatchRunner
from rbit.runners.python import load_python_runner
from rbit.schedule.scheduler import Scheduler
from rbit.status import StatusReporter
from rbit.topology import Topology, worker_topology

if TYPE_CHECKING:
    from rbit.security.gate import WorkerSecurity

log = logging.getLogger(__name__)

#: How long to wait for cancelled jobs to go once their children were told to stop.
CANCEL_WAIT = 10.0


class Worker:
    """One ``rbit CONFIG`` process.

    Args:
        settings: The validated configuration.
        poll_time: Overrides ``[rbit] polling_time`` (the ``--poll-time`` option).
        request_stop: What ``rbit ctl ... shutdown`` calls: the caller's graceful stop.
    """

    def __init__(self, settings: Settings, *, poll_time: float | None = None,
                 request_stop: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        worker = settings.worker
        self.poll_time = poll_time if poll_time is not None else worker.polling_time
        self.broker = Broker(
            settings.amqp,
            _topology(settings),
            name=f"rbit {worker.name}",
            mode=worker.mode,
            poll_time=self.poll_time,
            consumer_timeout=worker.consumer_timeout,
            worker_name=worker.name,
        )
        self.reporter = StatusReporter(settings.status, worker.name, publish=self._publish_status)
        # Signed jobs (rbit.security): loaded before the runners, so that a config asking
        # for signatures without a usable key fails first.
        self.security = _security(settings)
        if self.security is not None:
            # A held copy of a long signed job comes back if this worker dies: counter-
            # signed, it is then verifiable like a retry.
            self.broker.leases.sealer = self.security.seal_hold
        self.pools = [self._pool(runner) for runner in settings.runners]
        consumers = [self._consumer(pool) for pool in self.pools]
        # Before PyBit's commands: they find the jobs in the control plane's observer.
        self.control = ControlPlane(settings, self.broker, self.pools,
                                    backlog=self.reporter.pending, request_stop=request_stop)
        self.pybit_check: pybit.QueuedCheck | None = None
        if pybit.commands_enabled(settings):
            consumers = self._pybit_consumers(consumers)
        self.broker.set_consumers(consumers)
        self.broker.set_broadcast(broadcast.routes(self.pools, self.security, settings,
                                                   self.reporter.report))
        self.scheduler = Scheduler(settings, publish=self.broker.publish, broker=self.broker)
        if self.scheduler.seats or self.scheduler.local:
            self.control.controller.schedules = self.scheduler.status

    def _pybit_consumers(self, consumers: list[ConsumerSpec]) -> list[ConsumerSpec]:
        """PyBit's commands: jobs tracked and checked, and the command queue consumed."""
        tracker = pybit.JobTracker(self.reporter.report, self.control.observer)
        check = self.pybit_check = pybit.QueuedCheck(
            self.broker, pybit.front_end(self.settings), tracker)
        for pool in self.pools:
            pool.tracker = tracker
        # After the signature check (rbit.security), which must come before anything
        # reads the body: only a verified BuildRequest is looked up on the front-end.
        consumers = [dataclasses.replace(spec, on_delivery=check.gate(spec.on_delivery))
                     for spec in consumers]
        commands = pybit.Commands(self.broker, tracker)
        return consumers + [commands.spec(self.settings.worker.name)]

    def _publish_status(self, exchange: str, routing_key: str, body: bytes,
                        on_confirm: Callable[[bool], None]) -> None:
        self.broker.publish(exchange, routing_key, body, content_type="application/json",
                            on_confirm=on_confirm)

    def _pool(self, runner: RunnerSettings) -> JobPool:
        job_runner: Any
        if runner.kind == "shell":
            # Imported here: seven modules a worker without shell! runners need not load.
            from rbit.runners.shell import ShellRunner
            job_runner = ShellRunner(runner)
        else:
            job_runner = load_python_runner(runner, self._status_factory(runner.queue))
            if isinstance(job_runner, BatchRunner):
                _bind_worker(job_runner, self.settings, runner)
                runner = _batch_prefetch(runner, job_runner)
                if runner.timeout:
                    log.warning("[runner:%s]: timeout is not enforced for a batch runner, "
                                "which runs in this process and cannot be killed", runner.queue)
        return pool_for(runner, job_runner, self.broker, self.reporter.report,
                        worker=self.settings.worker.name,
                        count_busy=self.settings.worker.mode == "poll")

    def _status_factory(self, queue: str) -> Callable[[str], JobStatus]:
        return lambda job_id: JobStatus(self.reporter.report, job_id, queue)

    def _consumer(self, pool: JobPool) -> ConsumerSpec:
        runner = pool.settings
        on_delivery = pool.on_delivery
        if self.security is not None and self.settings.require_signed(runner):
            on_delivery = self.security.gate(runner, self.broker, on_delivery,
                                             self.reporter.report)
            pool.sealer = self.security.seal
        return ConsumerSpec(
            queue=runner.queue,
            prefetch=runner.prefetch,
            on_delivery=on_delivery,
            capacity=pool.capacity,
            allowed_classes=decoding.DEFAULT_ALLOWED_CLASSES | runner.allowed_classes,
        )

    def start(self, timeout: float | None = None) -> None:
        """Start the job threads and connect.

        Raises:
            BrokerUnreachable: No host accepted a connection in a first round.
            DuplicateWorker: Another worker of this name is running.
        """
        # Before any job: what a killed worker left running must not run beside it.
        jobguard.reap_orphans()
        jobguard.open_record()
        for pool in self.pools:
            pool.start()
        self.control.start()
        self.broker.start()
        amqp = self.settings.amqp
        limit = timeout or (amqp.connect_timeout * 2 + 5) * len(amqp.hosts)
        if not self.broker.wait_ready(limit):
            self.broker.stop(1.0)
            jobguard.close_record()
            self.control.close()
            self.control.check_start()
            raise BrokerUnreachable(self.broker.start_error or "timed out connecting")
        log.info("worker %s consuming %s", self.settings.worker.name,
                 ", ".join(r.queue for r in self.settings.runners))
        self.scheduler.start()

    def shutdown(self, force: threading.Event, grace: float | None = None) -> bool:
        """Stop gracefully; ``force`` set meanwhile (a second signal) cuts jobs short.

        Returns:
            True if every running job ended on its own.
        """
        grace = self.settings.worker.shutdown_grace if grace is None else grace
        log.info("stopping: no new jobs; waiting up to %.0f s for running jobs", grace)
        self.scheduler.stop()  # first: the next leader takes over while jobs finish
        self.broker.stop_consuming()
        for pool in self.pools:
            pool.stop_taking()
        deadline = time.monotonic() + grace
        clean = self._wait_pools(deadline, force)
        if not clean:
            log.warning("stopping running jobs; they will be redelivered")
            for pool in self.pools:
                pool.cancel()
            # Jobs running in this process's threads cannot be stopped; they end with
            # the process, and the broker redelivers them.
            stoppable = [pool for pool in self.pools if pool.interruptible]
            self._wait_pools(time.monotonic() + CANCEL_WAIT, threading.Event(), stoppable)
        for pool in self.pools:
            pool.close(max(1.0, deadline - time.monotonic()))
        self.reporter.close(timeout=5.0)
        if self.pybit_check is not None:
            self.pybit_check.close()
        self.control.say_goodbye()
        self.broker.stop()
        self.control.close()
        if self.security is not None:
            self.security.close()
        jobguard.close_record()
        return clean

    def _wait_pools(self, deadline: float, force: threading.Event,
                    pools: list[JobPool] | None = None) -> bool:
        pools = self.pools if pools is None else pools
        while time.monotonic() < deadline and not force.is_set():
            step = min(deadline, time.monotonic() + 0.2)
            if all(pool.wait(step) for pool in pools):
                return True
        return all(pool.wait(time.monotonic()) for pool in pools)


def _bind_worker(job_runner: BatchRunner, settings: Settings, runner: RunnerSettings) -> None:
    """Hand a batch runner that asks for them the worker's settings (``bind_worker``).

    A batch runner may define ``bind_worker(settings, runner)``: it is called once, before
    the worker starts, with the whole validated configuration and the runner's section,
    e.g. to find ``[rbit] state_dir`` or to open a connection with the ``[amqp]``
    settings. A :class:`ConfigError` it raises names the runner's file and section.
    """
    bind = getattr(job_runner, "bind_worker", None)
    if not callable(bind):
        return
    try:
        bind(settings, runner)
    except ConfigError as exc:
        raise exc.located(file=runner.file,
                          section=runner.section or f"runner:{runner.queue}") from exc


def _batch_prefetch(runner: RunnerSettings, job_runner: BatchRunner) -> RunnerSettings:
    """``runner`` with a prefetch of at least a whole batch, unless one was set.

    A batch runner settles its jobs only once their batch is sent, so with a smaller
    prefetch the broker would cut every batch short (to one job, by default).
    """
    batch = getattr(job_runner, "batch_size", None)
    if not isinstance(batch, int) or batch <= runner.prefetch:
        return runner
    if runner.prefetch_set:
        if "batch_size" not in runner.settings:  # else the config has warned already
            log.warning("[runner:%s]: prefetch %d is below the runner's batch size %d, so "
                        "no batch can hold more than %d jobs", runner.queue, runner.prefetch,
                        batch, runner.prefetch)
        return runner
    log.info("[runner:%s]: prefetch %d, the runner's batch size", runner.queue, batch)
    return dataclasses.replace(runner, prefetch=batch)


def _security(settings: Settings) -> WorkerSecurity | None:
    """The worker's signature checks, or None when no runner requires signatures.

    :mod:`rbit.security` is imported only then: it loads ``cryptography``, several
    megabytes of memory that a worker without signed jobs has no use for.
    """
    if not any(settings.require_signed(runner) for runner in settings.runners):
        return None
    from rbit.security.gate import WorkerSecurity
    return WorkerSecurity(settings)


def _topology(settings: Settings) -> Topology:
    """What the worker declares: its runners' queues, and its PyBit command queue."""
    topology = worker_topology(settings)
    if not pybit.commands_enabled(settings):
        return topology
    return dataclasses.replace(topology, queues=topology.queues + (pybit.command_queue(settings),))
