"""The child-process supervisor, with real processes, pipes and signals."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from rbit.errors import RunnerLoadError
from rbit.fdloop import PollLoop
from rbit.outcome import Outcome
from rbit.supervisor import (
    CANCELLED,
    TIMED_OUT,
    StopSignal,
    Supervisor,
    kill_grace,
    killed_by,
    stop_outcome,
)


class Recorder(Supervisor):
    """Keeps what the supervisor reports; reads one pipe of the process."""

    def __init__(self, proc: subprocess.Popen, loop: PollLoop, out: int, **kwargs) -> None:
        self.chunks: list[bytes] = []
        self.end: tuple[int | None, str | None] | None = None
        self._out = out
        super().__init__(proc, loop, ((out, self.chunks.append),), label="t", **kwargs)

    def on_end(self, code: int | None, stopped: str | None) -> None:
        self.end = (code, stopped)
        self.release()

    def on_error(self, exc: Exception) -> None:
        raise AssertionError(f"supervision failed: {exc}")

    def release(self) -> None:
        super().release()
        os.close(self._out)

    def output(self) -> bytes:
        return b"".join(self.chunks)


def start(script: str) -> tuple[Recorder, PollLoop]:
    read_fd, write_fd = os.pipe()
    # A fixed script from the test, no message content.
    proc = subprocess.Popen(["sh", "-c", script], stdout=write_fd, start_new_session=True)
    os.close(write_fd)
    loop = PollLoop()
    return Recorder(proc, loop, read_fd, grace=0.5), loop


def run_to_end(sup: Recorder, loop: PollLoop, limit: float = 20) -> None:
    deadline = time.monotonic() + limit
    loop.call_later(limit, lambda: None)  # wakes the loop to check the limit
    loop.run_until(lambda: sup.finished or time.monotonic() > deadline)
    assert sup.finished, "the supervisor never reported an end"


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def test_an_exit_is_reported_with_its_code_after_the_output() -> None:
    sup, loop = start("echo hello; exit 3")
    run_to_end(sup, loop)
    assert sup.end == (3, None)
    assert sup.output() == b"hello\n"


def test_a_deadline_terminates_the_group() -> None:
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(["sleep", "30"], stdout=write_fd, start_new_session=True)
    os.close(write_fd)
    loop = PollLoop()
    sup = Recorder(proc, loop, read_fd, grace=0.5, timeout=0.2)
    run_to_end(sup, loop)
    assert sup.end == (-signal.SIGTERM, TIMED_OUT)


def test_sigkill_follows_after_the_grace() -> None:
    started = time.monotonic()
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        ["sh", "-c", "trap '' TERM; echo ready; sleep 30 & wait"],
        stdout=write_fd,
        start_new_session=True,
    )
    os.close(write_fd)
    loop = PollLoop()
    sup = Recorder(proc, loop, read_fd, grace=0.3, timeout=0.3)
    run_to_end(sup, loop)
    assert sup.end == (-signal.SIGKILL, TIMED_OUT)
    assert time.monotonic() - started < 5


def test_processes_left_behind_are_killed_when_the_leader_exits(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    sup, loop = start(f"sleep 30 >/dev/null & echo $! > {pid_file}; exit 0")
    run_to_end(sup, loop)
    assert sup.end == (0, None)
    left = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while not process_gone(left) and time.monotonic() < deadline:
        time.sleep(0.02)  # the polling interval of a bounded wait
    assert process_gone(left)


def test_a_stop_signal_cancels_every_supervised_process() -> None:
    stop = StopSignal()
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(["sleep", "30"], stdout=write_fd, start_new_session=True)
    os.close(write_fd)
    loop = PollLoop()
    sup = Recorder(proc, loop, read_fd, grace=0.5, stop_fd=stop.fd)
    loop.call_later(0.1, lambda: stop.set("stopping", wake=True))
    run_to_end(sup, loop)
    assert sup.end == (-signal.SIGTERM, CANCELLED)
    assert stop.is_set()


def test_a_long_lived_child_gets_a_deadline_per_request() -> None:
    """A request/response child: each request is bounded, between requests it may idle."""
    request_r, request_w = os.pipe()
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        ["cat"], stdin=request_r, stdout=write_fd, start_new_session=True
    )
    os.close(request_r)
    os.close(write_fd)
    loop = PollLoop()
    sup = Recorder(proc, loop, read_fd, grace=0.5)

    for request in (b"one\n", b"two\n"):
        sup.set_deadline(5)
        os.write(request_w, request)
        loop.run_until(lambda r=request: sup.output().endswith(r))
        sup.clear_deadline()
    idle_until = time.monotonic() + 0.3
    loop.call_later(0.3, lambda: None)
    loop.run_until(lambda: time.monotonic() >= idle_until)
    assert not sup.finished

    sup.set_deadline(0.1, "shutting down")
    run_to_end(sup, loop)
    os.close(request_w)
    assert sup.end == (-signal.SIGTERM, "shutting down")
    assert sup.output() == b"one\ntwo\n"


def test_stops_are_worded_the_same_for_every_runner() -> None:
    assert stop_outcome(CANCELLED, None, "tail") == Outcome.blocked(
        "cancelled: the worker is stopping: tail"
    )
    assert stop_outcome(TIMED_OUT, 2.5) == Outcome.failed("timed out after 2.5 s")
    assert killed_by(-signal.SIGKILL) == "killed by signal SIGKILL"
    assert killed_by(-200) == "killed by signal 200"


def test_kill_grace_defaults_and_is_validated() -> None:
    assert kill_grace({}, "q") == 5.0
    assert kill_grace({"kill_grace": "0"}, "q") == 0.0
    for bad in ("-1", "nan", "soon"):
        with pytest.raises(RunnerLoadError, match=r"runner:q: kill_grace"):
            kill_grace({"kill_grace": bad}, "q")
