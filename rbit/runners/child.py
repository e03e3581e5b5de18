"""The child-process side of a ``python!`` runner (``python -m rbit.runners.child``).

Usage::

    python -m rbit.runners.child pkg.module:func          # serve jobs until EOF
    python -m rbit.runners.child --check pkg.module:func  # can this interpreter load it?

A child loads the runner once, then serves jobs one at a time: it reads one JSON object
a line (a job, :func:`rbit.runners.warm.request`) from the file descriptor named by
``RBIT_PROTOCOL_IN_FD`` and writes JSON lines to the one named by
``RBIT_PROTOCOL_OUT_FD``: ``{"status": ..., "message": ...}`` for every status the
runner reports, then one ``{"outcome": kind, "reason": ..., "delay": ..., "usage":
{...}}`` for the job, without ``reason`` when it is empty and ``delay`` when there is
none (``usage``: what the job used, measured by the child itself, :mod:`rbit.usage`;
with ``"result"``, the runner's return value, when the request has ``"broadcast":
true``). EOF on the request pipe means the worker wants it gone: it exits. Stdout and
stderr stay free for the runner's own output: files the worker reads back (the tail of
stderr when a child dies mid-job), which the child empties between jobs (stdout as a
job starts, stderr once a job's outcome is sent), so that what is quoted is that job's
own. No pickle crosses the pipe.

The worker also holds the write end of a lifeline pipe (``RBIT_LIFELINE_FD``) that it
never writes. It reads as EOF only once every copy is closed, that is when the worker
is gone, even killed with SIGKILL mid-job: a watchdog thread then kills the child's
whole process group, so that no child outlives its worker. (``PR_SET_PDEATHSIG`` would
not do: it fires when the *thread* that started the child ends, and a job thread may
end while another thread's job runs in the child it started.)

``--check`` prints one JSON line on stdout: ``{"ok": true, "batch": bool}`` or
``{"error": reason}``.
"""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from rbit.decoding import DEFAULT_ALLOWED_CLASSES
from rbit.errors import RunnerLoadError
from rbit.message import BroadcastMessage, Message
from rbit.outcome import Outcome, Status
from rbit.runners.python import (
    IN_FD_ENV,
    LIFELINE_FD_ENV,
    OUT_FD_ENV,
    call_runner,
    describe_exception,
    is_batch_factory,
    resolve_target,
)
from rbit.runners.warm import decode_json, encode_json
from rbit.usage import ProcessMeter


def main(argv: Sequence[str] | None = None) -> int:
    """Serve jobs (or ``--check``); returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] == "--check":
        return check(args[1])
    if len(args) != 1:
        print(
            "usage: python -m rbit.runners.child [--check] package.module:callable", file=sys.stderr
        )
        return 2
    lifeline = os.environ.get(LIFELINE_FD_ENV)
    if lifeline is not None:
        watch_lifeline(int(lifeline))
    return serve(args[0], int(os.environ[IN_FD_ENV]), int(os.environ[OUT_FD_ENV]))


def check(target: str) -> int:
    """Report whether ``target`` resolves in this interpreter."""
    try:
        answer: dict[str, Any] = {"ok": True, "batch": is_batch_factory(resolve_target(target))}
    except RunnerLoadError as exc:
        answer = {"error": str(exc)}
    print(json.dumps(answer), flush=True)
    return 0


def serve(target: str, in_fd: int, out_fd: int) -> int:
    """Load ``target`` once, then run each job read from ``in_fd`` until EOF."""
    # Grandchildren (os.system, subprocess) must not hold the protocol pipes open.
    os.set_inheritable(in_fd, False)
    os.set_inheritable(out_fd, False)
    channel = _Channel(out_fd)
    func: Callable[..., Any] | None = None
    error = ""
    try:
        func = resolve_target(target)
    except Exception as exc:  # every job fails with the reason, as a fresh child's would
        error = describe_exception(exc)
    meter = ProcessMeter()
    _empty(2)  # what the start printed (warnings on import) is no job's
    with os.fdopen(in_fd, "rb") as source:
        for line in source:
            request = decode_json(line.decode("utf-8"))
            _empty(1)  # the stdout the worker logs (at DEBUG) after a job is that job's
            status = channel.job_status()
            mark = meter.mark()
            if func is None:
                outcome = Outcome.failed(error)
            else:
                outcome = call_runner(
                    func, _message(request), status, request.get("settings") or {}
                )
            status.close()
            event = _outcome_event(outcome, bool(request.get("broadcast")))
            event["usage"] = meter.usage(mark).to_dict()
            channel.send(event)
            # The stderr the worker quotes when a job dies is that job's own. Emptied
            # once the outcome is out, while the worker reads it: not on a job's path.
            _empty(2)
    return 0


def _empty(fd: int) -> None:
    """Truncates an output file (stdout, stderr), if the last job wrote to it.

    The worker's copy of the file shares its size; a truncation costs a write, the
    size alone does not. A runner that closed or redirected the fd keeps its output.
    """
    try:
        if os.lseek(fd, 0, os.SEEK_END):
            os.ftruncate(fd, 0)
    except OSError:  # closed, a pipe or a tty: nothing of ours to empty
        pass


def _outcome_event(outcome: Outcome, broadcast: bool) -> dict[str, Any]:
    # An empty reason and no delay are left out: the worker reads them as such.
    event: dict[str, Any] = {"outcome": outcome.kind.value}
    if outcome.reason:
        event["reason"] = outcome.reason
    if outcome.delay is not None:
        event["delay"] = outcome.delay
    if broadcast:  # the return value goes back to the broadcast's caller, as JSON
        try:
            json.dumps(outcome.result)
        except (TypeError, ValueError) as exc:
            return {"outcome": "failed", "reason": f"the result is not JSON-serialisable: {exc}"}
        event["result"] = outcome.result
    return event


def watch_lifeline(fd: int) -> None:
    """Kill this process group once ``fd`` reads EOF (the worker is gone)."""
    os.set_inheritable(fd, False)

    def watch() -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            try:
                poller.poll()
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                continue
            # Nobody writes it: readable means every writer is gone.
            os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, name="rbit-lifeline", daemon=True).start()


class _Channel:
    """The protocol pipe; runners may report statuses from several threads."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, event: dict[str, Any], job: _JobStatus | None = None) -> None:
        data = (encode_json(event) + "\n").encode("utf-8")
        with self._lock:
            if job is not None and not job.open:
                return
            # One write per line, straight to the pipe: nothing buffered to flush.
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]

    def job_status(self) -> _JobStatus:
        return _JobStatus(self)


class _JobStatus:
    """One job's ``set_status``: silent once its job has ended.

    A thread a runner left behind must not report statuses under the next job.
    """

    def __init__(self, channel: _Channel) -> None:
        self._channel = channel
        self.open = True

    def __call__(self, status: Status, message: str) -> None:
        self._channel.send({"status": status.value, "message": message}, self)

    def close(self) -> None:
        with self._channel._lock:  # a status being sent goes out before the outcome
            self.open = False


def _message(request: dict[str, Any]) -> Message:
    kind = BroadcastMessage if request.get("broadcast") else Message
    classes = request.get("allowed_classes")  # absent: the default allow-list
    return kind(
        body=base64.b64decode(request["body"]),
        queue=request["queue"],
        headers=request.get("headers") or {},
        redelivered=bool(request.get("redelivered")),
        message_id=request.get("message_id"),
        content_type=request.get("content_type"),
        allowed_classes=DEFAULT_ALLOWED_CLASSES if classes is None else frozenset(classes),
    )


if __name__ == "__main__":
    sys.exit(main())
