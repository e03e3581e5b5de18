"""What a job's process finds in its environment: what it needs, never a secret.

Real configs (``load_config``), real commands and real child interpreters; each test
reads the environment the job's process actually had.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from worker_helpers import WorkerProcess, wait_until, write_config

from rbit.config import RunnerSettings, load_config
from rbit.errors import RunnerLoadError
from rbit.message import Message
from rbit.outcome import Kind
from rbit.runners.environment import DEFAULT_KEEP
from rbit.runners.python import load_python_runner
from rbit.runners.shell import ShellRunner

TESTS_DIR = Path(__file__).resolve().parent
DUMP = ("shell!{pyexe} -c \"import json, os, sys; "
        "json.dump(dict(os.environ), open(sys.argv[1], 'w'))\" {out}")
SECRETS = {"MQ_PASSWORD": "hunter2-mq", "FRONT_TOKEN": "tok-5150", "MQ_URL_VAR": "amqp://u:pw@h/v"}


def _config(tmp_path: Path, runner_keys: dict[str, str], runner: str = DUMP) -> Path:
    """A config reading three secrets from the environment: password, token, url."""
    child = "python" if runner.startswith("python!") else "pyexe"
    lines = [
        "[rbit]", "name = w", "",
        "[amqp]", "host = localhost", "user = rbit", "password = ${MQ_PASSWORD}", "",
        "[status]", "sinks = log", "http_url = http://front/${FRONT_TOKEN}", "",
        "[runner:q]", f"runner = {runner}", f"{child} = {sys.executable}",
        f"out = {tmp_path / 'env.json'}", "extra_url = ${MQ_URL_VAR}",
    ]
    lines += [f"{key} = {value}" for key, value in runner_keys.items()]
    path = tmp_path / "rbit.ini"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PLAIN_SETTING", "plain")
    monkeypatch.setenv("LC_PAPER", "en_GB.UTF-8")
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))
    return SECRETS


def _runner(config: Path) -> RunnerSettings:
    return load_config(str(config)).runners[0]


def _shell_env(tmp_path: Path, **keys: str) -> dict[str, str]:
    runner = ShellRunner(_runner(_config(tmp_path, keys)))
    try:
        outcome = runner.run(Message(body=b"", queue="q", message_id="job-1"), _ignore)
    finally:
        runner.close()
    assert outcome.kind is Kind.DONE, outcome
    return json.loads((tmp_path / "env.json").read_text())


def _ignore(*_args) -> None:
    pass


def _assert_no_secret(env: dict[str, str]) -> None:
    for name, value in SECRETS.items():
        assert name not in env
        assert not any(value in seen for seen in env.values()), name


def test_config_records_the_variables_it_read_into_secret_keys(tmp_path, environ):
    settings = load_config(str(_config(tmp_path, {"note": "${PLAIN_SETTING}"})))
    assert settings.secret_env == frozenset(SECRETS)
    assert settings.runners[0].secret_env == frozenset(SECRETS)


def test_shell_job_keeps_the_default_allow_list_and_nothing_else(tmp_path, environ):
    env = _shell_env(tmp_path)
    _assert_no_secret(env)
    assert "PLAIN_SETTING" not in env
    assert env["LC_PAPER"] == "en_GB.UTF-8"  # LC_* is in the default list
    assert env["PATH"]
    assert env["RBIT_JOB_ID"] == "job-1"
    assert {"PATH", "HOME", "LANG", "LC_*"} <= set(DEFAULT_KEEP)


@pytest.mark.parametrize("keep", ["*", "MQ_PASSWORD, FRONT_TOKEN MQ_URL_VAR", "MQ_*, *TOKEN*"])
def test_secrets_never_reach_a_shell_job_even_when_env_keep_names_them(
        tmp_path, environ, keep):
    env = _shell_env(tmp_path, env_keep=keep)
    _assert_no_secret(env)
    if keep == "*":
        assert env["PLAIN_SETTING"] == "plain"  # everything else is kept


def test_empty_env_keep_leaves_only_rbits_variables(tmp_path, environ):
    env = _shell_env(tmp_path, env_keep="")
    assert "PATH" not in env
    assert "PLAIN_SETTING" not in env
    assert {name for name in env if not name.startswith("RBIT_")} <= {"PWD", "SHLVL", "_",
                                                                     "LC_CTYPE"}


def test_setenv_sets_variables_one_per_line_over_kept_ones(tmp_path, environ):
    env = _shell_env(tmp_path, setenv="BUILD_MODE = release\n  LC_PAPER=C\n  EMPTY=")
    assert env["BUILD_MODE"] == "release"
    assert env["LC_PAPER"] == "C"
    assert env["EMPTY"] == ""


def test_setenv_that_would_pass_a_secret_is_refused_when_the_runner_loads(tmp_path, environ):
    config = _config(tmp_path, {"setenv": "MY_PASS = x${MQ_PASSWORD}x"})
    with pytest.raises(RunnerLoadError) as caught:
        ShellRunner(_runner(config))
    assert "MQ_PASSWORD" in str(caught.value)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize("keys", [{"setenv": "no equals sign"}, {"setenv": "1BAD=x"},
                                  {"env_keep": "PATH, $HOME"}])
def test_malformed_env_keys_are_load_errors_naming_the_section(tmp_path, environ, keys):
    with pytest.raises(RunnerLoadError, match=r"runner:q: (setenv|env_keep)"):
        ShellRunner(_runner(_config(tmp_path, keys)))


def test_python_child_gets_the_same_environment_without_secrets(tmp_path, environ):
    config = _config(tmp_path, {"env_keep": "*", "setenv": "BUILD_MODE=debug"},
                     runner="python!env_runners:dump_env")
    runner = load_python_runner(_runner(config))
    try:  # a warm child serves the job: closed with the runner
        outcome = runner.run(Message(body=b"{}", queue="q", message_id="job-2"), _ignore)
    finally:
        runner.close(5)
    assert outcome.kind is Kind.DONE, outcome
    env = json.loads((tmp_path / "env.json").read_text())
    _assert_no_secret(env)
    assert env["PLAIN_SETTING"] == "plain"
    assert env["BUILD_MODE"] == "debug"


def test_python_child_default_environment_drops_unlisted_variables(tmp_path, environ):
    config = _config(tmp_path, {}, runner="python!env_runners:dump_env")
    runner = load_python_runner(_runner(config))
    try:  # a warm child serves the job: closed with the runner
        outcome = runner.run(Message(body=b"{}", queue="q", message_id="job-3"), _ignore)
    finally:
        runner.close(5)
    assert outcome.kind is Kind.DONE, outcome
    env = json.loads((tmp_path / "env.json").read_text())
    _assert_no_secret(env)
    assert "PLAIN_SETTING" not in env


def test_a_worker_whose_broker_url_comes_from_the_environment_keeps_it_from_jobs(
        tmp_path, rabbit, vhost, amqp, monkeypatch):
    url = rabbit.url(vhost)
    monkeypatch.setenv("RBIT_TEST_BROKER_URL", url)
    out = tmp_path / "env.json"
    config = write_config(tmp_path, "${RBIT_TEST_BROKER_URL}", {
        "envjobs": {"runner": DUMP, "pyexe": sys.executable,
                    "out": out, "env_keep": "*"}})
    worker = WorkerProcess(config)
    try:
        wait_until(lambda: "envjobs" in rabbit.list_queues(vhost), 20, "the worker's queue")
        amqp.publish(b"{}", exchange="", routing_key="envjobs", message_id="env-1")
        wait_until(out.exists, 20, "the job's environment")
        env = json.loads(wait_until(out.read_text, 5, "the whole file"))
    finally:
        worker.signal(15)
        code = worker.wait(30)
    assert "RBIT_TEST_BROKER_URL" not in env
    assert not any(url in value for value in env.values())
    assert env["RBIT_JOB_ID"] == "env-1"
    assert code == 0, worker.output
