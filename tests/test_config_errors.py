"""What the operator sees when the config is wrong: ``python -m rbit CONFIG`` as a real
process, its stderr naming file, section, key and reason, its exit code 78 (EX_CONFIG).

The broker address is unreachable on purpose: every error here must be found before
rbit tries to connect (which would exit 69 instead).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
ROOT_DIR = TESTS_DIR.parent
EXIT_CONFIG = 78  # README: "the configuration is invalid"

HEAD = """\
[rbit]
name = w1

[amqp]
url = amqp://guest:guest@127.0.0.1:1/
connect_timeout = 1
"""


def run_rbit(tmp_path: Path, text: str) -> tuple[int, str, Path]:
    """Run ``python -m rbit`` on ``text``; returns exit code, stderr and the file."""
    path = tmp_path / "worker.ini"
    path.write_text(HEAD + text, encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT_DIR), str(TESTS_DIR)])
    done = subprocess.run(
        [sys.executable, "-m", "rbit", str(path)], cwd=str(tmp_path), env=env,
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False,
    )
    return done.returncode, done.stderr.decode("utf-8", "replace"), path


def assert_config_error(stderr: str, path: Path, section: str, key: str | None,
                        reason: str) -> str:
    """The one error line, checked for file, section, key and reason; returned."""
    lines = [line for line in stderr.splitlines() if "configuration error" in line]
    assert len(lines) == 1, stderr
    line = lines[0]
    assert f"file {path}" in line
    assert f"section [{section}]" in line
    if key is not None:
        assert f"key {key!r}" in line
    assert reason in line
    assert "Traceback" not in stderr
    return line


# --- runners that cannot be loaded --------------------------------------------------------

LOAD_ERRORS = [
    ("nosuch.mod:f", "cannot import 'nosuch.mod': ModuleNotFoundError"),
    ("broken_runner_modules:f", "cannot import 'broken_runner_modules': RuntimeError: broken"),
    ("exiting_runner_module:f", "cannot import 'exiting_runner_module': SystemExit: 3"),
    ("runners_for_tests:no_such_function", "has no attribute 'no_such_function'"),
    ("runners_for_tests:time", "is not callable"),
]


@pytest.mark.parametrize("where", ["thread", "child"])
@pytest.mark.parametrize(("target", "reason"), LOAD_ERRORS)
def test_a_runner_that_cannot_be_loaded_names_file_section_key_and_reason(
    tmp_path: Path, target: str, reason: str, where: str
) -> None:
    section = "[runner:cnx_any_latex_pdf]\nrunner = python!" + target + "\n"
    if where == "child":
        section += f"python = {sys.executable}\n"

    code, stderr, path = run_rbit(tmp_path, section)

    assert code == EXIT_CONFIG
    line = assert_config_error(stderr, path, "runner:cnx_any_latex_pdf", "runner", reason)
    assert len(line) < 1000  # the 100 kB import error is quoted in part, on one line


def test_a_broken_batch_runner_names_its_section(tmp_path: Path) -> None:
    # A class whose constructor needs other arguments fails to start as a batch runner.
    code, stderr, path = run_rbit(
        tmp_path, "[runner:credits]\nrunner = python!runners_for_tests:Path\n")

    assert code == EXIT_CONFIG
    assert_config_error(stderr, path, "runner:credits", "runner", "failed to start")


# --- values rbit refuses -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("retry_backoff", "1e308", "expected a number >= 1 and <= 100, got '1e308'"),
        ("retry_max_delay", "1e308", "<= 1.2096e+06, got '1e308'"),
        ("timeout", "1e308", "<= 1.2096e+06, got '1e308'"),
        ("kill_grace", "1e308", "<= 3600, got '1e308'"),
        ("max_retries", "9" * 5000, "expected an integer >= 0 and <= 100000, got '999"),
        ("concurrency", "100000000", "<= 1000"),
        ("prefetch", "70000", "<= 65535"),
    ],
)
def test_a_number_out_of_range_is_a_config_error_not_a_traceback(
    tmp_path: Path, key: str, value: str, reason: str
) -> None:
    code, stderr, path = run_rbit(
        tmp_path, f"[runner:q]\nrunner = shell!true\n{key} = {value}\n")

    assert code == EXIT_CONFIG
    line = assert_config_error(stderr, path, "runner:q", key, reason)
    assert len(line) < 500  # a huge value is quoted in part


def test_a_retry_policy_needing_too_many_delay_queues_is_refused(tmp_path: Path) -> None:
    text = ("[runner:q]\nrunner = shell!true\nmax_retries = 1000\nretry_delay = 1\n"
            "retry_backoff = 1.001\nretry_max_delay = 100000\n")

    code, stderr, path = run_rbit(tmp_path, text)

    assert code == EXIT_CONFIG
    assert_config_error(stderr, path, "runner:q", "retry_backoff", "delay queues")


@pytest.mark.parametrize(
    ("queue", "reason"),
    [
        ("amq.x", "reserved by RabbitMQ"),
        ("q" * 240, "longer than 238 bytes"),
    ],
)
def test_a_queue_name_rabbitmq_would_refuse_is_a_config_error(
    tmp_path: Path, queue: str, reason: str
) -> None:
    code, stderr, path = run_rbit(tmp_path, f"[runner:{queue}]\nrunner = shell!true\n")

    assert code == EXIT_CONFIG
    assert_config_error(stderr, path, f"runner:{queue}", None, reason)


def test_a_routing_key_longer_than_amqp_allows_is_a_config_error(tmp_path: Path) -> None:
    code, stderr, path = run_rbit(
        tmp_path, "[runner:q]\nrunner = shell!true\nrouting_key = " + "r" * 256 + "\n")

    assert code == EXIT_CONFIG
    assert_config_error(stderr, path, "runner:q", "routing_key", "longer than 255 bytes")


def test_a_config_without_runner_sections_is_refused(tmp_path: Path) -> None:
    code, stderr, path = run_rbit(tmp_path, "")

    assert code == EXIT_CONFIG
    lines = [line for line in stderr.splitlines() if "configuration error" in line]
    assert len(lines) == 1, stderr
    assert f"file {path}" in lines[0]
    assert "no [runner:<queue>] section" in lines[0]


def test_a_poll_time_beyond_a_day_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "worker.ini"
    path.write_text(HEAD + "[runner:q]\nrunner = shell!true\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "rbit", str(path), "--poll-time", "1e308"],
        cwd=str(ROOT_DIR), capture_output=True, timeout=60, check=False,
    )

    assert done.returncode == 2  # README: bad command line
    assert b"--poll-time must be > 0 and <= 86400" in done.stderr


def test_a_valid_config_gets_past_validation_to_the_broker(tmp_path: Path) -> None:
    # The control: the same file with a loadable runner fails only at connecting (69).
    code, stderr, _ = run_rbit(
        tmp_path, "[runner:q]\nrunner = python!runners_for_tests:succeed\n")

    assert code == 69, stderr
    assert "configuration error" not in stderr
