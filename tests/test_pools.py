"""The worker picks a runner's pool once, from the protocol the runner object fits."""

from __future__ import annotations

import pytest

from rbit.config import RunnerSettings
from rbit.dispatch import BatchPool, EventedPool, ThreadPool, pool_for
from rbit.errors import RunnerLoadError
from rbit.runners.protocols import RunnerKind, runner_kind
from rbit.runners.python import PythonRunner
from rbit.runners.shell import ShellRunner


def _settings(runner: str = "python!m:f", concurrency: int = 2) -> RunnerSettings:
    kind, _, target = runner.partition("!")
    return RunnerSettings(queue="q_any_x_y", runner=runner, kind=kind, target=target,
                          routing_key="q.any.x.y", concurrency=concurrency)


class _Batcher:
    def submit(self, message, set_status, settle) -> None:
        settle(None)

    def close(self, timeout: float) -> None:
        pass


class _RunOnly:
    """Has run() but neither cancel() nor in_child: fits no protocol."""

    def run(self, message, set_status):
        return None


def _pool(job_runner, settings: RunnerSettings | None = None):
    # The broker is only stored at construction; nothing here delivers a job.
    return pool_for(settings or _settings(), job_runner, broker=None, report=print,
                    worker="w")


def test_a_plain_python_runner_gets_one_thread_per_slot():
    pool = _pool(PythonRunner(_settings(), lambda *_: None))
    assert type(pool) is ThreadPool
    assert len(pool._threads) == 2
    assert not pool.interruptible  # in-thread jobs cannot be stopped


def test_a_python_runner_in_a_child_can_be_interrupted():
    settings = _settings()
    settings = RunnerSettings(**{**settings.__dict__, "timeout": 5.0})
    pool = _pool(PythonRunner(settings, lambda *_: None), settings)
    assert type(pool) is ThreadPool
    assert pool.interruptible


def test_a_batch_runner_gets_one_submitting_thread_and_cannot_be_interrupted():
    pool = _pool(_Batcher())
    assert type(pool) is BatchPool
    assert len(pool._threads) == 1
    assert not pool.interruptible


def test_a_shell_runner_runs_evented_although_it_can_also_run_blocking(tmp_path):
    settings = _settings("shell!/bin/true")
    runner = ShellRunner(settings)
    try:
        assert runner_kind(runner, "runner:q") is RunnerKind.EVENTED
        pool = _pool(runner, settings)
        assert type(pool) is EventedPool
        assert pool.interruptible
    finally:
        runner.close()


@pytest.mark.parametrize("job_runner", [object(), _RunOnly(), lambda m, s, x: None])
def test_a_runner_fitting_no_protocol_is_a_load_error_naming_the_section(job_runner):
    with pytest.raises(RunnerLoadError, match=r"\[runner:q_any_x_y\]"):
        _pool(job_runner)
