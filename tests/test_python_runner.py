"""python! runners: outcomes in-thread and in a child process, timeouts, loading."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from rbit.config import RunnerSettings
from rbit.errors import RunnerLoadError
from rbit.message import Message
from rbit.outcome import Kind, Outcome, Status
from rbit.runners import python as python_runner
from rbit.runners.python import PythonRunner, load_python_runner
from rbit.runners.warm import decode_json, encode_json

TESTS_DIR = Path(__file__).resolve().parent
MODULE = "runners_for_tests"


def _settings(func: str, **overrides) -> RunnerSettings:
    values = {
        "queue": "cnx_any_latex_pdf",
        "runner": f"python!{MODULE}:{func}",
        "kind": "python",
        "target": f"{MODULE}:{func}",
        "routing_key": "cnx.any.latex.pdf",
    }
    values.update(overrides)
    return RunnerSettings(**values)


class Statuses:
    """A set_status that records what it was given."""

    def __init__(self) -> None:
        self.seen: list[tuple[Status, str]] = []

    def __call__(self, status, message=""):
        self.seen.append((status, message))


def _run(func: str, body: bytes = b"{}", **overrides):
    with _loaded(_settings(func, **overrides)) as runner:
        statuses = Statuses()
        outcome = runner.run(
            Message(body=body, queue="cnx_any_latex_pdf", message_id="job-1"), statuses
        )
    return outcome, statuses.seen


@contextlib.contextmanager
def _loaded(settings: RunnerSettings):
    """The runner for ``settings``, closed afterwards (its warm children let go)."""
    runner = load_python_runner(settings)
    try:
        yield runner
    finally:
        if isinstance(runner, PythonRunner):
            runner.close(10)


@pytest.fixture
def child_path(monkeypatch):
    """Lets child interpreters import the test runners, as a site's PYTHONPATH would."""
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))


# --- in-thread ---------------------------------------------------------------------


def test_returning_normally_is_done_and_statuses_are_forwarded():
    outcome, seen = _run("succeed")
    assert outcome.kind is Kind.DONE
    assert seen == [(Status.BUILDING, "working")]


def test_exception_is_failed_with_type_message_and_traceback():
    outcome, _ = _run("explode")
    assert outcome.kind is Kind.FAILED
    assert outcome.reason.startswith("KeyError: 'no such thing'")
    assert "Traceback (most recent call last)" in outcome.reason
    assert "runners_for_tests.py" in outcome.reason


def test_blocked_exception_is_blocked_with_delay():
    outcome, _ = _run("blocked")
    assert (outcome.kind, outcome.reason, outcome.delay) == (Kind.BLOCKED, "disk full", 12.5)


def test_reject_exception_is_rejected():
    outcome, _ = _run("reject")
    assert (outcome.kind, outcome.reason) == (Kind.REJECTED, "bad job")


def test_failed_status_then_return_is_failed():
    outcome, seen = _run("fail_by_status")
    assert (outcome.kind, outcome.reason) == (Kind.FAILED, "could not build")
    assert seen == [(Status.FAILED, "could not build")]


def test_last_status_decides_when_runner_returns():
    outcome, _ = _run("done_then_building")
    assert outcome.kind is Kind.DONE


def test_unknown_status_raises_value_error_in_runner_which_fails():
    outcome, seen = _run("bad_status")
    assert outcome.kind is Kind.FAILED
    assert outcome.reason.startswith("ValueError: unknown status 'Exploded'")
    assert seen == []


def test_settings_are_a_copy_of_the_section():
    received = {}
    runner = PythonRunner(
        _settings("succeed", settings={"name": "World"}), lambda m, s, cfg: received.update(cfg)
    )
    runner.run(Message(body=b"", queue="q"), Statuses())
    assert received == {"name": "World"}


def test_cancel_is_a_no_op_in_thread():
    runner = load_python_runner(_settings("succeed"))
    runner.cancel()
    assert runner.run(Message(body=b"", queue="q"), Statuses()).kind is Kind.DONE


