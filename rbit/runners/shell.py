"""The ``shell!`` runner: one command line run per job, without a shell.

A runner section such as::

    [runner:cnx_any_latex_pdf]
    runner = shell!/usr/local/bin/build-pdf --job %ID --out {outdir}/%ID.pdf %BODY
    timeout = 3600
    outdir = /srv/pdf
    kill_grace = 10

is split into arguments once, when the runner loads, the way a POSIX shell splits
words (:func:`shlex.split`). For each job the placeholders are then replaced *inside*
the already split arguments by plain string substitution, in a single pass, and the
argument list goes to :class:`subprocess.Popen` without a shell. A job id such as
``x; rm -rf ~ $(reboot)`` therefore arrives as one literal argument, and text put in by
a substitution is never scanned again.

Placeholders:

* ``%ID`` -- the job id (:attr:`rbit.message.Message.job_id`);
* ``%QUEUE`` -- the queue the job was consumed from;
* ``%BODY`` -- path of a private file (mode 0600) holding the body, removed once the
  command and everything it started have ended;
* ``%ATTEMPT`` -- which try of the job this is, counting from 1;
* ``%%`` -- a literal ``%``;
* ``{key}`` -- the value of ``key`` in the runner's section. An unknown key is an error
  when the runner loads. ``${NAME}`` is left alone, since it is the syntax of a
  ``sh -c`` script.

Never put placeholders inside the script of a ``sh -c '...'`` argument: there the
substituted text *would* be read as shell syntax. A script reads the job from its
environment instead (``sh -c 'make -C /src JOB="$RBIT_JOB_ID"'``).

The command gets the body on stdin, runs in a process group (and session) of its own,
and finds in its environment everything the worker has plus:

* ``RBIT_JOB_ID``, ``RBIT_QUEUE``, ``RBIT_BODY_FILE``, ``RBIT_ATTEMPT``;
* ``RBIT_STATUS_FD`` -- a file descriptor, open for writing, for progress reports.
  Each line written there, ``Status[ message]``, is passed on at once as
  ``set_status(Status, message)``; the status is one of PyBit's (``Waiting``,
  ``Blocked``, ``Building``, ``Done``, ``Failed``, ``Cancelled``, ``Uploaded``, any
  case). Lines naming another status are logged and ignored. From bash::

      echo "Building step 2" >&$RBIT_STATUS_FD

  dash and other POSIX shells only accept single-digit descriptors in ``>&N``, and the
  number is usually larger, so portable scripts write
  ``echo "Building step 2" >/dev/fd/$RBIT_STATUS_FD`` instead.

How the command ends decides the job's :class:`~rbit.outcome.Outcome`:

* exit status 0: done;
* exit status 75 (``EX_TEMPFAIL``): blocked, try later, with the tail of stderr;
* any other exit status: failed, ``exit status N: <tail of stderr>``;
* killed by a signal: failed, ``killed by signal SIGNAME``;
* the program cannot be started (missing, not executable): failed,
  ``cannot run <program>: <reason>``; the retry policy decides what happens next.

Only the last 4 KiB of stderr (and of stdout, logged at DEBUG) are kept.

``timeout = SECONDS`` in the section bounds a run. On expiry the whole process group
gets SIGTERM; whatever is left of it ``kill_grace`` seconds later (default 5) gets
SIGKILL, and the job has failed with ``timed out after N s``. When the command exits
by itself, processes it left running in its group (background jobs, daemons it
started) are killed with SIGKILL, so that nothing outlives its job. A process that
moved to a session of its own escapes this, like any daemon would.

:meth:`ShellRunner.cancel` (the worker's answer to a second shutdown signal) stops the
process groups of all running jobs the same way; their runs end as blocked, so the jobs
are tried again later, and the runner starts no further commands.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import selectors
import shlex
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Callable

from rbit.config import RunnerSettings
from rbit.errors import RunnerLoadError
from rbit.message import Message
from rbit.outcome import Outcome, Status

log = logging.getLogger(__name__)

EX_TEMPFAIL = 75
DEFAULT_KILL_GRACE = 5.0
TAIL_BYTES = 4096

_STATUS_LINE_MAX = 4096
_READ_SIZE = 65536
_DRAIN_TIMEOUT = 2.0  # how long pipes may stay open once the process group is gone
_REAP_TIMEOUT = 10.0  # how long a SIGKILLed command may take to be reaped
_GROUP_POLL = 0.05  # nothing signals the end of group members that are not our children

_PLACEHOLDER = re.compile(r"%%|%ID|%QUEUE|%BODY|%ATTEMPT|(?<!\$)\{([A-Za-z_][A-Za-z0-9_.-]*)\}")
_CANCELLED = "cancelled"
_TIMED_OUT = "timed out"

SetStatus = Callable[[str, str], None]


class _Slot(enum.Enum):
    """A placeholder filled per job."""

    ID = "%ID"
    QUEUE = "%QUEUE"
    BODY = "%BODY"
    ATTEMPT = "%ATTEMPT"


_Arg = tuple["str | _Slot", ...]


class ShellRunner:
    """Runs a ``shell!`` command template for each job (see the module docs).

    One instance serves every worker thread of its runner section; :meth:`run` may be
    called from several threads at once.

    Args:
        runner: The runner section; ``runner.target`` is the command template.
        workdir: Working directory of the commands; ``None`` keeps the worker's.

    Raises:
        RunnerLoadError: The template is empty, has unbalanced quotes or names an
            unknown ``{setting}``, or ``kill_grace`` is not a number of seconds.
    """

    def __init__(self, runner: RunnerSettings, *, workdir: str | None = None) -> None:
        self._template = _compile_template(runner.target, runner.settings, runner.queue)
        self._timeout = runner.timeout
        self._grace = _kill_grace(runner.settings, runner.queue)
        self._workdir = workdir
        self._jobs = _Registry()

    def run(self, message: Message, set_status: SetStatus) -> Outcome:
        """Runs the command for one job and waits for its end.

        Args:
            message: The job.
            set_status: Receives ``(status, message)`` for each line the command
                writes to ``RBIT_STATUS_FD``.

        Returns:
            How the try ended.
        """
        job_id = message.job_id
        if self._jobs.closed:
            return Outcome.blocked("cancelled: the worker is stopping")
        try:
            body_path = _write_body(message.body)
        except OSError as exc:
            log.error("job %s: cannot write the body file: %s", job_id, exc)
            return Outcome.failed(f"cannot write the body file: {exc}")
        try:
            return self._run_command(message, body_path, set_status)
        finally:
            _remove(body_path, job_id)

    def cancel(self) -> None:
        """Stops the commands of all running jobs; starts no new ones.

        Returns at once and is safe to call from any thread. Each job's process group
        gets SIGTERM, then SIGKILL after the grace; the :meth:`run` calls return as
        soon as their groups are gone.
        """
        self._jobs.cancel_all()

    def _run_command(self, message: Message, body_path: str, set_status: SetStatus) -> Outcome:
        values = {
            _Slot.ID: message.job_id,
            _Slot.QUEUE: message.queue,
            _Slot.BODY: body_path,
            _Slot.ATTEMPT: str(message.attempt),
        }
        argv = [_render(arg, values) for arg in self._template]
        status_r, status_w = os.pipe()
        try:
            proc = self._start(argv, _child_env(values, status_w), body_path, status_w)
        except ValueError as exc:  # e.g. a NUL byte in the job id: the job itself is bad
            os.close(status_r)
            log.error("job %s: cannot pass the job to %s: %s", message.job_id, argv[0], exc)
            return Outcome.rejected(f"cannot pass the job to {argv[0]}: {exc}")
        except OSError as exc:
            os.close(status_r)
            log.error("job %s: cannot run %s: %s", message.job_id, argv[0], exc)
            return Outcome.failed(f"cannot run {argv[0]}: {exc}")
        finally:
            os.close(status_w)  # the child holds its own copy; EOF comes when it is gone
        log.info("job %s: started %s (pid %d)", message.job_id, argv[0], proc.pid)
        return self._supervise(proc, status_r, message.job_id, set_status)

    def _start(
        self, argv: list[str], env: dict[str, str], body_path: str, status_w: int
    ) -> subprocess.Popen:
        with open(body_path, "rb") as stdin:
            # An argument list and no shell: job content cannot become shell syntax.
            return subprocess.Popen(  # noqa: S603
                argv,
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=0,
                close_fds=True,
                pass_fds=(status_w,),
                start_new_session=True,  # own process group: timeouts reach grandchildren
                cwd=self._workdir,
                env=env,
            )

    def _supervise(
        self, proc: subprocess.Popen, status_r: int, job_id: str, set_status: SetStatus
    ) -> Outcome:
        job = _Job(proc)
        output = _Output(job_id, proc, status_r, set_status)
        self._jobs.add(job)
        try:
            stopped = self._wait(job, job_id)
        except BaseException:
            _signal_group(job.pgid, signal.SIGKILL, job_id)
            raise
        finally:
            self._jobs.remove(job)
            output.finish()
        if output.stdout.text():
            log.debug("job %s: stdout tail: %s", job_id, output.stdout.text())
        outcome = _outcome(proc.returncode, stopped, output.stderr.text(), self._timeout)
        log.info("job %s: %s %s", job_id, outcome.kind.value, outcome.reason)
        return outcome

    def _wait(self, job: _Job, job_id: str) -> str | None:
        """Waits for the command's end; returns why rbit stopped it, if it did."""
        job.wake.wait(self._timeout)
        if job.exited.is_set():
            _kill_leftovers(job.pgid, job_id)
            return None
        why = _CANCELLED if job.cancelled else _TIMED_OUT
        log.warning("job %s: %s; terminating process group %d", job_id, why, job.pgid)
        self._terminate(job, job_id)
        return why

    def _terminate(self, job: _Job, job_id: str) -> None:
        _signal_group(job.pgid, signal.SIGTERM, job_id)
        deadline = time.monotonic() + self._grace
        job.exited.wait(self._grace)
        # Members that catch SIGTERM may still be cleaning up after the leader is gone.
        while _group_alive(job.pgid) and time.monotonic() < deadline:
            time.sleep(_GROUP_POLL)
        if _group_alive(job.pgid):
            log.warning(
                "job %s: process group %d outlived SIGTERM; sending SIGKILL", job_id, job.pgid
            )
            _signal_group(job.pgid, signal.SIGKILL, job_id)
        if not job.exited.wait(_REAP_TIMEOUT):
            log.error("job %s: process %d survived SIGKILL", job_id, job.pgid)


