"""One running command: its supervision, its output, and the outcome it earns."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from rbit.fdloop import FdLoop
from rbit.outcome import Outcome
from rbit.runners.shell.readers import Head, SetStatus, StatusReader, Tail
from rbit.runners.shell.spawn import Pipes
from rbit.supervisor import Child, Supervisor, killed_by, stop_outcome, with_tail

if TYPE_CHECKING:
    from rbit.runners.shell.bodies import Spares
    from rbit.runners.shell.runner import ShellRunner

log = logging.getLogger(__name__)

EX_TEMPFAIL = 75


class Job(Supervisor):
    """One running command, moved along by callbacks from its loop.

    The loop watches the command's stderr (and stdout at DEBUG), its status pipe, an
    fd that becomes readable when it exits, and the runner's stop pipe; timers stand
    for the job's deadlines (:class:`rbit.supervisor.Supervisor`). Once the command
    and its output are over, ``done`` gets the outcome and the job's fds and body
    file go, at once or at the next quiet moment of the loop (``spares``).
    """

    log = log

    def __init__(
        self,
        runner: ShellRunner,
        proc: Child,
        pipes: Pipes,
        body_path: str,
        job_id: str,
        set_status: SetStatus,
        loop: FdLoop,
        done: Callable[[Outcome], None],
        spares: Spares | None,
        *,
        capture: bool = False,
    ) -> None:
        self._runner = runner
        self._spares = spares
        self._pipes = pipes
        self._body_path = body_path
        self._job_id = job_id
        self._done = done
        # A broadcast copy's caller gets the first bytes of stdout; the log, the last.
        self._output = Head() if capture else None
        self._stdout = Tail()
        self._stderr = Tail()
        streams = [
            (pipes.stderr_r, self._stderr.feed),
            (pipes.status_r, StatusReader(job_id, set_status).feed),
        ]
        if pipes.stdout_r is not None:
            output = self._output
            streams.append((pipes.stdout_r, self._stdout.feed if output is None else output.feed))
        super().__init__(
            proc,
            loop,
            streams,
            label=job_id,
            grace=runner.grace,
            timeout=runner.timeout,
            stop_fd=runner.stop.fd,
        )

    def on_end(self, code: int | None, stopped: str | None) -> None:
        stdout = self._stdout.text()
        if stdout:
            log.debug("job %s: stdout tail: %s", self._job_id, stdout)
        outcome = _outcome(code, stopped, self._stderr.text(), self.timeout)
        if self._output is not None:
            outcome = dataclasses.replace(outcome, result=self._output.output())
        if self.usage is not None:
            outcome = outcome.with_usage(self.usage)
        log.debug("job %s: %s %s", self._job_id, outcome.kind.value, outcome.reason)
        try:
            self._done(outcome)  # in the worker its ack goes out at once
        finally:
            if self._spares is None:
                self.release()
            else:
                self._spares.ended(self, self.loop)

    def on_error(self, exc: Exception) -> None:
        self._done(Outcome.failed(f"internal error while supervising the command: {exc}"))

    def release(self) -> None:
        """Closes the job's fds and removes its body file, once it has left the loop."""
        super().release()
        self._pipes.close_read_ends()
        self._runner.job_ended(self._body_path, self._job_id)


def _outcome(code: int | None, stopped: str | None, tail: str, timeout: float | None) -> Outcome:
    if stopped is not None:
        return stop_outcome(stopped, timeout, tail)
    if code is None:
        return Outcome.failed(with_tail("the command could not be stopped", tail))
    if code == 0:
        return Outcome.done()
    if code == EX_TEMPFAIL:
        return Outcome.blocked(tail or f"exit status {EX_TEMPFAIL} (try later)")
    if code < 0:
        return Outcome.failed(with_tail(killed_by(code), tail))
    return Outcome.failed(with_tail(f"exit status {code}", tail))
