"""Warm child processes for ``python!`` runners: one interpreter serves many jobs.

A ``python!`` section with ``python =`` or ``timeout =`` runs its jobs in child
processes (:mod:`rbit.runners.child`). A :class:`ChildPool` keeps up to
``concurrency`` of them warm: each is started once (at worker start, under the
section's interpreter), imports the runner once, then runs jobs one at a time over its
JSON-lines pipes. A job thread borrows an idle child for one job and gives it back.

Each child is a :class:`WarmChild`, supervised like any process rbit starts
(:class:`rbit.supervisor.Supervisor`): it leads a process group (and session) of its
own; while a job runs, the borrowing thread watches its pipes, its exit and the job's
deadline from the child's private :class:`rbit.fdloop.PollLoop`. A job that ends
normally costs that thread one write, one ``poll`` (the deadline as its timeout) and
one read: no timer, no callback; anything else that wakes the poll (the child's exit,
a stop, a cancel, the deadline) hands over to the loop.

* A job past ``timeout`` has its child's whole group stopped (SIGTERM, SIGKILL after
  ``kill_grace``) and fails with ``timed out after N s``; a child that dies mid-job
  (a signal, ``os._exit``, the OOM killer) fails that job only. Either way a fresh child
  is started for the slot at once.
* A job cancelled (a PyBit ``CancelRequest``, :attr:`rbit.message.Message.cancelled`)
  has its child's group stopped the same way; the job ends Cancelled and a fresh child
  takes the slot.
* A child is retired after the job that reaches ``max_jobs_per_child`` or leaves it
  above ``max_memory_per_child`` bytes of RSS (``/proc/<pid>/statm``): its request pipe
  is closed, which it reads as "exit now", and a fresh child takes the slot.
* A child that dies while idle is replaced without failing anything: the job it
  was lent for finds its request pipe closed, and goes to another child.
* A child notices a dead worker through a lifeline pipe and kills its own group (see
  :mod:`rbit.runners.child`); closing the pool retires idle children, and a child still
  busy is retired when its job ends.

What a warm child shares between jobs: everything a Python process keeps -- imported
modules, module globals, caches, open files, threads the runner started, the current
directory and environment changes it made. ``max_jobs_per_child = 1`` gives every job
a fresh interpreter again.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from rbit.decoding import DEFAULT_ALLOWED_CLASSES
from rbit.fdloop import PollLoop
from rbit.message import Message
from rbit.outcome import Outcome, Status
from rbit.supervisor import (
    CANCELLED,
    READ_SIZE,
    StopSignal,
    Supervisor,
    close_fds,
    killed_by,
    signal_group,
    stop_outcome,
)
from rbit.usage import Usage

if TYPE_CHECKING:  # a runner child never imports the configuration: it starts faster
    from rbit.config import RunnerSettings

logger = logging.getLogger("rbit.runners.python")

#: Environment variables naming the child's protocol and lifeline file descriptors.
IN_FD_ENV = "RBIT_PROTOCOL_IN_FD"
OUT_FD_ENV = "RBIT_PROTOCOL_OUT_FD"
LIFELINE_FD_ENV = "RBIT_LIFELINE_FD"
#: Bytes of the child's stderr quoted when it dies without an outcome.
STDERR_TAIL = 2000

_RETIRED = "retired child did not exit after its last job"
_REAP_WAIT = 15.0  # beyond the grace: SIGKILL, then reaping (rbit.supervisor)

SetStatus = Callable[..., None]

_monotonic = time.monotonic

# The protocol's codecs, for both sides of the pipes (rbit.runners.child too), built
# once. json.dumps and JSONEncoder.encode build a C encoder (and a closure) per call,
# JSONDecoder.decode matches a regex on either side of the document: on a line of
# ~100 bytes, that is most of the cost, and each job pays it twice on each side.
_DECODER = json.JSONDecoder()
_SCAN = _DECODER.scan_once
_JSON_SPACE = " \t\n\r"  # what the json module skips around a document


def decode_json(text: str) -> Any:
    """The JSON document ``text``, as :func:`json.loads` reads it (same errors too)."""
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:  # not JSON at its start (or leading space): decode() says which
        return _DECODER.decode(text)
    if end == len(text) or not text[end:].strip(_JSON_SPACE):
        return value
    return _DECODER.decode(text)  # raises "Extra data"


def _make_encoder() -> Callable[[Any], str]:
    """``JSONEncoder(separators=(",", ":")).encode``, with the C encoder built once.

    No circular-reference check (``markers`` None): what crosses the pipes is built
    as a tree by rbit (a broadcast's result is checked with :func:`json.dumps` first).
    Where the C accelerator is missing (or differs), the plain encoder.
    """
    plain = json.JSONEncoder(separators=(",", ":"))
    make = getattr(json.encoder, "c_make_encoder", None)
    try:
        encoder = make(None, plain.default, json.encoder.encode_basestring_ascii,  # type: ignore[misc]
                       None, ":", ",", False, False, True)
        probe = {"a": [1, 2.5, None, True, "\u00e9\n"]}
        if "".join(encoder(probe, 0)) != plain.encode(probe):
            return plain.encode
    except Exception:  # no C accelerator, or another signature
        return plain.encode
    return lambda value: "".join(encoder(value, 0))


encode_json = _make_encoder()


class ChildPool:
    """Up to ``concurrency`` warm children for one runner section; any thread may borrow.

    Args:
        settings: The section (``python``, ``target``, ``timeout``, ``concurrency``,
            ``max_jobs_per_child``, ``max_memory_per_child``).
        grace: Seconds between SIGTERM and SIGKILL (``kill_grace``).
        stop: Set when the worker stops for good; stops running children.
        env: The children's environment (:func:`rbit.runners.environment.job_environment`:
            no secrets), completed by :func:`child_env`.
    """

    def __init__(self, settings: RunnerSettings, grace: float, stop: StopSignal,
                 env: Mapping[str, str]) -> None:
        self.settings = settings
        self.grace = grace
        self.stop = stop
        self.env = env
        self._idle: list[WarmChild] = []
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Start ``concurrency`` children now, so that the first jobs find them warm."""
        for _ in range(self.settings.concurrency - len(self._idle)):
            if not self._add_child():
                return

    def run(self, message: Message, set_status: SetStatus) -> Outcome:
        """Run one job in an idle child (started now if none is) and give the child back.

        Args:
            message: The job.
            set_status: Receives ``(Status, message)`` for every status reported.
        """
        if self.stop.is_set():
            return Outcome.blocked(self.stop.reason)
        if message.is_cancelled():  # cancelled since the pool let it start
            return Outcome.cancelled("cancelled before it started")
        try:
            child, idle = self._borrow()
        except OSError as exc:
            return Outcome.failed(f"cannot start runner process: {exc}")
        line = (encode_json(request(message, self.settings.settings)) + "\n").encode("utf-8")
        running = [True]
        # A CancelRequest comes on the I/O thread: it wakes the child's loop, which stops
        # the child's group as a timeout does. The child is replaced; the job ends
        # Cancelled (rbit.dispatch).
        message.on_cancel(lambda: running[0] and child.cancel(message))
        try:
            while (outcome := child.run_job(message.job_id, line, set_status, message,
                                            idle)) is None:
                # It had exited while idle, before it could take the job: nothing failed.
                _lost(child)
                try:
                    child, idle = self._borrow()
                except OSError as exc:
                    return Outcome.failed(f"cannot start runner process: {exc}")
        except BaseException:  # e.g. KeyboardInterrupt: the child must not outlive us
            child.abort()
            raise
        finally:
            running[0] = False
        self._give_back(child)
        return outcome

    def close(self, timeout: float) -> None:
        """Retire idle children (busy ones when their job ends); wait up to ``timeout``."""
        with self._lock:
            self._closed = True
            children, self._idle = self._idle, []
        for child in children:
            child.retire()
        for child in children:
            child.wait_gone(timeout)

    # ------------------------------------------------------------------ the slots

    def _borrow(self) -> tuple[WarmChild, bool]:
        """An idle child (True: it may have exited since), else one started now (False).

        Whether an idle child still runs is not asked here (a ``waitid`` per job): its
        request meets a closed pipe if it does not (:meth:`WarmChild.run_job`).
        """
        with self._lock:
            child = self._idle.pop() if self._idle else None
        if child is None:
            return spawn(self.settings, self.grace, self.stop, self.env), False
        return child, True

    def _give_back(self, child: WarmChild) -> None:
        if child.usable() and not self._retiring(child):
            with self._lock:
                if not self._closed:
                    self._idle.append(child)
                    return
        # The slot's next child starts first: it boots while this one exits.
        self._add_child()
        child.retire()
        child.wait_gone(self.grace + _REAP_WAIT)

    def _retiring(self, child: WarmChild) -> bool:
        limit = self.settings.max_jobs_per_child
        if limit is not None and child.jobs >= limit:
            logger.debug("runner child %d retires after %d jobs", child.proc.pid, child.jobs)
            return True
        memory = self.settings.max_memory_per_child
        if memory is not None:
            rss = rss_bytes(child.proc.pid)
            if rss is not None and rss > memory:
                logger.info("runner child %d retires: RSS %d bytes is above %d",
                            child.proc.pid, rss, memory)
                return True
        return False

    def _add_child(self) -> bool:
        """Start a child for an idle slot; False if none should or could be started."""
        if self._closed or self.stop.is_set():
            return False
        try:
            child = spawn(self.settings, self.grace, self.stop, self.env)
        except OSError as exc:  # the next job tries again, and fails with the reason
            logger.error("[runner:%s]: cannot start runner process: %s",
                         self.settings.queue, exc)
            return False
        with self._lock:
            if not self._closed:
                self._idle.append(child)
                return True
        child.retire()
        child.wait_gone(self.grace + _REAP_WAIT)
        return False


