"""python! runners that end badly or talk after their end (tests/test_worker_job_end.py)."""

from __future__ import annotations

import json
import threading
import time
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
    """Returns at once; a thread it leaves behind reports a status after the job settled.

    The thread waits (30 s at most) for ``<job id>.settled``, which the test creates once
    it saw the job's final status.
    """
    outdir = Path(settings["outdir"])
    settled = outdir / f"{message.job_id}.settled"

    def later() -> None:
        deadline = time.monotonic() + 30
        while not settled.exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # the polling interval of a bounded wait
        set_status("Building", "after the end")
        (outdir / f"{message.job_id}.late").write_text("called")

    threading.Thread(target=later, daemon=True).start()