class _Job:
    """One running command: its process, and events for its end and for cancellation."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.pgid = proc.pid  # start_new_session makes the child its group's leader
        self.exited = threading.Event()
        self.wake = threading.Event()
        self.cancelled = False
        # A blocking waitpid in a thread of its own lets the worker thread wait on an
        # event with a timeout instead of polling the child.
        threading.Thread(target=self._reap, name=f"rbit-shell-wait-{proc.pid}", daemon=True).start()

    def _reap(self) -> None:
        self.proc.wait()
        self.exited.set()
        self.wake.set()

    def cancel(self) -> None:
        self.cancelled = True
        self.wake.set()


class _Registry:
    """The running jobs of one runner, for :meth:`ShellRunner.cancel`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: set[_Job] = set()
        self.closed = False

    def add(self, job: _Job) -> None:
        with self._lock:
            self._jobs.add(job)
            closed = self.closed
        if closed:  # cancel() came while this command was being started
            job.cancel()

    def remove(self, job: _Job) -> None:
        with self._lock:
            self._jobs.discard(job)

    def cancel_all(self) -> None:
        with self._lock:
            self.closed = True
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()


class _Tail:
    """The last ``limit`` bytes of a stream."""

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self._data = bytearray()
        self._limit = limit
        self._truncated = False

    def feed(self, chunk: bytes) -> None:
        self._data += chunk
        if len(self._data) > self._limit:
            del self._data[: -self._limit]
            self._truncated = True

    def text(self) -> str:
        text = self._data.decode("utf-8", "replace").strip()
        return "..." + text if self._truncated and text else text


