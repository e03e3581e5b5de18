"""``python!pkg.module:func`` runners.

A plain runner is a callable ``func(message, set_status, settings)``:

* ``message`` -- a :class:`rbit.message.Message`;
* ``set_status(status, message="")`` -- report a PyBit status (``Waiting``,
  ``Blocked``, ``Building``, ``Done``, ``Failed``, ``Cancelled``, ``Uploaded``,
  case-insensitive); an unknown status raises ``ValueError`` in the runner;
* ``settings`` -- a dict of the runner section's other keys.

How the call ends decides the job's :class:`rbit.outcome.Outcome`:

* returning normally: done, unless the last status the runner set is terminal --
  ``Failed`` makes the outcome failed (with that status' message), ``Done``,
  ``Uploaded`` and ``Cancelled`` leave it done;
* raising :class:`rbit.errors.Blocked` (``reason``, ``delay``): blocked, the job is
  republished after a delay;
* raising :class:`rbit.errors.Reject`: rejected, the job goes to the dead letters;
  so does an uncaught :class:`rbit.errors.DecodeError` (a body that never decodes);
* raising anything else: failed, with ``"ExcType: message"`` and the traceback.

By default the callable runs in the calling (worker) thread. With ``python = PATH`` or
``timeout = SECONDS`` in the section it runs in a child process instead
(:mod:`rbit.runners.child`), one per job, in its own session, supervised like a
``shell!`` command (:mod:`rbit.supervisor`): on ``timeout`` the whole process group
gets SIGTERM, then SIGKILL after ``kill_grace`` seconds (default 5), and the job has
failed with ``timed out after N s``; processes the child leaves running in its group
are killed once it exits; a cancel (the worker's second shutdown signal) stops it the
same way and the job ends blocked (``cancelled: the worker is stopping``), to be tried
again; a child killed by a signal is reported as ``killed by signal SIGNAME``. The
child talks to rbit over a dedicated pipe in JSON lines, so the runner's own prints
on stdout/stderr cannot disturb it. The child runs while the worker thread waits for
it, its pipes and deadlines watched from a private ``poll`` loop.

Batch runners
-------------
If the target is a class, or a callable with the attribute ``rbit_batch = True``, it
is a batch-runner factory, called once when the worker starts::

    runner = Target(settings: dict, status_factory)

``status_factory(job_id)`` returns a ``set_status`` callable reporting statuses under
``job_id`` (e.g. for a batch's own id). The object must provide:

* ``submit(message, set_status, settle)`` -- take one job; return quickly.
  ``settle(outcome)`` must be called exactly once per message, from any thread, when
  the job's fate is known (an :class:`rbit.outcome.Outcome`); the delivery is settled
  only then.
* ``close(timeout: float)`` -- finish or hand back pending work within ``timeout``
  seconds; messages never settled are redelivered by the broker.

Batch runners always run in the worker's process (``python =`` does not apply).
"""

from __future__ import annotations

import base64
import importlib
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, Callable

from rbit.config import RunnerSettings
from rbit.errors import Blocked, DecodeError, Reject, RunnerLoadError
from rbit.fdloop import PollLoop
from rbit.message import Message
from rbit.outcome import Outcome, Status
from rbit.supervisor import (
    CANCEL_REASON,
    DEFAULT_KILL_GRACE,
    StopSignal,
    Supervisor,
    kill_grace,
    killed_by,
    signal_group,
    stop_outcome,
)

logger = logging.getLogger(__name__)

#: Seconds between SIGTERM and SIGKILL by default (``kill_grace``).
KILL_GRACE = DEFAULT_KILL_GRACE
#: Bytes of the child's stderr quoted when it dies without an outcome.
STDERR_TAIL = 2000
#: Environment variables naming the child's protocol file descriptors.
IN_FD_ENV = "RBIT_PROTOCOL_IN_FD"
OUT_FD_ENV = "RBIT_PROTOCOL_OUT_FD"

_LINGERING = "the runner returned but its process did not exit"

SetStatus = Callable[..., None]
RunnerFunc = Callable[[Message, SetStatus, dict], Any]


