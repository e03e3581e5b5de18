"""``rbit broadcast`` against real worker processes on the real broker.

Each worker has a ``python!`` runner returning who ran the copy and a ``shell!`` runner
printing the job id and the body: the answers prove each worker ran its own copy.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from worker_helpers import ROOT_DIR, TESTS_DIR, WorkerProcess, wait_until, write_config

from rbit.broadcast import BroadcastExit, broadcast
from rbit.broadcast import main as broadcast_main
from rbit.config import load_config
from rbit.control.client import main as ctl_main
from rbit.runners.shell.readers import OUTPUT_BYTES
from rbit.security import keys

PY = "bcast_py"
SH = "bcast_sh"
BIG = "bcast_big"
ODD = "bcast_odd"
SLOW = "bcast_slow"
SHELL = "shell!sh -c 'echo \"$RBIT_JOB_ID\"; cat'"


def runners(name: str, out: Path, **extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = {
        PY: {"runner": "python!broadcast_runners:describe", "tag": name, "outdir": out},
        SH: {"runner": SHELL},
        BIG: {"runner": "shell!sh -c 'head -c 100000 /dev/zero | tr \"\\\\0\" x'"},
        ODD: {"runner": "python!broadcast_runners:unserialisable"},
        SLOW: {"runner": "python!broadcast_runners:slow", "tag": name, "outdir": out},
    }
    found.update(extra)
    return found


def start(tmp_path: Path, url: str, name: str, sections: dict[str, dict[str, Any]],
          security: str = "") -> tuple[Path, WorkerProcess]:
    config = write_config(tmp_path, url, sections, rbit={"name": name}, name=f"{name}.ini")
    if security:
        with open(config, "a") as handle:
            handle.write(security)
    proc = WorkerProcess(config)
    try:
        wait_until(lambda: _pinged(config, name) or proc.proc.poll() is not None,
                   timeout=60, what=f"{name} to answer ping")
        assert proc.proc.poll() is None, proc.output
    except AssertionError:
        proc.kill()
        raise
    return config, proc


def _pinged(config: Path, name: str) -> bool:
    out = io.StringIO()
    ctl_main([str(config), "ping", "--worker", name, "--json", "--timeout", "1"], out=out)
    text = out.getvalue()
    return bool(text) and any(r.get("worker") == name for r in json.loads(text)["replies"])


def by_worker(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["worker"]: r for r in result["replies"]}


@pytest.fixture
def fleet(tmp_path, rabbit, vhost, out):
    """Three workers (w2's python! runs in a warm child); stopped after the test."""
    url = rabbit.url(vhost)
    procs: dict[str, WorkerProcess] = {}
    configs: dict[str, Path] = {}
    try:
        for name in ("w1", "w2", "w3"):
            extra = {}
            if name == "w2":  # a timeout runs python! in a warm child process
                extra = {PY: {"runner": "python!broadcast_runners:describe", "tag": name,
                              "outdir": out, "timeout": 60}}
            configs[name], procs[name] = start(tmp_path, url, name,
                                               runners(name, out, **extra))
        yield configs, procs
    finally:
        for proc in procs.values():
            proc.kill()


def test_three_workers_answer_with_their_python_and_shell_results(fleet, out):
    configs, procs = fleet
    settings = load_config(configs["w1"])
    result = broadcast(settings, PY, b"hello", timeout=30, job_id="census-1")
    assert result["missing"] == []
    answers = by_worker(result)
    assert set(answers) == {"w1", "w2", "w3"}
    for name, answer in answers.items():
        assert answer["ok"] is True, answer
        assert answer["status"] == "Done"
        assert answer["job_id"] == "census-1"
        assert answer["result"] == {"tag": name, "pid": answer["result"]["pid"],
                                    "body": "hello", "broadcast": True}
        assert (out / f"{name}-census-1").exists()
    # Thread runners run in the worker; w2's in a child of it.
    assert answers["w1"]["result"]["pid"] == procs["w1"].proc.pid
    assert answers["w2"]["result"]["pid"] != procs["w2"].proc.pid

    out_text = io.StringIO()
    code = broadcast_main([str(configs["w1"]), SH, "some body", "--job-id", "census-2",
                           "--timeout", "30", "--json"], out=out_text)
    assert code == BroadcastExit.OK == 0
    shell = json.loads(out_text.getvalue())
    assert {name: a["result"] for name, a in by_worker(shell).items()} == \
        dict.fromkeys(("w1", "w2", "w3"), "census-2\nsome body")
    assert all(a["truncated"] is False for a in shell["replies"])


def test_a_shell_result_is_cut_at_64_kib_and_an_unserialisable_one_is_an_error(fleet):
    configs, _procs = fleet
    settings = load_config(configs["w1"])
    big = broadcast(settings, BIG, b"", timeout=30)
    assert len(big["replies"]) == 3
    assert big["missing"] == []
    for answer in big["replies"]:
        assert answer["ok"] is True
        assert answer["result"] == "x" * OUTPUT_BYTES
        assert answer["truncated"] is True

    out_text = io.StringIO()
    code = broadcast_main([str(configs["w1"]), ODD, "--timeout", "30", "--json"], out=out_text)
    assert code == BroadcastExit.FAILED == 1
    odd = json.loads(out_text.getvalue())
    assert len(odd["replies"]) == 3
    for answer in odd["replies"]:
        assert answer["ok"] is False
        assert "not JSON-serialisable" in answer["error"]


def test_a_worker_killed_first_is_named_missing_within_the_timeout(fleet, out):
    configs, procs = fleet
    procs["w3"].kill()
    started = time.monotonic()
    # Through the real command line: the exit code says a worker did not answer.
    done = subprocess.run(
        [sys.executable, "-m", "rbit", "broadcast", str(configs["w1"]), PY, "hi",
         "--timeout", "8"],
        cwd=str(ROOT_DIR), capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": f"{ROOT_DIR}:{TESTS_DIR}"})
    elapsed = time.monotonic() - started
    assert done.returncode == BroadcastExit.NOT_ANSWERED == 4, done.stdout + done.stderr
    assert "w3: no answer (last seen on" in done.stdout
    assert "w1: ok: " in done.stdout
    assert "w2: ok: " in done.stdout
    assert elapsed < 8 + 20  # the timeout, plus starting an interpreter on a busy machine


def test_a_worker_that_dies_mid_job_is_reported_missing_not_waited_for(fleet, out):
    configs, procs = fleet
    settings = load_config(configs["w1"])
    killed: list[bool] = []

    def kill_w2_once_it_runs() -> None:
        wait_until(lambda: (out / "started-w2").exists(), timeout=60, what="w2's job")
        procs["w2"].kill()
        killed.append(True)

    killer = threading.Thread(target=kill_w2_once_it_runs, daemon=True)
    killer.start()
    started = time.monotonic()
    result = broadcast(settings, SLOW, b"", timeout=15)
    elapsed = time.monotonic() - started
    killer.join(60)
    assert killed
    # Nobody finishes a 120 s job in 15 s: all three are missing, and the wait ended
    # at the timeout although w2 died.
    assert [m["name"] for m in result["missing"]] == ["w1", "w2", "w3"]
    assert result["replies"] == []
    assert 15 <= elapsed < 15 + 10


def test_a_worker_without_a_runner_for_the_queue_is_not_expected(
        tmp_path, rabbit, vhost, out):
    url = rabbit.url(vhost)
    procs = []
    try:
        config, proc = start(tmp_path, url, "both", runners("both", out))
        procs.append(proc)
        _, proc = start(tmp_path, url, "shell-only", {SH: {"runner": SHELL}})
        procs.append(proc)
        started = time.monotonic()
        result = broadcast(load_config(config), PY, b"x", timeout=30)
        assert set(by_worker(result)) == {"both"}
        assert result["missing"] == []
        assert time.monotonic() - started < 20  # every worker expected answered: no wait
        shell = broadcast(load_config(config), SH, b"x", timeout=30)
        assert set(by_worker(shell)) == {"both", "shell-only"}
    finally:
        for proc in procs:
            proc.kill()


def test_an_unsigned_broadcast_to_a_signed_runner_is_refused_and_never_runs(
        tmp_path, rabbit, vhost, out):
    trusted, private = tmp_path / "trusted", tmp_path / "private"
    trusted.mkdir()
    for name in ("alice", "worker"):
        keys.generate(name, private)
        os.replace(private / f"{name}.pub", trusted / f"{name}.pub")
    security = (f"[security]\nsigning_key = {private / 'worker.key'}\n"
                f"trusted_keys = {trusted}\nrequire_signed = yes\nmax_skew = 60\n"
                f"replay_file = {tmp_path / 'replay.sqlite'}\n")
    url = rabbit.url(vhost)
    sections = {PY: {"runner": "python!broadcast_runners:describe", "tag": "signed",
                     "outdir": out, "max_retries": 0}}
    config, proc = start(tmp_path, url, "signed", sections, security)
    try:
        unsigned = write_config(tmp_path, url, sections, name="caller.ini")
        out_text = io.StringIO()  # a caller without signing_key
        code = broadcast_main([str(unsigned), PY, "rm -rf", "--job-id", "evil-2", "--json",
                               "--timeout", "30"], out=out_text)
        assert code == BroadcastExit.REFUSED == 5
        [answer] = json.loads(out_text.getvalue())["replies"]
        assert answer["refused"] is True
        assert answer["ok"] is False
        assert "unsigned job" in answer["error"]
        assert not (out / "signed-evil-2").exists()

        signed = write_config(tmp_path, url, sections, name="alice.ini")
        with open(signed, "a") as handle:
            handle.write(f"[security]\nsigning_key = {private / 'alice.key'}\n")
        result = broadcast(load_config(signed), PY, b"fine", job_id="good-1", timeout=30)
        [answer] = result["replies"]
        assert answer["ok"] is True
        assert answer["result"]["body"] == "fine"
    finally:
        proc.kill()
