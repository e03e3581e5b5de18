"""python! runners that end badly or talk after their end (tests/test_worker_job_end.py)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

_RAISES = {
    "keyboard": KeyboardInterrupt,
    "exit": lambda: SystemExit(3),
    "base": lambda: BaseException("not an Exception"),
}


def raise_base(message, set_status, settings) -> None:
    """Raises what the body names (``{"raise": "keyboard"}``); else records the job."""
    kind = json.loads(message.body).get("raise")
    if kind:
        raise _RAISES[kind]()
    (Path(settings["outdir"]) / f"{message.job_id}.done").write_text("ok")


def late_status(message, set_status, settings) -> None:
    """Returns at once; a thread it leaves behind reports a status half a second later."""
    marker = Path(settings["outdir"]) / f"{message.job_id}.late"

    def later() -> None:
        set_status("Building", "after the end")
        marker.write_text("called")

    threading.Timer(0.5, later).start()
