"""The shell! runner, with real processes (no broker involved)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from rbit import supervisor
from rbit.config import RunnerSettings
from rbit.errors import RunnerLoadError
from rbit.fdloop import PollLoop
from rbit.message import ATTEMPTS_HEADER, Message
from rbit.outcome import Kind, Outcome
from rbit.runners.shell import ShellRunner, bodies

PROBE = Path(__file__).parent / "data" / "shell_probe.py"
PROBE_TEMPLATE = "{python} {probe} {report}"
NASTY_ID = "a; touch {d}/x $(touch {d}/y) `touch z` 'q\" and spaces"


def make_runner(
    target: str, *, timeout: float | None = None, workdir: str | None = None, **settings: str
) -> ShellRunner:
    runner = RunnerSettings(
        queue="q",
        runner="shell!" + target,
        kind="shell",
        target=target,
        routing_key="q",
        timeout=timeout,
        settings={"python": sys.executable, "probe": str(PROBE), **settings},
    )
    return ShellRunner(runner, workdir=workdir)


def body_root() -> Path:
    """Where body directories go by default: memory when writable, else the temp dir."""
    if not os.environ.get("TMPDIR") and os.access("/dev/shm", os.W_OK | os.X_OK):
        return Path("/dev/shm")
    return Path(tempfile.gettempdir())


def job(body: bytes | dict = b"", message_id: str = "job-1", **kwargs) -> Message:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return Message(body=body, queue="q", message_id=message_id, **kwargs)


class Statuses:
    """A thread-safe set_status that remembers its calls and signals each one."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.changed = threading.Condition()

    def __call__(self, status: str, message: str = "") -> None:
        with self.changed:
            self.calls.append((status, message))
            self.changed.notify_all()

    def wait_for(self, count: int, timeout: float = 10) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self.calls) >= count, timeout)


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)  # the polling interval of a bounded wait
    return condition()


def process_gone(pid: int) -> bool:
    """No such process, or only a zombie waiting for a parent that is not ours."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return any(line.startswith("State:") and "Z" in line for line in status.splitlines())


def read_pids(path: Path) -> list[int]:
    assert wait_until(lambda: path.exists() and path.read_text().endswith("\n"), 5)
    return [int(word) for word in path.read_text().split()]


def run_in_thread(runner: ShellRunner, message: Message, statuses=None):
    result: dict[str, Outcome] = {}
    thread = threading.Thread(
        target=lambda: result.update(outcome=runner.run(message, statuses or Statuses()))
    )
    thread.start()
    return thread, result


# -- arguments -------------------------------------------------------------------------


def test_job_id_with_shell_syntax_is_one_argument_and_runs_nothing(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    job_id = NASTY_ID.format(d=tmp_path)
    runner = make_runner(
        PROBE_TEMPLATE + " %ID --id=%ID", workdir=str(tmp_path), report=str(report)
    )

    message = job(message_id=job_id)
    outcome = runner.run(message, Statuses())

    assert outcome == Outcome.done()
    # Such an id is not kept as it is (rbit.message's job-id rule) ...
    assert message.job_id.startswith("id-sha256:")
    # ... and whatever the id, it is one argument: no shell ever reads it.
    argv = json.loads(report.read_text())["argv"]
    assert argv[2:] == [message.job_id, "--id=" + message.job_id]
    assert not {"x", "y", "z"} & {p.name for p in tmp_path.iterdir()}


def test_placeholders_inside_arguments_are_replaced_in_one_pass(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    target = PROBE_TEMPLATE + " {outdir}/%ID.pdf %QUEUE:%ATTEMPT 100%% ${HOME} {tag} %ID"
    runner = make_runner(target, report=str(report), outdir="/srv/out", tag="%ID{outdir}")

    runner.run(job(message_id="job-1", headers={ATTEMPTS_HEADER: 2}), Statuses())

    argv = json.loads(report.read_text())["argv"]
    assert argv[2:] == [
        "/srv/out/job-1.pdf",
        "q:3",
        "100%",
        "${HOME}",
        "%ID{outdir}",  # setting values are literal text, not scanned again
        "job-1",
    ]


def test_seed_style_template_puts_the_id_in_the_program_name(tmp_path: Path) -> None:
    runner = make_runner("%ID.sh", workdir=str(tmp_path))

    outcome = runner.run(job(message_id="job-7"), Statuses())

    assert outcome.kind is Kind.FAILED
    assert outcome.reason.startswith("cannot run job-7.sh:")


def test_body_arrives_on_stdin_and_in_a_private_file_removed_afterwards(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    body = "line 1\nline 2 $(not run) `nor this`\n"
    runner = make_runner(PROBE_TEMPLATE + " %BODY", report=str(report))

    runner.run(job(body.encode()), Statuses())

    seen = json.loads(report.read_text())
    assert seen["stdin"] == body
    assert seen["body_file"] == body
    assert seen["body_mode"] == 0o600
    assert seen["argv"][2] == seen["env"]["RBIT_BODY_FILE"]
    assert not os.path.exists(seen["argv"][2])


def test_body_files_live_in_a_private_directory_removed_at_close(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    runner = make_runner(PROBE_TEMPLATE, report=str(report))

    runner.run(job(), Statuses())
    directory = Path(json.loads(report.read_text())["env"]["RBIT_BODY_FILE"]).parent
    mode = json.loads(report.read_text())["body_dir_mode"]
    runner.close()

    assert mode == 0o700
    assert directory.parent == body_root()
    assert not directory.exists()
    assert runner.run(job(), Statuses()).kind is Kind.BLOCKED


def test_tmpdir_names_where_body_files_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = tmp_path / "report.json"
    place = tmp_path / "bodies"
    place.mkdir()
    monkeypatch.setenv("TMPDIR", str(place))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    runner = make_runner(PROBE_TEMPLATE + " %BODY", report=str(report))

    runner.run(job(b"in tmpdir"), Statuses())

    seen = json.loads(report.read_text())
    assert Path(seen["argv"][2]).parent.parent == place
    assert seen["body_file"] == "in tmpdir"
    runner.close()
    assert list(place.iterdir()) == []


def fill_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on a body file in /dev/shm cannot be written: as a 64 MB /dev/shm would."""
    write_all = bodies.write_all

    def full_in_memory(fd: int, data: bytes) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith("/dev/shm/"):
            raise OSError(28, "No space left on device")
        write_all(fd, data)

    monkeypatch.setattr(bodies, "write_all", full_in_memory)


