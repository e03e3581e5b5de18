"""What the dashboard's buttons do, through the paths of ``rbit ctl`` and ``dead-letters``.

The same commands (signed with the configured key when ``[control]``
or ``[security]`` has one), the same replay and purge code.

Each action opens its own short session (actions are rare, and the gathering thread
keeps its sessions to itself) and runs one at a time.
"""

from __future__ import annotations

import io
import threading
from typing import Any

from rbit.amqp.admin import AdminSession
from rbit.amqp.fleet import FleetSession
from rbit.config import Settings
from rbit.control.client import ask
from rbit.control.commands import Command
from rbit.deadletters import operator_signer, purge, replay
from rbit.errors import QueueNotFound, RbitError

#: How long an action waits for the workers' replies.
ACTION_TIMEOUT = 5.0


class ActionError(RbitError):
    """An action that cannot be done as asked (unknown queue or worker)."""


class Actions:
    """Pause, resume, shutdown, replay and purge for one fleet.

    Args:
        settings: The dashboard's config.
        signer: Signs control commands (:func:`rbit.control.authority.command_signer`).
    """

    def __init__(self, settings: Settings, signer: Any = None) -> None:
        self._settings = settings
        self._signer = signer
        self._replay_signer = operator_signer(settings)
        self._lock = threading.Lock()

    def pause(self, queue: str, workers: list[str]) -> dict[str, Any]:
        """Pause ``queue`` on each of ``workers`` (those that consume it)."""
        return self._command("pause", queue, workers)

    def resume(self, queue: str, workers: list[str]) -> dict[str, Any]:
        """Resume ``queue`` on each of ``workers`` (those that paused it)."""
        return self._command("resume", queue, workers)

    def shutdown(self, worker: str) -> dict[str, Any]:
        """Stop ``worker`` gracefully, as SIGTERM does."""
        return self._ask(Command("shutdown"), [worker])

    def _command(self, name: str, queue: str, workers: list[str]) -> dict[str, Any]:
        if not workers:
            raise ActionError(f"no worker serves {queue!r}")
        return self._ask(Command(name, queue=queue), workers)

    def _ask(self, command: Command, workers: list[str]) -> dict[str, Any]:
        answers = []
        with self._lock, FleetSession(self._settings.amqp, "rbit dashboard action") as fleet:
            for worker in workers:
                result = ask(fleet, command, worker, ACTION_TIMEOUT, signer=self._signer)
                answers.extend({"worker": r.get("worker"), "ok": bool(r.get("ok")),
                                "error": r.get("error") or r.get("refused")}
                               for r in result["replies"])
                answers.extend({"worker": m["name"], "ok": False, "error": "no answer"}
                               for m in result["missing"])
        return {"ok": bool(answers) and all(a["ok"] for a in answers), "answers": answers}

    def replay(self, queue: str) -> dict[str, Any]:
        """Move every dead letter of ``queue`` back to it (:func:`rbit.deadletters.replay`)."""
        runner = self._runner(queue)
        out = io.StringIO()
        with self._lock, AdminSession(self._settings.amqp, "rbit dashboard action") as session:
            try:
                count = replay(session, queue, None, out, signer=self._replay_signer,
                               max_skew=self._settings.security.max_skew,
                               signed_only=self._settings.require_signed(runner))
            except QueueNotFound:
                count = 0
        return {"ok": True, "count": count, "message": out.getvalue().strip()}

    def purge(self, queue: str) -> dict[str, Any]:
        """Delete every dead letter of ``queue`` (:func:`rbit.deadletters.purge`)."""
        self._runner(queue)
        out = io.StringIO()
        with self._lock, AdminSession(self._settings.amqp, "rbit dashboard action") as session:
            try:
                count = purge(session, queue, None, out)
            except QueueNotFound:
                count = 0
        return {"ok": True, "count": count, "message": out.getvalue().strip()}

    def _runner(self, queue: str) -> Any:
        for runner in self._settings.runners:
            if runner.queue == queue:
                return runner
        raise ActionError(f"no [runner:{queue}] section in the dashboard's config")
