"""A worker loads at start only what its configuration uses.

Every module a worker imports is start-up time paid before its first job: the optional
subsystems (schedules, the HTTP endpoint, the PyBit front-end's HTTP client, signed jobs)
load only when a section asks for them. Each probe runs in a fresh interpreter, which
builds the worker as ``rbit CONFIG`` does (without connecting) and lists what it loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rbit import config
from rbit.schedule import settings as schedule_settings

ROOT = Path(__file__).resolve().parent.parent

#: Modules a worker with one python! runner, the log sink and its history must not load.
#: (sqlite3 is not here: the state store keeps the history in it.)
OPTIONAL = (
    "http.server", "http.client", "email", "rbit.observe.http", "rbit.observe.metrics",
    "prometheus_client", "cronsim", "zoneinfo", "ctypes", "rbit.schedule.settings",
    "rbit.schedule.watch", "rbit.schedule.inotify", "rbit.schedule.fired",
    "rbit.schedule.listen", "rbit.security", "cryptography", "rbit.client", "rbit.runners.shell",
)

PROBE = """
import json, sys
import rbit.cli
from rbit.config import check_worker, load_config
from rbit.observe.worker import WorkerObservation
from rbit.systemd import Notifier
from rbit.worker import Worker

settings = load_config(sys.argv[1])
check_worker(settings)
observation = WorkerObservation(Worker(settings), Notifier(None))
print(json.dumps([name for name in json.loads(sys.argv[2]) if name in sys.modules]))
observation.close()
"""

MINIMAL = """\
[rbit]
name = probe
state_dir = {state}
history_depth = 100

[amqp]
url = amqp://guest:guest@127.0.0.1:1/

[status]
sinks = log

[runner:probe.jobs]
runner = python!probe_jobs:noop
"""


def _loaded(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "probe_jobs.py").write_text("def noop(message):\n    return None\n")
    path = tmp_path / "rbit.ini"
    path.write_text(text.format(state=tmp_path / "state"))
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), json.dumps(OPTIONAL)], cwd=tmp_path,
        env={"PYTHONPATH": f"{ROOT}:{tmp_path}", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_a_minimal_worker_loads_no_optional_subsystem(tmp_path):
    assert _loaded(tmp_path, MINIMAL) == []


def test_the_probe_sees_the_subsystems_a_configuration_asks_for(tmp_path):
    # The same probe with [http] and a cron schedule: what the first test rules out loads.
    text = MINIMAL + ("\n[http]\nbind = 127.0.0.1:0\n\n[schedule:nightly]\nqueue = probe.jobs\n"
                      "cron = 0 3 * * *\ntimezone = Europe/Paris\n")
    loaded = _loaded(tmp_path, text)
    for name in ("http.server", "rbit.observe.http", "cronsim", "zoneinfo",
                 "rbit.schedule.settings"):
        assert name in loaded


def test_the_configuration_names_schedule_sections_as_their_module_does():
    # rbit.config matches [schedule:...] sections without loading rbit.schedule.settings.
    assert config._SCHEDULE_PREFIX == schedule_settings.SECTION_PREFIX
