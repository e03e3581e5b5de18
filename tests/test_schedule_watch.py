"""``watch = DIR`` schedules: a real worker process, real files, real RabbitMQ.

Every job leaves a file named by its job id (:mod:`local_schedule_runners`), holding the
job's body and the size of its file when the job ran; a job run twice leaves a second
file. "Nothing more came" is shown by a sentinel file dropped last: the watch fires in
arrival order, so once the sentinel's job ran, any extra job would have run too.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
from fault_helpers import WorkerProcess
from local_schedule_runners import worker_config
from test_config_errors import EXIT_CONFIG, assert_config_error, run_rbit
from worker_helpers import wait_until

from rbit.schedule.watch import WatchFiles, file_key, job_id

QUEUE = "files"


def watch_config(tmp_path: Path, url: str, out: Path, directory: Path,
                 pattern: str = "") -> Path:
    return worker_config(tmp_path, url, out, QUEUE, "incoming",
                         f"watch = {directory}\n{pattern}")


def jobs(out: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_bytes()) for p in out.iterdir()
            if ".again." not in p.name and not p.name.startswith(".")}


def doubles(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if ".again." in p.name and p.name[0] != "."]


def files_fired(out: Path) -> dict[str, int]:
    """Fired file path -> its size when the job ran."""
    return {job["file"]: job["size"] for job in jobs(out).values()}


class Watcher:
    """The worker under test, started and restarted on one config."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.worker: WorkerProcess | None = None

    def start(self) -> WorkerProcess:
        starts = self.log.read_text().count("watching") if self.log.exists() else 0
        self.worker = WorkerProcess(self.config, self.log).start()
        self.worker.wait_consuming(60)
        wait_until(lambda: self.log.read_text().count("watching") > starts, 60,
                   "the watch to be set")
        return self.worker

    def stop(self) -> None:
        if self.worker is not None:
            assert self.worker.stop() == 0, self.worker.text()


@pytest.fixture
def incoming(tmp_path):
    path = tmp_path / "incoming"
    path.mkdir()
    return path


@pytest.fixture
def watcher(tmp_path, rabbit, vhost, out, incoming, request):
    pattern = getattr(request, "param", "")
    config = watch_config(tmp_path, rabbit.url(vhost), out, incoming, pattern)
    running = Watcher(config, tmp_path / "worker.log")
    yield running
    running.stop()


def write_at_once(path: Path, size: int) -> None:
    path.write_bytes(b"x" * size)