@pytest.fixture
def memory_bodies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Body files go to /dev/shm (no TMPDIR); fails where there is no writable /dev/shm."""
    if not os.access("/dev/shm", os.W_OK | os.X_OK):
        pytest.fail("this machine has no writable /dev/shm to run the test with")
    monkeypatch.delenv("TMPDIR", raising=False)


@pytest.mark.usefixtures("memory_bodies")
def test_a_body_too_big_for_memory_goes_to_the_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = tmp_path / "report.json"
    runner = make_runner(PROBE_TEMPLATE + " %BODY", report=str(report))
    fill_memory(monkeypatch)
    outcome = runner.run(job(b"spilled"), Statuses())

    seen = json.loads(report.read_text())
    assert outcome == Outcome.done()
    assert seen["stdin"] == "spilled"
    assert Path(seen["argv"][2]).parent.parent == Path(tempfile.gettempdir())
    runner.close()


def test_body_directory_goes_with_the_last_job_after_cancel(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    runner = make_runner("""sh -c 'echo $$ > "$0"; sleep 1000' {pids}""", pids=str(pids))
    thread, result = run_in_thread(runner, job())
    (shell_pid,) = read_pids(pids)
    directory = Path(f"/proc/{shell_pid}/environ").read_bytes().split(b"RBIT_BODY_FILE=")[1]
    directory = Path(os.fsdecode(directory.split(b"\0")[0])).parent

    runner.cancel()
    thread.join(10)

    assert result["outcome"].kind is Kind.BLOCKED
    assert not directory.exists()


def start_on(loop: PollLoop, runner: ShellRunner, message: Message) -> Outcome:
    """Runs one job the worker's way: started with start_job, moved along by ``loop``."""
    ended: list[Outcome] = []
    runner.start_job(message, Statuses(), ended.append, loop)
    loop.run_until(lambda: bool(ended))
    return ended[0]