# --- loading -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("no_such_module_for_rbit:func", "cannot import 'no_such_module_for_rbit'"),
        (f"{MODULE}:missing", "no attribute 'missing'"),
        (f"{MODULE}:not_callable", "is not callable"),
        ("just_a_module", "package.module:callable"),
    ],
)
def test_unloadable_target_raises_runner_load_error(target, reason):
    with pytest.raises(RunnerLoadError, match=reason):
        load_python_runner(_settings("x", target=target))


def test_missing_module_in_other_interpreter_raises_runner_load_error(child_path):
    with pytest.raises(RunnerLoadError, match="no_such_module_for_rbit"):
        load_python_runner(
            _settings("x", target="no_such_module_for_rbit:f", python=sys.executable)
        )


def test_class_target_is_a_batch_runner_built_with_settings_and_status_factory():
    factory = object()
    batch = load_python_runner(
        _settings("BatchCollector", settings={"a": "1"}), status_factory=factory
    )
    assert type(batch).__name__ == "BatchCollector"
    assert batch.settings == {"a": "1"}
    assert batch.status_factory is factory


def test_function_marked_rbit_batch_is_a_batch_factory():
    batch = load_python_runner(_settings("batch_function"))
    assert type(batch).__name__ == "BatchCollector"


def test_batch_class_without_submit_and_close_is_refused():
    with pytest.raises(RunnerLoadError, match="submit and close"):
        load_python_runner(_settings("NotABatch"))


# --- child process -----------------------------------------------------------------


def test_child_mode_reports_statuses_and_outcome_despite_prints(child_path):
    outcome, seen = _run(
        "chatty",
        body=b'{"greeting": "hi"}',
        python=sys.executable,
        settings={"name": "World"},
    )

    assert outcome.kind is Kind.DONE
    assert [status for status, _ in seen] == [Status.BUILDING, Status.UPLOADED]
    reply = json.loads(seen[1][1])
    assert reply["settings"] == {"name": "World"}
    assert reply["decoded"] == {"greeting": "hi"}
    assert reply["job_id"] == "job-1"
    assert reply["queue"] == "cnx_any_latex_pdf"


def test_child_mode_receives_headers_with_bytes_as_text(child_path):
    statuses = Statuses()
    message = Message(body=b"[]", queue="q", headers={"x-trace": b"abc", "n": 3})
    with _loaded(_settings("chatty", python=sys.executable)) as runner:
        assert runner.run(message, statuses).kind is Kind.DONE
    assert json.loads(statuses.seen[-1][1])["headers"] == {"x-trace": "abc", "n": 3}


@pytest.mark.parametrize("message", [
    Message(body=b"{}", queue="q"),  # every field at its default: left out of the request
    Message(body=b"\x00\xffbinary", queue="q", headers={"n": 3}, redelivered=True,
            message_id="job-7", content_type="application/octet-stream",
            allowed_classes=frozenset({"pybit.models.Job", "mysite.Thing"})),
    Message(body=b"{}", queue="q", allowed_classes=frozenset()),
], ids=["defaults", "every-field-set", "no-classes-allowed"])
@pytest.mark.parametrize("settings", [{}, {"name": "World"}], ids=["no-settings", "settings"])
def test_a_child_sees_the_message_and_settings_a_thread_sees(child_path, message, settings):
    seen = {}
    for where, extra in (("thread", {}), ("child", {"python": sys.executable})):
        statuses = Statuses()
        with _loaded(_settings("fields", settings=settings, **extra)) as runner:
            assert runner.run(message, statuses).kind is Kind.DONE
        seen[where] = json.loads(statuses.seen[-1][1])
    assert seen["child"] == seen["thread"]
    assert seen["child"]["settings"] == settings