def load_python_runner(
    runner: RunnerSettings, status_factory: Callable[[str], SetStatus] | None = None
) -> PythonRunner | Any:
    """Resolve a ``python!`` runner section to something the worker can run.

    Args:
        runner: The runner section; ``runner.target`` is ``"pkg.module:attr"``.
        status_factory: Handed to batch-runner factories (see the module docstring).

    Returns:
        A :class:`PythonRunner`, or the object a batch-runner factory built.

    Raises:
        RunnerLoadError: The module cannot be imported, the attribute is missing or not
            callable, or a batch runner lacks ``submit``/``close``; the error names the
            section's file, section and the key ``runner``.
    """
    try:
        if runner.python:
            _check_in_interpreter(runner.python, runner.target)
            return PythonRunner(runner, None)
        target = resolve_target(runner.target)
        if is_batch_factory(target):
            return _build_batch_runner(target, runner, status_factory)
    except RunnerLoadError as exc:
        where = runner.section or f"runner:{runner.queue}"
        raise exc.located(file=runner.file, section=where, key="runner") from exc
    return PythonRunner(runner, target)


def resolve_target(spec: str) -> Callable[..., Any]:
    """Import ``"pkg.module:attr"`` (``attr`` may be dotted) and return the callable.

    Raises:
        RunnerLoadError: With the reason.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name.strip() or not attr_path.strip():
        raise RunnerLoadError(
            f"runner target {spec!r} is not of the form 'package.module:callable'"
        )
    try:
        target: Any = importlib.import_module(module_name.strip())
    # A broken runner module may raise anything on import, sys.exit() included.
    except (Exception, SystemExit) as exc:
        raise RunnerLoadError(f"cannot import {module_name!r}: {_brief(exc)}") from exc
    for attr in attr_path.strip().split("."):
        try:
            target = getattr(target, attr)
        except AttributeError:
            raise RunnerLoadError(
                f"{spec!r}: {type(target).__name__} {getattr(target, '__name__', '?')!r} "
                f"has no attribute {attr!r}"
            ) from None
        except Exception as exc:  # a module's __getattr__ may raise anything
            raise RunnerLoadError(f"{spec!r}: reading {attr!r} failed: {_brief(exc)}") from exc
    if not callable(target):
        raise RunnerLoadError(f"{spec!r} is not callable")
    return target


#: The longest exception text a load error quotes (a module may raise a huge one).
_LOAD_REASON_CHARS = 500


def _brief(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    if len(text) > _LOAD_REASON_CHARS:
        text = text[:_LOAD_REASON_CHARS] + f"... ({len(text)} characters)"
    return text


def is_batch_factory(target: Any) -> bool:
    """Whether ``target`` builds a batch runner (a class, or ``rbit_batch = True``)."""
    return inspect.isclass(target) or getattr(target, "rbit_batch", False) is True


def _build_batch_runner(target: Any, runner: RunnerSettings, status_factory: Any) -> Any:
    try:
        obj = target(dict(runner.settings), status_factory)
    except Exception as exc:
        raise RunnerLoadError(
            f"batch runner {runner.target!r} failed to start: {type(exc).__name__}: {exc}"
        ) from exc
    missing = [name for name in ("submit", "close") if not callable(getattr(obj, name, None))]
    if missing:
        raise RunnerLoadError(f"batch runner {runner.target!r} lacks {' and '.join(missing)}()")
    return obj


def call_runner(
    func: RunnerFunc, message: Message, set_status: SetStatus, settings: Mapping[str, str]
) -> Outcome:
    """Call a plain runner and turn how it ended into an :class:`Outcome`.

    Args:
        func: The runner callable.
        message: The job.
        set_status: Where validated statuses go, as ``set_status(Status, str)``.
        settings: The runner section's settings (the runner gets a copy).
    """
    tracker = StatusTracker(set_status)
    try:
        func(message, tracker, dict(settings))
    except Blocked as exc:
        return Outcome.blocked(exc.reason, exc.delay)
    except Reject as exc:
        return Outcome.rejected(exc.reason)
    except DecodeError as exc:  # the body will never decode: retrying cannot help
        return Outcome.rejected(f"undecodable body: {exc}")
    except (Exception, SystemExit) as exc:
        return Outcome.failed(describe_exception(exc))
    return tracker.outcome()


def describe_exception(exc: BaseException) -> str:
    """``"ExcType: message"`` followed by the formatted traceback."""
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return f"{type(exc).__name__}: {exc}\n{trace}"


class StatusTracker:
    """The ``set_status`` a runner receives: validates, forwards, remembers the last."""

    def __init__(self, forward: SetStatus) -> None:
        self._forward = forward
        self._lock = threading.Lock()
        self.last: tuple[Status, str] | None = None

    def __call__(self, status: str | Status, message: Any = "") -> None:
        parsed = Status.parse(status)
        text = "" if message is None else str(message)
        with self._lock:
            self.last = (parsed, text)
        self._forward(parsed, text)

    def outcome(self) -> Outcome:
        """The outcome of a runner that returned normally."""
        if self.last is None or not self.last[0].terminal:
            return Outcome.done()
        status, text = self.last
        if status is Status.FAILED:
            return Outcome.failed(text or "runner set status Failed")
        return Outcome.done(text)


class PythonRunner:
    """A plain ``python!`` runner, run in the worker thread or in a child process.

    Raises:
        RunnerLoadError: ``kill_grace`` is not a number of seconds.
    """

    def __init__(self, settings: RunnerSettings, func: RunnerFunc | None) -> None:
        self.settings = settings
        self._func = func
        self.stop = StopSignal()
        self.grace = DEFAULT_KILL_GRACE
        if self.in_child:
            self.grace = kill_grace(settings.settings, settings.queue)

    @property
    def in_child(self) -> bool:
        """Whether jobs run in a child process."""
        return bool(self.settings.python) or self.settings.timeout is not None

    def run(self, message: Message, set_status: SetStatus) -> Outcome:
        """Run one job to its outcome.

        Args:
            message: The job.
            set_status: Receives ``(Status, message)`` for every status reported.
        """
        if self.in_child or self._func is None:
            return self._run_child(message, set_status)
        return call_runner(self._func, message, set_status, self.settings.settings)

    def cancel(self) -> None:
        """Stop running child processes (SIGTERM now, SIGKILL after ``kill_grace``).

        Meant for shutdown: jobs that would start afterwards end blocked at once, as
        those stopped do. In-thread runners cannot be interrupted; for them this is a
        no-op.
        """
        self.stop.set(CANCEL_REASON, wake=True)

    def _run_child(self, message: Message, set_status: SetStatus) -> Outcome:
        """Runs the job in a child, supervised from this thread on a loop of its own."""
        if self.stop.is_set():
            return Outcome.blocked(self.stop.reason)
        with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
            try:
                proc, proto = _start_child(self.settings, message, stdout, stderr)
            except OSError as exc:
                return Outcome.failed(f"cannot start runner process: {exc}")
            loop = PollLoop()
            try:
                job = _ChildJob(self, proc, proto, message.job_id, set_status, loop)
            except BaseException:
                os.close(proto)
                signal_group(proc.pid, signal.SIGKILL, message.job_id)
                proc.wait()
                raise
            try:
                loop.run_until(lambda: job.finished)
            except BaseException:  # e.g. KeyboardInterrupt: the child must not outlive us
                job.abort()
                raise
            _log_output(message, stdout)
            return job.result(stderr)


class _ChildJob(Supervisor):
    """One job in one child process: its protocol pipe read, its end judged."""

    log = logger

    def __init__(
        self,
        runner: PythonRunner,
        proc: subprocess.Popen,
        proto: int,
        job_id: str,
        set_status: SetStatus,
        loop: PollLoop,
    ) -> None:
        self.set_status = set_status
        self.outcome: Outcome | None = None
        self._proto = proto
        self._buffer = b""
        self._end: tuple[int | None, str | None] = (None, None)
        self._error: Exception | None = None
        super().__init__(
            proc,
            loop,
            ((proto, self._feed),),
            label=job_id,
            grace=runner.grace,
            timeout=runner.settings.timeout,
            stop_fd=runner.stop.fd,
        )

    def on_end(self, code: int | None, stopped: str | None) -> None:
        self._end = (code, stopped)
        self.release()

    def on_error(self, exc: Exception) -> None:
        self._error = exc

    def release(self) -> None:
        super().release()
        os.close(self._proto)

    def result(self, stderr: IO[bytes]) -> Outcome:
        """The job's outcome, once the child is gone (``stderr``: what it wrote there)."""
        if self.outcome is not None:  # the runner's word wins, even if it was slow to exit
            return self.outcome
        if self._error is not None:
            return Outcome.failed(
                f"internal error while supervising the runner process: {self._error}"
            )
        code, stopped = self._end
        if stopped is not None:
            return stop_outcome(stopped, self.timeout)
        if code is None:
            return Outcome.failed("the runner process could not be stopped")
        how = killed_by(code) if code < 0 else f"exited with code {code}"
        return Outcome.failed(f"runner process {how} without an outcome; stderr: {_tail(stderr)}")

    def _feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._handle(line)

    def _handle(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            if "status" in event:
                self.set_status(Status.parse(event["status"]), str(event.get("message", "")))
            elif "outcome" in event:
                self.outcome = _outcome_from(event)
                # A runner may leave non-daemon threads behind: the child gets
                # kill_grace seconds to exit by itself.
                self.set_deadline(self.grace, _LINGERING)
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning(
                "job %s: bad line from runner child: %r (%s)", self.label, line[:200], exc
            )


def _start_child(
    settings: RunnerSettings, message: Message, stdout: IO[bytes], stderr: IO[bytes]
) -> tuple[subprocess.Popen, int]:
    """Starts the child in a session of its own; returns it and its protocol pipe."""
    req_r, req_w = os.pipe()
    out_r, out_w = os.pipe()
    command = [settings.python or sys.executable, "-m", "rbit.runners.child", settings.target]
    try:
        # An argv list from the config, no shell: message content never reaches it.
        proc = subprocess.Popen(  # noqa: S603
            command,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            pass_fds=(req_r, out_w),
            env=_child_env(req_r, out_w),
            start_new_session=True,
        )
    except OSError:
        os.close(req_w)
        os.close(out_r)
        raise
    finally:
        # The child's ends: kept open here, EOF would never reach either side.
        os.close(req_r)
        os.close(out_w)
    logger.debug("job %s: runner child %d started", message.job_id, proc.pid)
    _send_request(req_w, json.dumps(_request(message, settings.settings)) + "\n")
    return proc, out_r


def _send_request(fd: int, line: str) -> None:
    # A writer thread: a huge body must not deadlock against a child that is
    # already printing statuses we have not read yet.
    def write() -> None:
        try:
            with os.fdopen(fd, "wb") as pipe:
                pipe.write(line.encode())
        except OSError:  # the child died early; its exit is reported by the job
            pass

    threading.Thread(target=write, name="rbit-child-feed", daemon=True).start()


def _request(message: Message, settings: Mapping[str, str]) -> dict[str, Any]:
    return {
        "body": base64.b64encode(message.body).decode("ascii"),
        "queue": message.queue,
        "headers": json_safe(dict(message.headers or {})),
        "redelivered": bool(message.redelivered),
        "message_id": message.message_id,
        "content_type": message.content_type,
        "allowed_classes": sorted(message.allowed_classes),
        "settings": dict(settings),
    }


def json_safe(value: Any) -> Any:
    """``value`` with bytes as text and anything else not JSON as its ``str``."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _outcome_from(event: Mapping[str, Any]) -> Outcome:
    kind = event["outcome"]
    reason = str(event.get("reason") or "")
    delay = event.get("delay")
    makers = {"done": Outcome.done, "failed": Outcome.failed, "rejected": Outcome.rejected}
    if kind == "blocked":
        return Outcome.blocked(reason, None if delay is None else float(delay))
    return makers[kind](reason)


def _child_env(in_fd: int, out_fd: int) -> dict[str, str]:
    env = dict(os.environ)
    # The child interpreter may be another Python: it must still find rbit itself.
    root = str(Path(__file__).resolve().parents[2])
    paths = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env[IN_FD_ENV] = str(in_fd)
    env[OUT_FD_ENV] = str(out_fd)
    return env


def _check_in_interpreter(python: str, target: str) -> None:
    """Resolve ``target`` inside the interpreter that will run it."""
    command = [python, "-m", "rbit.runners.child", "--check", target]
    env = _child_env(-1, -1)
    try:
        done = subprocess.run(  # noqa: S603 (argv from the config, no shell)
            command, capture_output=True, env=env, timeout=120, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RunnerLoadError(f"cannot run {python!r}: {exc}") from exc
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    try:
        answer = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = done.stderr.decode("utf-8", "replace")[-STDERR_TAIL:]
        raise RunnerLoadError(f"{python!r} could not check {target!r}: {tail.strip()}") from None
    if answer.get("error"):
        raise RunnerLoadError(f"in {python}: {answer['error']}")
    if answer.get("batch"):
        raise RunnerLoadError(
            f"{target!r} is a batch runner; those cannot run in another interpreter"
        )


def _tail(stream: IO[bytes]) -> str:
    stream.seek(0, os.SEEK_END)
    size = stream.tell()
    stream.seek(max(0, size - STDERR_TAIL))
    return stream.read().decode("utf-8", "replace").strip()


def _log_output(message: Message, stdout: IO[bytes]) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("job %s: runner stdout ends: %s", message.job_id, _tail(stdout))