def run_loop_until(loop: PollLoop, condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    loop.call_later(timeout, lambda: None)  # wakes the loop even when nothing else does
    loop.run_until(lambda: condition() or time.monotonic() >= deadline)
    return condition()


def test_jobs_started_on_a_loop_leave_no_body_file_or_fd_behind(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    runner = make_runner(PROBE_TEMPLATE + " %BODY", report=str(report))
    fds_before = sorted(os.listdir("/proc/self/fd"))
    loop = PollLoop()
    bodies = []
    for n in range(3):
        outcome = start_on(loop, runner, job(f"body {n}".encode(), message_id=f"job{n}"))
        seen = json.loads(report.read_text())
        assert outcome == Outcome.done()
        assert seen["stdin"] == seen["body_file"] == f"body {n}"
        bodies.append(Path(seen["argv"][2]))
    directory = bodies[0].parent

    # Each job's file goes when the next job has started, the last one's soon after.
    assert run_loop_until(loop, lambda: not any(body.exists() for body in bodies))
    runner.close()

    assert not directory.exists()  # with the file made ahead for a next job
    assert sorted(os.listdir("/proc/self/fd")) == fds_before


@pytest.mark.usefixtures("memory_bodies")
def test_a_job_on_a_loop_spills_a_body_too_big_for_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = tmp_path / "report.json"
    runner = make_runner(PROBE_TEMPLATE + " %BODY", report=str(report))
    loop = PollLoop()
    assert start_on(loop, runner, job(b"first")) == Outcome.done()  # leaves a file made ahead
    in_memory = Path(json.loads(report.read_text())["argv"][2]).parent
    fill_memory(monkeypatch)
    outcome = start_on(loop, runner, job(b"spilled"))

    seen = json.loads(report.read_text())
    assert outcome == Outcome.done()
    assert seen["stdin"] == "spilled"
    assert Path(seen["argv"][2]).parent.parent == Path(tempfile.gettempdir())
    runner.close()
    assert not in_memory.exists()  # the file made ahead, which did not fit, is gone too


def test_a_lost_body_directory_is_replaced_by_a_new_private_one(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    runner = make_runner(PROBE_TEMPLATE, report=str(report))
    runner.run(job(), Statuses())
    first = Path(json.loads(report.read_text())["env"]["RBIT_BODY_FILE"]).parent
    first.rmdir()  # as a /tmp cleaner would

    outcome = runner.run(job(b"again"), Statuses())

    seen = json.loads(report.read_text())
    second = Path(seen["env"]["RBIT_BODY_FILE"]).parent
    assert outcome == Outcome.done()
    assert seen["stdin"] == "again"
    assert second != first
    assert seen["body_dir_mode"] == 0o700
    runner.close()


def test_environment_names_job_queue_body_attempt_and_status_fd(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    runner = make_runner(PROBE_TEMPLATE, workdir=str(tmp_path), report=str(report))

    runner.run(job(message_id="job-42", headers={ATTEMPTS_HEADER: 1}), Statuses())

    seen = json.loads(report.read_text())
    env = seen["env"]
    assert env["RBIT_JOB_ID"] == "job-42"
    assert env["RBIT_QUEUE"] == "q"
    assert env["RBIT_ATTEMPT"] == "2"
    assert Path(env["RBIT_BODY_FILE"]).parent.parent == body_root()
    assert env["RBIT_STATUS_FD"].isdigit()
    assert seen["cwd"] == str(tmp_path)


def test_environment_is_the_one_the_worker_had_when_the_runner_was_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = tmp_path / "report.json"
    monkeypatch.setenv("PROBE_BEFORE", "seen")
    monkeypatch.setenv("RBIT_JOB_ID", "stale")
    runner = make_runner(PROBE_TEMPLATE, report=str(report), env_keep="PROBE_*, RBIT_JOB_ID")
    monkeypatch.setenv("PROBE_AFTER", "not seen")

    runner.run(job(message_id="job-9"), Statuses())

    env = json.loads(report.read_text())["env"]
    assert env["PROBE_BEFORE"] == "seen"
    assert "PROBE_AFTER" not in env
    assert env["RBIT_JOB_ID"] == "job-9"


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.parametrize("workdir", [None, "tmp"], ids=["posix_spawn", "popen"])
def test_command_gets_no_descriptor_but_stdio_and_the_status_pipe(
    tmp_path: Path, workdir: str | None
) -> None:
    report = tmp_path / "report.json"
    inherited_r, inherited_w = os.pipe()
    os.set_inheritable(inherited_r, True)
    try:
        runner = make_runner(PROBE_TEMPLATE, report=str(report), workdir=workdir and str(tmp_path))
        runner.run(job(), Statuses())
    finally:
        os.close(inherited_r)
        os.close(inherited_w)

    seen = json.loads(report.read_text())
    assert seen["fds"] == [int(seen["env"]["RBIT_STATUS_FD"])]


def test_nul_byte_in_job_id_never_reaches_the_command(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    runner = make_runner(PROBE_TEMPLATE + " %ID", report=str(report))
    message = job(message_id="bad\x00id")

    outcome = runner.run(message, Statuses())

    assert outcome.kind is Kind.DONE
    assert json.loads(report.read_text())["argv"][2:] == [message.job_id]
    assert "\x00" not in message.job_id


# -- templates -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "complaint"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("echo 'unbalanced", "No closing quotation"),
        ("echo {nosuchkey}", "{nosuchkey}"),
    ],
)
def test_bad_template_fails_at_load(target: str, complaint: str) -> None:
    with pytest.raises(RunnerLoadError, match="runner:q") as error:
        make_runner(target)
    assert complaint in str(error.value)


@pytest.mark.parametrize("grace", ["soon", "-1", "nan"])
def test_bad_kill_grace_fails_at_load(grace: str) -> None:
    with pytest.raises(RunnerLoadError, match="kill_grace"):
        make_runner("true", kill_grace=grace)


# -- outcomes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ({"exit": 0, "stderr": "chatter"}, Outcome.done()),
        ({"exit": 75, "stderr": "database locked\n"}, Outcome.blocked("database locked")),
        ({"exit": 75}, Outcome.blocked("exit status 75 (try later)")),
        ({"exit": 3, "stderr": "warning\nboom\n"}, Outcome.failed("exit status 3: warning\nboom")),
        ({"exit": 4}, Outcome.failed("exit status 4")),
    ],
)
def test_exit_status_decides_the_outcome(tmp_path: Path, script: dict, expected: Outcome) -> None:
    runner = make_runner(PROBE_TEMPLATE, report=str(tmp_path / "report.json"))

    assert runner.run(job(script), Statuses()) == expected


def test_only_the_tail_of_a_long_stderr_is_kept(tmp_path: Path) -> None:
    runner = make_runner(PROBE_TEMPLATE, report=str(tmp_path / "report.json"))
    script = {"exit": 1, "stderr": "x" * 300_000 + "THE END"}

    outcome = runner.run(job(script), Statuses())

    assert outcome.reason.startswith("exit status 1: ...x")
    assert outcome.reason.endswith("xTHE END")
    assert len(outcome.reason) <= 4096 + len("exit status 1: ...")


def test_death_by_signal_is_a_failure_naming_the_signal() -> None:
    runner = make_runner("sh -c 'kill -KILL $$'")

    assert runner.run(job(), Statuses()) == Outcome.failed("killed by signal SIGKILL")


def test_missing_or_unexecutable_program_is_a_failure(tmp_path: Path) -> None:
    not_executable = tmp_path / "script.sh"
    not_executable.write_text("#!/bin/sh\nexit 0\n")

    missing = make_runner("/nonexistent/program %ID").run(job(), Statuses())
    unexecutable = make_runner(str(not_executable)).run(job(), Statuses())

    assert missing.kind is Kind.FAILED
    assert missing.reason.startswith("cannot run /nonexistent/program:")
    assert unexecutable.kind is Kind.FAILED
    assert unexecutable.reason.startswith(f"cannot run {not_executable}:")


# -- statuses --------------------------------------------------------------------------


def test_status_lines_reach_set_status_in_order(tmp_path: Path, caplog) -> None:
    runner = make_runner(PROBE_TEMPLATE, report=str(tmp_path / "report.json"))
    lines = [
        "Building compiling chapter 3",
        "Bogus line",
        "waiting",
        "Building  step 4  ",
        "Uploaded",
    ]
    statuses = Statuses()

    with caplog.at_level(logging.WARNING, logger="rbit.runners.shell"):
        outcome = runner.run(job({"status": lines}, message_id="job-s"), statuses)

    assert outcome == Outcome.done()
    assert statuses.calls == [
        ("Building", "compiling chapter 3"),
        ("Waiting", ""),
        ("Building", "step 4"),
        ("Uploaded", ""),
    ]
    assert any("job-s" in r.getMessage() and "Bogus" in r.getMessage() for r in caplog.records)


def test_status_is_passed_on_while_the_command_still_runs(tmp_path: Path) -> None:
    go = tmp_path / "go"
    script = (
        'echo "Building halfway there" >/dev/fd/$RBIT_STATUS_FD; '
        'while [ ! -e "$0" ]; do sleep 0.02; done'
    )
    runner = make_runner(f"sh -c '{script}' {{go}}", timeout=30, go=str(go))
    statuses = Statuses()

    thread, result = run_in_thread(runner, job(), statuses)
    try:
        assert statuses.wait_for(1)
        assert statuses.calls == [("Building", "halfway there")]
        assert thread.is_alive()
    finally:
        go.touch()
        thread.join(30)
    assert result["outcome"] == Outcome.done()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_documented_bash_status_example_works() -> None:
    runner = make_runner("""bash -c 'echo "Building step 2" >&$RBIT_STATUS_FD'""")
    statuses = Statuses()

    assert runner.run(job(), statuses) == Outcome.done()
    assert statuses.calls == [("Building", "step 2")]


def test_failing_set_status_does_not_stall_the_command(tmp_path: Path) -> None:
    def broken(status: str, message: str = "") -> None:
        raise RuntimeError("status sink down")

    runner = make_runner(PROBE_TEMPLATE, report=str(tmp_path / "report.json"))
    lines = ["Building step %d %s" % (i, "x" * 1000) for i in range(200)]

    assert runner.run(job({"status": lines}), broken) == Outcome.done()


def test_stdout_tail_is_logged_at_debug_only(caplog) -> None:
    runner = make_runner("sh -c 'seq 100000; echo last line'")

    with caplog.at_level(logging.INFO, logger="rbit.runners.shell"):
        assert runner.run(job(message_id="job-q"), Statuses()) == Outcome.done()
    with caplog.at_level(logging.DEBUG, logger="rbit.runners.shell"):
        assert runner.run(job(message_id="job-d"), Statuses()) == Outcome.done()

    tails = [r.getMessage() for r in caplog.records if "stdout tail" in r.getMessage()]
    assert len(tails) == 1
    assert tails[0].startswith("job job-d: stdout tail: ...")
    assert tails[0].endswith("100000\nlast line")


def test_no_thread_is_started_per_job(tmp_path: Path) -> None:
    if not supervisor.pidfd_supported():
        pytest.skip("without pidfd_open a thread waits for each command")
    seen: list[list[str]] = []

    def record_threads(status: str, message: str = "") -> None:
        seen.append([t.name for t in threading.enumerate()])

    runner = make_runner(PROBE_TEMPLATE, report=str(tmp_path / "report.json"))
    before = {t.name for t in threading.enumerate()}

    outcome = runner.run(job({"status": ["Building"]}), record_threads)

    assert outcome == Outcome.done()
    assert len(seen) == 1
    assert set(seen[0]) == before


@pytest.fixture
def without_pidfd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes the runner wait for its commands in a thread, as where pidfd_open is missing."""
    monkeypatch.setattr(supervisor, "_pidfd_supported", False)


@pytest.mark.usefixtures("without_pidfd")
def test_without_pidfd_outcomes_and_statuses_still_arrive(tmp_path: Path) -> None:
    runner = make_runner(PROBE_TEMPLATE, report=str(tmp_path / "report.json"))
    statuses = Statuses()

    outcome = runner.run(job({"status": ["Building 1"], "stderr": "bad", "exit": 2}), statuses)

    assert outcome == Outcome.failed("exit status 2: bad")
    assert statuses.calls == [("Building", "1")]


@pytest.mark.usefixtures("without_pidfd")
def test_without_pidfd_a_timeout_still_kills_the_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    runner = make_runner(
        """sh -c 'sleep 1000 & echo $$ $! > "$0"; wait' {pids}""", timeout=0.5, pids=str(pids)
    )

    outcome = runner.run(job(), Statuses())

    assert outcome == Outcome.failed("timed out after 0.5 s")
    shell_pid, sleeper = read_pids(pids)
    assert wait_until(lambda: process_gone(shell_pid) and process_gone(sleeper), 5)


# -- timeouts, leftovers, cancel -------------------------------------------------------


def test_timeout_kills_the_command_and_its_grandchildren(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    runner = make_runner(
        """sh -c 'sleep 1000 & echo $$ $! > "$0"; wait' {pids}""", timeout=1, pids=str(pids)
    )
    started = time.monotonic()

    outcome = runner.run(job(), Statuses())

    assert outcome == Outcome.failed("timed out after 1 s")
    assert time.monotonic() - started < 60  # not the sleeper's 1000 s
    shell, sleeper = read_pids(pids)
    assert wait_until(lambda: process_gone(shell) and process_gone(sleeper), 5)


def test_timeout_sends_sigkill_to_what_ignores_sigterm(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    runner = make_runner(
        """sh -c 'trap "" TERM; sleep 1000 & echo $$ $! > "$0"; wait' {pids}""",
        timeout=0.5,
        kill_grace="0.5",
        pids=str(pids),
    )
    started = time.monotonic()

    outcome = runner.run(job(), Statuses())

    elapsed = time.monotonic() - started
    assert outcome == Outcome.failed("timed out after 0.5 s")
    assert 1.0 <= elapsed < 60  # SIGKILL came; the sleeper would take 1000 s
    shell, sleeper = read_pids(pids)
    assert wait_until(lambda: process_gone(shell) and process_gone(sleeper), 5)


def test_processes_left_behind_by_a_finished_command_are_killed(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    runner = make_runner("""sh -c 'sleep 1000 & echo $! > "$0"' {pids}""", pids=str(pids))
    started = time.monotonic()

    outcome = runner.run(job(), Statuses())

    assert outcome == Outcome.done()
    assert time.monotonic() - started < 60  # the sleeper (1000 s) held the pipes: no waiting
    (sleeper,) = read_pids(pids)
    assert wait_until(lambda: process_gone(sleeper), 5)


def test_cancel_stops_a_running_job_from_another_thread(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    runner = make_runner(
        """sh -c 'sleep 1000 & echo $$ $! > "$0"; wait' {pids}""", kill_grace="1", pids=str(pids)
    )
    thread, result = run_in_thread(runner, job())
    try:
        shell, sleeper = read_pids(pids)
        runner.cancel()
        thread.join(10)
    finally:
        if thread.is_alive():
            os.killpg(shell, 9)
            thread.join()

    assert result["outcome"].kind is Kind.BLOCKED
    assert result["outcome"].reason.startswith("cancelled")
    assert wait_until(lambda: process_gone(shell) and process_gone(sleeper), 5)


def test_no_command_starts_after_cancel(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    runner = make_runner(PROBE_TEMPLATE, report=str(report))

    runner.cancel()
    outcome = runner.run(job(), Statuses())

    assert outcome.kind is Kind.BLOCKED
    assert not report.exists()


def test_concurrent_runs_keep_their_outputs_apart(tmp_path: Path) -> None:
    runner = make_runner("{python} {probe} {dir}/%ID.json", dir=str(tmp_path))
    jobs = {}
    for i in range(8):
        script = {
            "status": [f"Building job{i} step {n}" for n in range(20)],
            "stderr": f"error of job{i}\n" * 50,
            "exit": 3,
        }
        statuses = Statuses()
        jobs[i] = (statuses, *run_in_thread(runner, job(script, message_id=f"job{i}"), statuses))

    for i, (statuses, thread, result) in jobs.items():
        thread.join(30)
        assert result["outcome"].kind is Kind.FAILED
        assert set(result["outcome"].reason.split("\n")[1:]) == {f"error of job{i}"}
        assert statuses.calls == [("Building", f"job{i} step {n}") for n in range(20)]
        assert (
            json.loads((tmp_path / f"job{i}.json").read_text())["env"]["RBIT_JOB_ID"] == f"job{i}"
        )


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_zombies_left_in_the_group_count_as_gone(tmp_path: Path, caplog) -> None:
    pids = tmp_path / "pids"
    helper = Path(__file__).parent / "data" / "shell_zombie.py"
    runner = make_runner("{python} {helper} {pids}", helper=str(helper), pids=str(pids))
    try:
        with caplog.at_level(logging.WARNING, logger="rbit.runners.shell"):
            outcome = runner.run(job(message_id="job-z"), Statuses())
    finally:
        holder, _zombie = read_pids(pids)
        os.kill(holder, 9)

    assert outcome == Outcome.done()
    assert not [r for r in caplog.records if "job-z" in r.getMessage()]