class _StatusReader:
    """Turns lines from ``RBIT_STATUS_FD`` into ``set_status`` calls."""

    def __init__(self, job_id: str, set_status: SetStatus) -> None:
        self._job_id = job_id
        self._set_status = set_status
        self._buf = bytearray()
        self._skipping = False  # inside an overlong line, already reported

    def feed(self, chunk: bytes) -> None:
        if not chunk:  # end of stream: a last line without newline still counts
            self._line(bytes(self._buf))
            self._buf.clear()
            return
        self._buf += chunk
        while (end := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            self._line(line)
            self._skipping = False
        if len(self._buf) > _STATUS_LINE_MAX:
            self._line(bytes(self._buf[:_STATUS_LINE_MAX]))
            self._buf.clear()
            self._skipping = True

    def _line(self, line: bytes) -> None:
        words = line.decode("utf-8", "replace").split(None, 1)
        if self._skipping or not words:
            return
        try:
            status = Status.parse(words[0])
        except ValueError:
            log.warning(
                "job %s: ignoring status line with unknown status %r", self._job_id, words[0]
            )
            return
        try:
            self._set_status(status.value, words[1].strip() if len(words) > 1 else "")
        except Exception:  # the pipe must keep being read, or the command would block
            log.exception("job %s: set_status(%s) failed", self._job_id, status.value)


class _Output:
    """Reads a command's stdout, stderr and status pipe in a thread of its own."""

    def __init__(
        self, job_id: str, proc: subprocess.Popen, status_r: int, set_status: SetStatus
    ) -> None:
        self.stdout = _Tail()
        self.stderr = _Tail()
        self._job_id = job_id
        self._proc = proc
        self._status_r = status_r
        self._handlers = {
            proc.stdout.fileno(): self.stdout.feed,
            proc.stderr.fileno(): self.stderr.feed,
            status_r: _StatusReader(job_id, set_status).feed,
        }
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(
            target=self._pump, name=f"rbit-shell-io-{proc.pid}", daemon=True
        )
        self._thread.start()

    def finish(self) -> None:
        """Waits for the pipes' end (briefly), then releases them."""
        self._thread.join(_DRAIN_TIMEOUT)
        if self._thread.is_alive():
            log.warning(
                "job %s: output still open after the command ended; no longer reading it",
                self._job_id,
            )
            os.write(self._stop_w, b"x")
            self._thread.join()
        for fd in (self._stop_r, self._stop_w, self._status_r):
            os.close(fd)
        self._proc.stdout.close()
        self._proc.stderr.close()

    def _pump(self) -> None:
        try:
            self._read_until_eof()
        except Exception:
            log.exception("job %s: reading the command's output failed", self._job_id)

    def _read_until_eof(self) -> None:
        with selectors.DefaultSelector() as selector:
            for fd, handler in self._handlers.items():
                selector.register(fd, selectors.EVENT_READ, handler)
            selector.register(self._stop_r, selectors.EVENT_READ, None)
            open_streams = len(self._handlers)
            while open_streams:
                for key, _ in selector.select():
                    if key.data is None:
                        return
                    chunk = os.read(key.fd, _READ_SIZE)
                    key.data(chunk)
                    if not chunk:
                        selector.unregister(key.fd)
                        open_streams -= 1


def _compile_template(template: str, settings: Mapping[str, str], queue: str) -> tuple[_Arg, ...]:
    where = f"runner:{queue}"  # not the template itself: it may carry a secret
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise RunnerLoadError(f"{where}: cannot split the command: {exc}") from exc
    if not words:
        raise RunnerLoadError(f"{where}: the command is empty")
    return tuple(_compile_word(word, settings, where) for word in words)


def _compile_word(word: str, settings: Mapping[str, str], where: str) -> _Arg:
    """Splits a word into literal text and job slots; settings become literal text."""
    parts: list[str | _Slot] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(word):
        parts.append(word[pos : match.start()])
        parts.append(_resolve(match, settings, where))
        pos = match.end()
    parts.append(word[pos:])
    return tuple(part for part in parts if part != "")


def _resolve(match: re.Match[str], settings: Mapping[str, str], where: str) -> str | _Slot:
    key = match.group(1)
    if key is not None:
        if key not in settings:
            known = ", ".join(sorted(settings)) or "none"
            raise RunnerLoadError(f"{where}: unknown setting {{{key}}} (settings: {known})")
        return str(settings[key])
    if match.group(0) == "%%":
        return "%"
    return _Slot(match.group(0))


def _render(arg: _Arg, values: Mapping[_Slot, str]) -> str:
    return "".join(values[part] if isinstance(part, _Slot) else part for part in arg)


def _kill_grace(settings: Mapping[str, str], queue: str) -> float:
    raw = settings.get("kill_grace")
    if raw is None:
        return DEFAULT_KILL_GRACE
    try:
        grace = float(raw)
    except ValueError:
        grace = -1.0
    if not grace >= 0:  # also rejects NaN
        raise RunnerLoadError(
            f"runner:{queue}: kill_grace must be a number of seconds >= 0, not {raw!r}"
        )
    return grace


def _child_env(values: Mapping[_Slot, str], status_fd: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RBIT_JOB_ID=values[_Slot.ID],
        RBIT_QUEUE=values[_Slot.QUEUE],
        RBIT_BODY_FILE=values[_Slot.BODY],
        RBIT_ATTEMPT=values[_Slot.ATTEMPT],
        RBIT_STATUS_FD=str(status_fd),
    )
    return env


def _write_body(body: bytes) -> str:
    fd, path = tempfile.mkstemp(prefix="rbit-body-")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(body)
    except BaseException:
        os.unlink(path)
        raise
    return path


def _remove(path: str, job_id: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # the command may remove it itself
    except OSError as exc:
        log.warning("job %s: cannot remove the body file %s: %s", job_id, path, exc)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _live_member_in_proc(pgid)


def _live_member_in_proc(pgid: int) -> bool:
    """Whether a member of the group is more than a zombie (True without ``/proc``).

    Orphans are reaped by init, or by nobody when the worker itself runs as PID 1 in a
    container; their zombies still count for ``killpg(pgid, 0)`` but need no killing.
    """
    try:
        names = os.listdir("/proc")
    except OSError:
        return True
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as file:
                fields = file.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        # After the command name: state, ppid, pgrp (proc(5)).
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def _signal_group(pgid: int, sig: signal.Signals, job_id: str) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except OSError as exc:
        log.warning("job %s: cannot send %s to process group %d: %s", job_id, sig.name, pgid, exc)


def _kill_leftovers(pgid: int, job_id: str) -> None:
    # Once the leader is gone nobody waits for what it left behind; a clean command
    # leaves nothing, so the rest is killed outright.
    if _group_alive(pgid):
        log.warning("job %s: killing processes the command left running (group %d)", job_id, pgid)
        _signal_group(pgid, signal.SIGKILL, job_id)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _with_tail(reason: str, tail: str) -> str:
    return f"{reason}: {tail}" if tail else reason


def _outcome(code: int | None, stopped: str | None, tail: str, timeout: float | None) -> Outcome:
    if stopped == _CANCELLED:
        return Outcome.blocked(_with_tail("cancelled: the worker is stopping", tail))
    if stopped == _TIMED_OUT:
        return Outcome.failed(_with_tail(f"timed out after {timeout:g} s", tail))
    if code is None:
        return Outcome.failed(_with_tail("the command could not be stopped", tail))
    if code == 0:
        return Outcome.done()
    if code == EX_TEMPFAIL:
        return Outcome.blocked(tail or f"exit status {EX_TEMPFAIL} (try later)")
    if code < 0:
        return Outcome.failed(_with_tail(f"killed by signal {_signal_name(-code)}", tail))
    return Outcome.failed(_with_tail(f"exit status {code}", tail))
