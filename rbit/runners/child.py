"""The child-process side of a ``python!`` runner (``python -m rbit.runners.child``).

Usage::

    python -m rbit.runners.child pkg.module:func          # run one job
    python -m rbit.runners.child --check pkg.module:func  # can this interpreter load it?

To run a job, the child reads one JSON object (the job) from the file descriptor named
by ``RBIT_PROTOCOL_IN_FD`` and writes JSON lines to the one named by
``RBIT_PROTOCOL_OUT_FD``: ``{"status": ..., "message": ...}`` for every status the
runner reports, then one ``{"outcome": kind, "reason": ..., "delay": ...}``. Stdout and
stderr stay free for the runner's own output. No pickle crosses the pipe.

``--check`` prints one JSON line on stdout: ``{"ok": true, "batch": bool}`` or
``{"error": reason}``.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

from rbit.errors import RunnerLoadError
from rbit.message import Message
from rbit.outcome import Outcome, Status
from rbit.runners.python import (
    IN_FD_ENV,
    OUT_FD_ENV,
    call_runner,
    describe_exception,
    is_batch_factory,
    resolve_target,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one job (or ``--check``); returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 2 and args[0] == "--check":
        return check(args[1])
    if len(args) != 1:
        print(
            "usage: python -m rbit.runners.child [--check] package.module:callable", file=sys.stderr
        )
        return 2
    return run_job(args[0], int(os.environ[IN_FD_ENV]), int(os.environ[OUT_FD_ENV]))


def check(target: str) -> int:
    """Report whether ``target`` resolves in this interpreter."""
    try:
        answer: dict[str, Any] = {"ok": True, "batch": is_batch_factory(resolve_target(target))}
    except RunnerLoadError as exc:
        answer = {"error": str(exc)}
    print(json.dumps(answer), flush=True)
    return 0


def run_job(target: str, in_fd: int, out_fd: int) -> int:
    """Read the job from ``in_fd``, run ``target`` on it, report on ``out_fd``."""
    # Grandchildren (os.system, subprocess) must not hold the protocol pipe open.
    os.set_inheritable(in_fd, False)
    os.set_inheritable(out_fd, False)
    with os.fdopen(in_fd, "rb") as source:
        request = json.loads(source.readline())
    channel = _Channel(os.fdopen(out_fd, "w", encoding="utf-8"))
    try:
        func = resolve_target(target)
        outcome = call_runner(
            func, _message(request), channel.status, request.get("settings") or {}
        )
    except Exception as exc:  # loading failed: the job fails with the reason
        outcome = Outcome.failed(describe_exception(exc))
    channel.send({"outcome": outcome.kind.value, "reason": outcome.reason, "delay": outcome.delay})
    return 0


class _Channel:
    """The protocol pipe; runners may report statuses from several threads."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._stream.write(json.dumps(event) + "\n")
            self._stream.flush()

    def status(self, status: Status, message: str) -> None:
        self.send({"status": status.value, "message": message})


def _message(request: dict[str, Any]) -> Message:
    return Message(
        body=base64.b64decode(request["body"]),
        queue=request["queue"],
        headers=request.get("headers") or {},
        redelivered=bool(request.get("redelivered")),
        message_id=request.get("message_id"),
        content_type=request.get("content_type"),
        allowed_classes=frozenset(request.get("allowed_classes") or ()),
    )


if __name__ == "__main__":
    sys.exit(main())
