"""A runner for the dashboard's browser test: it fails while told to, then succeeds.

The body is JSON: ``{"fail": TEXT}`` fails with ``TEXT`` as long as the file ``fixed``
does not exist in ``outdir`` (so a replayed dead letter can run once it is there);
``{"sleep": S}`` runs S seconds. Each run that succeeds appends its job id to ``runs``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def work(message, set_status, settings):
    order = json.loads(message.body or b"{}")
    outdir = Path(settings["outdir"])
    if order.get("fail") and not (outdir / "fixed").exists():
        raise RuntimeError(order["fail"])
    set_status("Building", "working")
    time.sleep(float(order.get("sleep", 0)))  # the job's work, as long as the order says
    with open(outdir / "runs", "a") as stream:
        stream.write(message.job_id + "\n")