class WarmChild(Supervisor):
    """One long-lived child process: sends it jobs, hears their statuses and outcomes.

    Used by one thread at a time; its loop runs only while that thread waits for it.
    """

    log = logger

    def __init__(
        self,
        proc: subprocess.Popen,
        pipes: tuple[int, int, int],
        output: tuple[IO[bytes], IO[bytes]],
        *,
        grace: float,
        timeout: float | None,
        stop_fd: int,
    ) -> None:
        self._requests, replies, _ = pipes
        self._replies = replies
        self._idle = _idle_label(proc.pid)
        self._stdout, self._stderr = output
        self.jobs = 0
        self._job: _Job | None = None
        self._buffer = b""
        self._end: tuple[int | None, str | None] = (None, None)
        self._stderr_tail = ""
        self._error: Exception | None = None
        # Our ends of its pipes; also closed if the pool is dropped unclosed, so that
        # the child reads EOF and exits.
        self._pipes = list(pipes)
        self._fds = weakref.finalize(self, _close_all, self._pipes, output)
        # Wakes the loop for a cancel (:meth:`cancel`); one pipe for the child's life.
        self._wake_lock = threading.Lock()
        self._cancel_key: object = None
        try:
            wake_r, self._wake_w = os.pipe()
            self._pipes += (wake_r, self._wake_w)
            os.set_blocking(self._wake_w, False)
            super().__init__(proc, PollLoop(), ((replies, self._feed),),
                             label=self._idle, grace=grace, stop_fd=stop_fd)
        except BaseException:
            # spawn() closes the pipes it made; ours go now, and none twice later (a
            # closed number is soon another file's).
            self._fds.detach()
            close_fds(*self._pipes[len(pipes):])
            raise
        self.timeout = timeout  # per job, set by run_job, not for the child's whole life
        self._watch(wake_r, lambda: self._on_wake(wake_r))

    def run_job(self, job_id: str, line: bytes, set_status: SetStatus,
                key: object = None, idle: bool = False) -> Outcome | None:
        """Run one job (``line``: its request) to its outcome; the child may die of it.

        ``key`` names the job for :meth:`cancel` (its message). With ``idle`` (a child
        that waited for jobs), None if it had exited before the request: its end of
        the pipe is closed, it took nothing. A child started for the job that dies at
        once fails it, with its stderr (a broken interpreter or environment).
        """
        if not _send(self._requests, line) and idle:
            return None
        job = self._job = _Job(set_status, key)
        self.label = job_id
        end = None if self.timeout is None else _monotonic() + self.timeout
        if not self._wait_reply(job, end):
            if end is not None and not self.finished:
                self.set_deadline(max(0.0, end - _monotonic()))
            self.loop.run_until(lambda: job.outcome is not None or self.finished)
        self._job = None
        self.jobs += 1
        if job.outcome is None:
            return self._end_outcome()
        _log_output(job_id, self._stdout)
        self.label = self._idle
        return job.outcome

    def cancel(self, key: object) -> None:
        """Stop the job named ``key`` (any thread): SIGTERM, SIGKILL after the grace.

        The child's loop belongs to the thread that runs the job: this only wakes it,
        and the loop stops the child the way a timeout does. A wake-up that comes once
        that job is over (or before it began) stops nothing else.
        """
        with self._wake_lock:
            if self._wake_w < 0:
                return
            self._cancel_key = key
            with contextlib.suppress(BlockingIOError):  # full: already awake
                os.write(self._wake_w, b"x")

    def usable(self) -> bool:
        """Whether the child can take another job."""
        return not self.finished and self.stopped is None and not self._exited

    def retire(self) -> None:
        """Ask the child to exit (EOF on its requests); stop it if it has not within grace."""
        if self.finished:
            return
        if self._requests in self._pipes:
            self._pipes.remove(self._requests)
            os.close(self._requests)
        self.set_deadline(self.grace, _RETIRED)

    def wait_gone(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the child's end; kill it after that."""
        if self.finished:
            return
        wake = self.loop.call_later(timeout, lambda: None)  # to look at the clock then
        deadline = time.monotonic() + timeout
        self.loop.run_until(lambda: self.finished or time.monotonic() >= deadline)
        wake.cancel()
        if not self.finished:
            self.abort()

    # ----------------------------------------------------------- Supervisor hooks

    def on_end(self, code: int | None, stopped: str | None) -> None:
        self._end = (code, stopped)
        if self._job is not None:  # quoted in the job's outcome
            self._stderr_tail = tail(self._stderr)
        self.release()

    def on_error(self, exc: Exception) -> None:
        self._error = exc

    def release(self) -> None:
        with self._wake_lock:  # no cancel writes to a closed (or reused) fd
            self._wake_w = -1
        super().release()
        self._fds()  # the pipes and output files, once

    # ---------------------------------------------------------------- internals

    def _end_outcome(self) -> Outcome:
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
        return Outcome.failed(
            f"runner process {how} without an outcome; stderr: {self._stderr_tail}"
        )

    def _wait_reply(self, job: _Job, end: float | None) -> bool:
        """The usual course of a job: its replies, read until the outcome; True then.

        Waits on the loop's own poll object for the reply pipe alone, with the job's
        deadline as the poll's timeout: no timer and no callbacks for a job that ends
        normally. Anything else -- the child's exit, a stop or a cancel, the deadline,
        EOF -- returns False, with the rest left to the loop (the deadline still to
        be set): what made the poll return is still ready when the loop polls.
        """
        if self.loop.has_timers() or self.finished:
            return False
        poll = self.loop.poller.poll
        replies = self._replies
        while True:
            timeout = None if end is None else max(0, math.ceil((end - _monotonic()) * 1000))
            ready = poll(timeout)
            if len(ready) != 1 or ready[0][0] != replies:
                return False
            chunk = os.read(replies, READ_SIZE)
            if not chunk:  # EOF stays readable: the loop's stream reader ends it
                return False
            try:
                self._feed(chunk)
            except Exception as exc:  # as in a loop callback (Supervisor._guard)
                self.failed(exc)
                return False
            if job.outcome is not None:
                return True

    def _on_wake(self, fd: int) -> None:
        os.read(fd, 64)
        job = self._job
        if job is not None and job.outcome is None and job.key is self._cancel_key is not None:
            self.stop(CANCELLED)

    def _feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._handle(line)

    def _handle(self, line: bytes) -> None:
        job = self._job
        try:
            event = decode_json(line.decode("utf-8"))
            if job is None:
                return  # a stray line between jobs (the child drops them; an old child may not)
            if "status" in event:
                job.set_status(Status.parse(event["status"]), str(event.get("message", "")))
            elif "outcome" in event:
                # Before the loop looks at its timers: a deadline due now must not stop
                # a child whose job has ended.
                self.clear_deadline()
                job.outcome = outcome_from(event)
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning(
                "job %s: bad line from runner child: %r (%s)", self.label, line[:200], exc
            )


class _Job:
    __slots__ = ("set_status", "key", "outcome")

    def __init__(self, set_status: SetStatus, key: object) -> None:
        self.set_status = set_status
        self.key = key
        self.outcome: Outcome | None = None


def spawn(settings: RunnerSettings, grace: float, stop: StopSignal,
          env: Mapping[str, str]) -> WarmChild:
    """Start one child for ``settings`` in a session of its own.

    Raises:
        OSError: The interpreter could not be started.
    """
    req_r, req_w = os.pipe()
    out_r, out_w = os.pipe()
    life_r, life_w = os.pipe()
    output = (_output_file(), _output_file())
    command = [settings.python or sys.executable, "-m", "rbit.runners.child", settings.target]
    try:
        # An argv list from the config, no shell: message content never reaches it.
        proc = subprocess.Popen(  # noqa: S603
            command,
            stdin=subprocess.DEVNULL,
            stdout=output[0],
            stderr=output[1],
            pass_fds=(req_r, out_w, life_r),
            env=child_env(env, {IN_FD_ENV: req_r, OUT_FD_ENV: out_w, LIFELINE_FD_ENV: life_r}),
            start_new_session=True,
        )
    except OSError:
        close_fds(req_w, out_r, life_w)
        for file in output:
            file.close()
        raise
    finally:
        # The child's ends: kept open here, EOF would never reach either side.
        close_fds(req_r, out_w, life_r)
    os.set_blocking(req_w, False)
    try:
        child = WarmChild(proc, (req_w, out_r, life_w), output, grace=grace,
                          timeout=settings.timeout, stop_fd=stop.fd)
    except BaseException:
        close_fds(req_w, out_r, life_w)
        signal_group(proc.pid, signal.SIGKILL, "runner child")
        proc.wait()
        raise
    logger.debug("[runner:%s]: runner child %d started", settings.queue, proc.pid)
    return child


def child_env(base: Mapping[str, str], fds: Mapping[str, int]) -> dict[str, str]:
    """A runner child's environment: ``base`` (a job's), rbit importable, ``fds`` named."""
    env = dict(base)
    # The child interpreter may be another Python: it must still find rbit itself.
    root = str(Path(__file__).resolve().parents[2])
    paths = [root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update({name: str(fd) for name, fd in fds.items()})
    return env


def rss_bytes(pid: int) -> int | None:
    """Resident set size of ``pid`` in bytes, or None where ``/proc`` cannot tell."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as file:
            return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def request(message: Message, settings: Mapping[str, str]) -> dict[str, Any]:
    """The JSON request that carries ``message`` to a child.

    What a child takes as the default is left out: empty ``headers`` and ``settings``,
    ``redelivered`` when false, ``allowed_classes`` when it is the default allow-list.
    """
    doc: dict[str, Any] = {
        "body": base64.b64encode(message.body).decode("ascii"),
        "queue": message.queue,
        "message_id": message.message_id,
        "content_type": message.content_type,
    }
    if message.headers:
        doc["headers"] = json_safe(dict(message.headers))
    if message.redelivered:
        doc["redelivered"] = True
    classes = message.allowed_classes
    if classes is not DEFAULT_ALLOWED_CLASSES and classes != DEFAULT_ALLOWED_CLASSES:
        doc["allowed_classes"] = _sorted_classes(classes)
    if settings:
        doc["settings"] = dict(settings)
    if message.broadcast:  # the child sends the runner's return value back
        doc["broadcast"] = True
    return doc


@functools.lru_cache(maxsize=16)
def _sorted_classes(classes: frozenset[str]) -> tuple[str, ...]:
    # One allow-list per runner section: sorted once, not per job.
    return tuple(sorted(classes))


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


def outcome_from(event: Mapping[str, Any]) -> Outcome:
    """The :class:`Outcome` a child reported."""
    kind = event["outcome"]
    reason = str(event.get("reason") or "")
    if kind == "blocked":
        delay = event.get("delay")
        outcome = Outcome.blocked(reason, None if delay is None else float(delay))
    elif "result" in event:  # a broadcast copy's result (rbit.broadcast)
        outcome = dataclasses.replace(_MAKERS[kind](reason), result=event["result"])
    else:
        outcome = _MAKERS[kind](reason)
    usage = event.get("usage")  # absent from an older child's outcome
    return outcome if usage is None else outcome.with_usage(Usage.from_dict(usage))


_MAKERS = {"done": Outcome.done, "failed": Outcome.failed, "rejected": Outcome.rejected}


def _send(fd: int, data: bytes) -> bool:
    """Writes a request without blocking; False if nobody reads the pipe any more.

    What the pipe cannot take at once goes from a thread.
    """
    try:
        written = os.write(fd, data)
    except BlockingIOError:
        written = 0
    except BrokenPipeError:  # the child is gone, or going: its read end is closed
        return False
    if written < len(data):
        # A body bigger than the pipe: the child reads it while we watch its replies.
        copy = os.dup(fd)
        threading.Thread(target=_write_rest, args=(copy, data[written:]),
                         name="rbit-child-feed", daemon=True).start()
    return True


def _lost(child: WarmChild) -> None:
    child.abort()  # reaps it: its exit code, for the log
    logger.warning("runner child %d exited while idle (code %s); starting another",
                   child.proc.pid, child.proc.returncode)


def _write_rest(fd: int, data: bytes) -> None:
    try:
        os.set_blocking(fd, True)
        with os.fdopen(fd, "wb") as pipe:
            pipe.write(data)
    except OSError:  # the child died meanwhile
        pass


def _output_file() -> IO[bytes]:
    # Appending: the child's writes follow its truncation at each job's start
    # (rbit.runners.child), whatever offset our reads of the tail left.
    file = tempfile.TemporaryFile()  # noqa: SIM115 - the child's whole life, closed on release
    flags = fcntl.fcntl(file.fileno(), fcntl.F_GETFL)
    fcntl.fcntl(file.fileno(), fcntl.F_SETFL, flags | os.O_APPEND)
    return file


def _idle_label(pid: int) -> str:
    return f"(idle child {pid})"


def tail(stream: IO[bytes]) -> str:
    """The last :data:`STDERR_TAIL` bytes of ``stream``, as text."""
    stream.seek(0, os.SEEK_END)
    size = stream.tell()
    stream.seek(max(0, size - STDERR_TAIL))
    return stream.read().decode("utf-8", "replace").strip()


def _close_all(fds: list[int], files: tuple[IO[bytes], ...]) -> None:
    while fds:
        os.close(fds.pop())
    for file in files:
        file.close()


def _log_output(job_id: str, stdout: IO[bytes]) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("job %s: runner stdout ends: %s", job_id, tail(stdout))
