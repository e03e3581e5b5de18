"""python! runners for the job environment tests (imported by child interpreters too)."""

from __future__ import annotations

import json
import os


def dump_env(message, set_status, settings) -> None:
    """Writes the process's environment as JSON to the file named by ``settings["out"]``."""
    with open(settings["out"], "w", encoding="utf-8") as file:
        json.dump(dict(os.environ), file)
