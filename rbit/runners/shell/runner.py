"""The ``shell!`` runner itself: starts a job's command and hands it to its :class:`Job`."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import weakref
from collections.abc import Callable

from rbit.config import RunnerSettings
from rbit.fdloop import FdLoop, PollLoop
from rbit.message import Message
from rbit.outcome import Outcome
from rbit.runners.environment import job_environb
from rbit.runners.shell.bodies import BodyFiles, Spares
from rbit.runners.shell.job import Job
from rbit.runners.shell.readers import SetStatus
from rbit.runners.shell.spawn import SPAWN_STATUS_FD, Pipes, Spawner, child_env
from rbit.runners.shell.template import Values, compile_template, render
from rbit.supervisor import CANCEL_REASON, Child, StopSignal, kill_grace, signal_group

log = logging.getLogger(__name__)


class ShellRunner:
    """Runs a ``shell!`` command template for each job (see the module docs).

    A job is a child process and a few pipes, supervised by callbacks from an event
    loop (:class:`rbit.fdloop.FdLoop`): the worker starts jobs with :meth:`start_job` on the
    AMQP connection's loop, so no thread is used per job or per worker slot;
    :meth:`run` runs one job to its end from the calling thread, and may be called
    from several threads at once.

    Args:
        runner: The runner section; ``runner.target`` is the command template.
        workdir: Working directory of the commands; ``None`` keeps the worker's.

    Raises:
        RunnerLoadError: The template is empty, has unbalanced quotes or names an
            unknown ``{setting}``, or ``kill_grace`` is not a number of seconds.
        OSError: The private directory for body files cannot be created.
    """

    def __init__(self, runner: RunnerSettings, *, workdir: str | None = None) -> None:
        self._template = compile_template(runner.target, runner.settings, runner.queue)
        self.timeout = runner.timeout
        self.grace = kill_grace(runner.settings, runner.queue)
        self._workdir = workdir
        # Built and encoded once: doing it per job was a large share of a short job.
        self._env = job_environb(runner)
        self._bodies = BodyFiles()
        self._spares = Spares(self._bodies)
        self.stop = StopSignal()
        self._devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        weakref.finalize(self, os.close, self._devnull)
        self._spawner = Spawner.create() if workdir is None else None

    def run(self, message: Message, set_status: SetStatus) -> Outcome:
        """Runs the command for one job and waits for its end.

        Args:
            message: The job.
            set_status: Receives ``(status, message)`` for each line the command
                writes to ``RBIT_STATUS_FD``.

        Returns:
            How the try ended.
        """
        ended: list[Outcome] = []
        loop = PollLoop()
        job = self._launch(message, set_status, ended.append, loop, None)
        try:
            loop.run_until(lambda: bool(ended))
        except BaseException:  # e.g. KeyboardInterrupt: the command must not outlive us
            if job is not None:
                job.abort()
            raise
        return ended[0]

    def start_job(
        self, message: Message, set_status: SetStatus, done: Callable[[Outcome], None], loop: FdLoop
    ) -> Job | None:
        """Starts the command for one job; ``done(outcome)`` follows on ``loop``.

        When the command cannot be started, ``done`` is called before this returns
        and the result is None.

        Args:
            message: The job.
            set_status: Receives ``(status, message)`` for each line the command
                writes to ``RBIT_STATUS_FD``; called on the loop's thread.
            done: Receives how the try ended, once, on the loop's thread.
            loop: Where the job's fds and deadlines are watched. All jobs of a runner
                are started from the same loop: between two of them, on its thread,
                the runner tidies up after the last and prepares the next
                (:class:`Spares`).
        """
        return self._launch(message, set_status, done, loop, self._spares)

    def _launch(
        self,
        message: Message,
        set_status: SetStatus,
        done: Callable[[Outcome], None],
        loop: FdLoop,
        spares: Spares | None,
    ) -> Job | None:
        job_id = message.job_id
        if self.stop.is_set():
            done(Outcome.blocked(self.stop.reason))
            return None
        # stdout is only read at DEBUG, or for a broadcast's caller: otherwise not worth
        # a pipe and its reads.
        stdout = message.broadcast or log.isEnabledFor(logging.DEBUG)
        spare = spares.take(stdout) if spares is not None else None
        try:
            made = spare.body if spare is not None else None
            body_fd, body_path = self._bodies.write(message.body, made)
        except OSError as exc:
            if spare is not None:
                spare.pipes.close()
            log.error("job %s: cannot write the body file: %s", job_id, exc)
            done(Outcome.failed(f"cannot write the body file: {exc}"))
            return None
        values = (job_id, message.queue, body_path, str(message.attempt))
        argv = [render(arg, values) for arg in self._template]
        try:
            pipes = spare.pipes if spare is not None else Pipes(stdout=stdout)
        except BaseException:
            os.close(body_fd)
            self.job_ended(body_path, job_id)
            raise
        try:
            proc = self._start(argv, values, body_fd, pipes)
        except (ValueError, OSError) as exc:
            pipes.close_read_ends()
            self.job_ended(body_path, job_id)
            # An argument the OS refuses (a NUL byte; job ids can no longer carry one,
            # see rbit.message): a bad job, not one to retry.
            if isinstance(exc, ValueError):
                log.error("job %s: cannot pass the job to %s: %s", job_id, argv[0], exc)
                done(Outcome.rejected(f"cannot pass the job to {argv[0]}: {exc}"))
            else:
                log.error("job %s: cannot run %s: %s", job_id, argv[0], exc)
                done(Outcome.failed(f"cannot run {argv[0]}: {exc}"))
            return None
        finally:
            pipes.close_write_ends()  # the child holds its copies; EOF comes when it is gone
        log.debug("job %s: started %s (pid %d)", job_id, argv[0], proc.pid)
        try:
            job = Job(self, proc, pipes, body_path, job_id, set_status, loop, done, spares,
                      capture=message.broadcast)
        except BaseException:
            pipes.close_read_ends()
            signal_group(proc.pid, signal.SIGKILL, job_id)
            proc.wait()
            self.job_ended(body_path, job_id)
            raise
        if spares is not None:
            spares.tidy(loop)  # the command is starting up: the worker only waits
        return job

    def cancel(self) -> None:
        """Stops the commands of all running jobs; starts no new ones.

        Returns at once and is safe to call from any thread. Each job's process group
        gets SIGTERM, then SIGKILL after the grace; the jobs end (blocked) as soon as
        their groups are gone. The body file directory goes with the last job.
        """
        self.stop.set(CANCEL_REASON, wake=True)
        self._spares.close()
        self._bodies.remove_dir()

    def close(self, timeout: float | None = None) -> None:
        """Starts no new commands and removes the body file directory.

        Running commands are left alone; the directory goes when the last of them
        ends. Safe to call more than once.

        Args:
            timeout: Unused; accepted for the runners' common ``close(timeout)``.
        """
        self.stop.set("the runner is closed", wake=False)
        self._spares.close()
        self._bodies.remove_dir()

    def job_ended(self, body_path: str, job_id: str) -> None:
        """Removes a job's body file (and the directory, after the last job)."""
        self._bodies.remove(body_path, job_id)
        if self.stop.is_set():
            self._bodies.remove_dir()  # the last job out takes the directory along

    def _start(self, argv: list[str], values: Values, stdin: int, pipes: Pipes) -> Child:
        """Starts the command with the body file ``stdin`` (closed here) as its stdin."""
        try:
            stdout = self._devnull if pipes.stdout_w is None else pipes.stdout_w
            fds = (stdin, stdout, pipes.stderr_w, pipes.status_w)
            if self._spawner is not None and min(fds) > SPAWN_STATUS_FD:
                env = child_env(self._env, values, SPAWN_STATUS_FD)
                child = self._spawner.start(argv, env, fds)
                if child is not None:
                    return child
                self._spawner = None
            # An argument list and no shell: job content cannot become shell syntax.
            return subprocess.Popen(  # noqa: S603
                argv,
                stdin=stdin,
                stdout=stdout,
                stderr=pipes.stderr_w,
                close_fds=True,
                pass_fds=(pipes.status_w,),
                start_new_session=True,  # own process group: timeouts reach grandchildren
                cwd=self._workdir,
                env=child_env(self._env, values, pipes.status_w),
            )
        finally:
            os.close(stdin)