@pytest.mark.parametrize("func", ["explode", "blocked", "reject", "fail_by_status"])
def test_child_mode_outcomes_match_in_thread_outcomes(child_path, func):
    in_thread, _ = _run(func)
    in_child, _ = _run(func, python=sys.executable)
    assert (in_child.kind, in_child.delay) == (in_thread.kind, in_thread.delay)
    assert in_child.reason.splitlines()[0] == in_thread.reason.splitlines()[0]


def test_child_crash_without_outcome_is_failed_with_exit_code_and_stderr(child_path):
    outcome, _ = _run("die", timeout=60)
    assert outcome.kind is Kind.FAILED
    assert "exited with code 3" in outcome.reason
    assert "about to die" in outcome.reason


def test_a_warm_child_dying_quotes_only_its_last_jobs_stderr(child_path):
    with _loaded(_settings("noisy_or_die", timeout=60)) as runner:
        first = runner.run(Message(body=b"{}", queue="q", message_id="job-1"), Statuses())
        second = runner.run(Message(body=b"die", queue="q", message_id="job-2"), Statuses())
    assert first.kind is Kind.DONE
    assert second.kind is Kind.FAILED
    assert "about to die" in second.reason
    assert "earlier job" not in second.reason


def test_a_warm_child_killed_while_idle_is_replaced_without_failing_a_job(child_path):
    with _loaded(_settings("fields", timeout=60)) as runner:
        runner.start()
        idle = runner._children._idle[0].proc
        os.kill(idle.pid, 9)
        assert _wait_for(lambda: _dead(idle.pid) or _zombie(idle.pid), 10)
        outcome = runner.run(Message(body=b"{}", queue="q", message_id="job-1"), Statuses())
    assert outcome.kind is Kind.DONE, outcome.reason



def test_every_warm_child_killed_while_idle_is_replaced_without_failing_a_job(child_path):
    with _loaded(_settings("fields", timeout=60, concurrency=2)) as runner:
        runner.start()
        procs = [child.proc for child in runner._children._idle]
        assert len(procs) == 2
        for proc in procs:
            os.kill(proc.pid, 9)
        for proc in procs:
            assert _wait_for(lambda proc=proc: _dead(proc.pid) or _zombie(proc.pid), 10)
        outcome = runner.run(Message(body=b"{}", queue="q", message_id="job-1"), Statuses())
        again = runner.run(Message(body=b"{}", queue="q", message_id="job-2"), Statuses())
    assert outcome.kind is Kind.DONE, outcome.reason
    assert again.kind is Kind.DONE, again.reason

def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return file.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie grandchild (reparented, not yet reaped) counts as dead.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)  # the polling interval of a bounded wait
    return condition()


def test_timeout_kills_child_and_grandchild(child_path, tmp_path):
    pid_file = tmp_path / "pids"
    started = time.monotonic()
    outcome, seen = _run("sleep_forever", timeout=1.5, settings={"pid_file": str(pid_file)})

    assert outcome.kind is Kind.FAILED
    assert outcome.reason == "timed out after 1.5 s"
    assert time.monotonic() - started < 1.5 + python_runner.KILL_GRACE + 5
    assert seen == [(Status.BUILDING, "sleeping")]
    child, grandchild = map(int, pid_file.read_text().split())
    assert _wait_for(lambda: _dead(child) and _dead(grandchild), timeout=10)


def test_cancel_stops_a_running_child(child_path, tmp_path):
    pid_file = tmp_path / "pids"
    result = {}
    with _loaded(_settings("sleep_forever", timeout=3600,
                           settings={"pid_file": str(pid_file)})) as runner:
        thread = threading.Thread(
            target=lambda: result.update(
                outcome=runner.run(Message(body=b"", queue="q"), Statuses()))
        )
        thread.start()
        assert _wait_for(pid_file.exists, timeout=30)
        runner.cancel()
        thread.join(timeout=30)

    assert result["outcome"] == Outcome.blocked("cancelled: the worker is stopping")
    child, grandchild = map(int, pid_file.read_text().split())
    assert _wait_for(lambda: _dead(child) and _dead(grandchild), timeout=10)