def write_slowly(path: Path, size: int, parts: int = 5) -> None:
    with open(path, "wb") as handle:
        for _ in range(parts):
            handle.write(b"y" * (size // parts))
            handle.flush()
            os.fsync(handle.fileno())
            time.sleep(0.05)  # a writer that takes its time between writes


def move_in(staging: Path, path: Path, size: int) -> None:
    source = staging / path.name
    source.write_bytes(b"z" * size)
    os.rename(source, path)


def drop_sentinel(incoming: Path, out: Path, name: str) -> None:
    sentinel = incoming / name
    sentinel.write_bytes(b"end")
    wait_until(lambda: str(sentinel) in files_fired(out), 60, f"the job of {name}")


def test_fifty_files_written_slowly_or_moved_in_give_fifty_jobs_then_a_restart_fires_only_new_files(
        watcher, incoming, out, tmp_path):
    watcher.start()
    staging = tmp_path / "staging"
    staging.mkdir()
    expected: dict[str, int] = {}
    writers = []
    for index in range(50):
        path, size = incoming / f"file{index:02d}.dat", 1000 + index * 10
        expected[str(path)] = size - size % 5 if index % 3 == 1 else size
        how = (write_at_once, write_slowly, None)[index % 3]
        if how is None:
            writers.append(threading.Thread(target=move_in, args=(staging, path, size)))
        else:
            writers.append(threading.Thread(target=how, args=(path, size)))
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(60)
    wait_until(lambda: len(jobs(out)) >= 50, 120, "fifty jobs")
    drop_sentinel(incoming, out, "zz-first.dat")
    fired = files_fired(out)
    del fired[str(incoming / "zz-first.dat")]
    assert fired == expected  # every file once, each complete when its job ran
    assert len(jobs(out)) == 51
    assert doubles(out) == []
    for name, job in jobs(out).items():
        assert re.fullmatch(r"incoming@[0-9a-f]{16}", name), name
        assert job["body"] == job["file"]  # no body = ...: the body is the path

    watcher.stop()
    dropped = {str(incoming / f"late{index}.dat"): 500 + index for index in range(5)}
    for path, size in dropped.items():
        Path(path).write_bytes(b"l" * size)
    watcher.start()
    wait_until(lambda: len(jobs(out)) >= 56, 120, "the five files dropped while stopped")
    drop_sentinel(incoming, out, "zz-second.dat")
    fired = files_fired(out)
    assert {path: fired[path] for path in dropped} == dropped
    assert len(jobs(out)) == 57  # the first fifty (and the sentinel) were not fired again
    assert doubles(out) == []
    assert "fired job incoming@" in watcher.log.read_text()


@pytest.mark.parametrize("watcher", ["pattern = *.pdf"], indirect=True)
def test_pattern_filters_and_hidden_or_partial_names_are_not_fired(watcher, incoming, out):
    watcher.start()
    (incoming / "a.pdf").write_bytes(b"a")
    (incoming / "b.txt").write_bytes(b"b")
    (incoming / ".hidden.pdf").write_bytes(b"h")
    (incoming / "c.pdf.part").write_bytes(b"c")
    os.rename(incoming / "c.pdf.part", incoming / "c.pdf")
    (incoming / "subdir.pdf").mkdir()
    drop_sentinel(incoming, out, "z.pdf")
    assert sorted(files_fired(out)) == [str(incoming / n) for n in ("a.pdf", "c.pdf", "z.pdf")]
    assert doubles(out) == []


def test_names_match_the_pattern_and_dot_names_only_a_dot_pattern():
    rule = WatchFiles("/srv/in", "*.pdf")
    assert [rule.matches(n) for n in ("x.pdf", "x.txt", ".x.pdf")] == [True, False, False]
    assert WatchFiles("/srv/in", ".*").matches(".x")


def test_a_file_rewritten_in_place_has_a_new_key_and_job_id(tmp_path):
    path = tmp_path / "a.dat"
    path.write_bytes(b"one")
    first = file_key(str(path), os.stat(path))
    assert file_key(str(path), os.stat(path)) == first  # stable: a restart finds it
    path.write_bytes(b"one more")
    second = file_key(str(path), os.stat(path))
    assert second != first
    assert job_id("incoming", second) == f"incoming@{second[:16]}"


@pytest.mark.parametrize(("watch", "reason"), [
    ("/nonexistent/incoming", "directory '/nonexistent/incoming' does not exist"),
    ("incoming", "expected an absolute path"),
])
def test_a_missing_or_relative_watch_directory_is_a_config_error(tmp_path, watch, reason):
    text = f"""
[runner:{QUEUE}]
runner = python!local_schedule_runners:record

[schedule:incoming]
queue = {QUEUE}
watch = {watch}
"""
    code, stderr, path = run_rbit(tmp_path, text)
    assert code == EXIT_CONFIG, stderr
    assert_config_error(stderr, path, "schedule:incoming", "watch", reason)


def test_a_pattern_with_a_slash_is_a_config_error(tmp_path):
    text = f"""
[runner:{QUEUE}]
runner = python!local_schedule_runners:record

[schedule:incoming]
queue = {QUEUE}
watch = {tmp_path}
pattern = sub/*.pdf
"""
    code, stderr, path = run_rbit(tmp_path, text)
    assert code == EXIT_CONFIG, stderr
    assert_config_error(stderr, path, "schedule:incoming", "pattern", "file name pattern")
