"""``python!pkg.module:func`` runners.

A plain runner is a callable ``func(message, set_status, settings)``:

* ``message`` -- a :class:`rbit.message.Message`;
* ``set_status(status, message="")`` -- report a PyBit status (``Waiting``,
  ``Blocked``, ``Building``, ``Done``, ``Failed``, ``Cancelled``, ``Uploaded``,
  case-insensitive); an unknown status raises ``ValueError`` in the runner;
* ``settings`` -- a dict of the runner section's other keys.

How the call ends decides the job's :class:`rbit.outcome.Outcome`; what it returns is
ignored, except for a broadcast copy (:mod:`rbit.broadcast`), whose caller gets it
(it must be JSON-serialisable):

* returning normally: done, unless the last status the runner set is terminal --
  ``Failed`` makes the outcome failed (with that status' message), ``Done``,
  ``Uploaded`` and ``Cancelled`` leave it done;
* raising :class:`rbit.errors.Blocked` (``reason``, ``delay``): blocked, the job is
  republished after a delay;
* raising :class:`rbit.errors.Reject`: rejected, the job goes to the dead letters;
  so does an uncaught :class:`rbit.errors.DecodeError` (a body that never decodes);
* raising anything else: failed, with ``"ExcType: message"`` and the traceback --
  ``SystemExit``, ``KeyboardInterrupt`` and any other ``BaseException`` included: they
  end the job, never the worker thread that ran it.

By default the callable runs in the calling (worker) thread. With ``python = PATH`` or
``timeout = SECONDS`` in the section it runs in a warm child process instead
(:mod:`rbit.runners.warm`, :mod:`rbit.runners.child`): one per ``concurrency`` slot,
each in its own session and loading the runner once, supervised like a ``shell!``
command (:mod:`rbit.supervisor`): on ``timeout`` the whole process group gets SIGTERM,
then SIGKILL after ``kill_grace`` seconds (default 5), and the job has failed with
``timed out after N s``; a cancel (the worker's second shutdown signal) stops it the
same way and the job ends blocked (``cancelled: the worker is stopping``), to be tried
again; a child killed by a signal is reported as ``killed by signal SIGNAME``. A fresh
child replaces one that was stopped or died, and one retired by
``max_jobs_per_child`` / ``max_memory_per_child``. The child talks to rbit over a
dedicated pipe in JSON lines, so the runner's own prints on stdout/stderr cannot
disturb it.

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

import dataclasses
import importlib
import inspect
import json
import logging
import subprocess
import threading
import traceback
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from rbit.errors import Blocked, DecodeError, Reject, RunnerLoadError
from rbit.message import Message
from rbit.outcome import Outcome, Status
from rbit.runners.environment import job_environment
from rbit.runners.warm import (
    IN_FD_ENV,
    LIFELINE_FD_ENV,
    OUT_FD_ENV,
    STDERR_TAIL,
    ChildPool,
    child_env,
)
from rbit.schedule import nextrun
from rbit.schedule.nextrun import RunNext
from rbit.supervisor import CANCEL_REASON, DEFAULT_KILL_GRACE, StopSignal, kill_grace
from rbit.usage import thread_mark, thread_usage

if TYPE_CHECKING:  # a runner child never imports the configuration: it starts faster
    from rbit.config import RunnerSettings

logger = logging.getLogger(__name__)

#: Seconds between SIGTERM and SIGKILL by default (``kill_grace``).
KILL_GRACE = DEFAULT_KILL_GRACE

__all__ = [  # the child's side imports the protocol's names from here
    "IN_FD_ENV", "LIFELINE_FD_ENV", "OUT_FD_ENV", "STDERR_TAIL", "PythonRunner",
    "call_runner", "describe_exception", "is_batch_factory", "load_python_runner",
    "resolve_target",
]

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
            _check_in_interpreter(runner.python, runner.target, job_environment(runner))
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
        value = func(message, tracker, dict(settings))
    except RunNext as exc:  # next = job: the schedule's next run (rbit.schedule.nextrun)
        value = exc
    except Blocked as exc:
        return Outcome.blocked(exc.reason, exc.delay)
    except Reject as exc:
        return Outcome.rejected(exc.reason)
    except DecodeError as exc:  # the body will never decode: retrying cannot help
        return Outcome.rejected(f"undecodable body: {exc}")
    except BaseException as exc:  # SystemExit, KeyboardInterrupt too: the thread lives on
        return Outcome.failed(describe_exception(exc))
    if isinstance(value, RunNext):
        nextrun.report(message.job_id, value)
    elif message.broadcast:  # the caller of a broadcast gets the return value
        return dataclasses.replace(tracker.outcome(), result=value)
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
        self._children: ChildPool | None = None
        self.env: dict[str, str] = {}  # a child's, without secrets: built once
        if self.in_child or func is None:
            self.grace = kill_grace(settings.settings, settings.queue)
            self.env = job_environment(settings)
            self._children = ChildPool(settings, self.grace, self.stop, self.env)

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
        if self._children is not None:
            return self._children.run(message, set_status)
        mark = thread_mark()
        outcome = call_runner(self._func, message, set_status, self.settings.settings)
        return outcome.with_usage(thread_usage(mark))

    def cancel(self) -> None:
        """Stop running child processes (SIGTERM now, SIGKILL after ``kill_grace``).

        Meant for shutdown: jobs that would start afterwards end blocked at once, as
        those stopped do. In-thread runners cannot be interrupted; for them this is a
        no-op.
        """
        self.stop.set(CANCEL_REASON, wake=True)

    def start(self) -> None:
        """Start the warm children (one per ``concurrency`` slot), if jobs run in them."""
        if self._children is not None:
            self._children.start()

    def close(self, timeout: float) -> None:
        """Let the children go: idle ones now, busy ones once their job ends."""
        if self._children is not None:
            self._children.close(timeout)


def _check_in_interpreter(python: str, target: str, env: dict[str, str]) -> None:
    """Resolve ``target`` inside the interpreter that will run it, in a job's ``env``."""
    command = [python, "-m", "rbit.runners.child", "--check", target]
    env = child_env(env, {})
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