def test_a_job_after_cancel_is_blocked_without_a_child(child_path, tmp_path):
    pid_file = tmp_path / "pids"
    runner = load_python_runner(
        _settings("sleep_forever", timeout=3600, settings={"pid_file": str(pid_file)})
    )
    runner.cancel()

    outcome = runner.run(Message(body=b"", queue="q"), Statuses())

    assert outcome == Outcome.blocked("cancelled: the worker is stopping")
    assert not pid_file.exists()


def _supervised(func: str, **overrides) -> RunnerSettings:
    target = f"supervised_runners:{func}"
    return _settings(func, runner=f"python!{target}", target=target, **overrides)


def test_kill_grace_bounds_a_child_that_ignores_sigterm(child_path, tmp_path):
    pid_file = tmp_path / "pid"
    # The timeout leaves a loaded machine time to start the job and write its pid.
    with _loaded(_supervised("ignore_sigterm", timeout=2,
                             settings={"pid_file": str(pid_file), "kill_grace": "0.5"})) as runner:
        started = time.monotonic()
        outcome = runner.run(Message(body=b"", queue="q"), Statuses())

    assert outcome == Outcome.failed("timed out after 2 s")
    assert pid_file.exists()
    assert _dead(int(pid_file.read_text()))
    # 2 s timeout + 0.5 s grace, well below 2 s + the default grace of 5 s.
    assert time.monotonic() - started < 6


@pytest.mark.parametrize("grace", ["-1", "soon", "nan"])
def test_bad_kill_grace_fails_at_load_for_child_runners(grace):
    with pytest.raises(RunnerLoadError, match="kill_grace"):
        load_python_runner(_settings("succeed", timeout=5, settings={"kill_grace": grace}))


def test_a_child_killed_by_a_signal_names_it(child_path):
    with _loaded(_supervised("kill_self", timeout=60)) as runner:
        outcome = runner.run(Message(body=b"", queue="q"), Statuses())

    assert outcome.kind is Kind.FAILED
    assert outcome.reason.startswith("runner process killed by signal SIGKILL without an outcome")


def test_examples_hello_and_noop_run():
    from rbitext import examples

    statuses = Statuses()
    greeting = examples.hello(
        Message(body=b'{"a": 1}', queue="q", message_id="7"), statuses, {"name": "World"}
    )
    assert greeting.startswith("Hello World! Job 7: a JSON dict")
    assert examples.noop(Message(body=b"", queue="q"), statuses, {}) is None


# The warm children's protocol codecs (rbit.runners.warm), built once for speed, must read
# and write exactly what the json module does, errors included.
_DOCUMENTS = [
    {"outcome": "done", "usage": {"wall_s": 1.9e-05, "cpu_s": 0.25, "max_rss_kib": 12345}},
    {"body": "eyJ4IjogMX0=", "queue": "q", "message_id": None, "headers": {"é": ["ü\n\"", 1]}},
    {"x": [True, False, None, -0.0, 1e300, float("nan")], "y": {}, "z": []},
]


@pytest.mark.parametrize("doc", _DOCUMENTS)
def test_the_warm_protocol_encodes_as_json_dumps(doc):
    assert encode_json(doc) == json.dumps(doc, separators=(",", ":"))


def test_the_warm_protocol_encoder_refuses_what_json_refuses():
    with pytest.raises(TypeError, match="not JSON serializable"):
        encode_json({"a": object()})


@pytest.mark.parametrize("text", ['{"a":1}', ' {"a": [1, 2.5]} ', '{"a":1}\n', '"s"', "[]\r\n"])
def test_the_warm_protocol_decodes_as_json_loads(text):
    assert decode_json(text) == json.loads(text)


@pytest.mark.parametrize("text", ["", " ", "x", '{"a":1} x', '{"a":1}\x0b', "{", '{"a":1}{}'])
def test_the_warm_protocol_decoder_fails_as_json_loads(text):
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as got:
        decode_json(text)
    assert str(got.value) == str(expected.value)
