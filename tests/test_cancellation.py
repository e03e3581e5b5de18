"""A job's cancel signal (:attr:`rbit.message.Message.cancelled`) and its hooks."""

from __future__ import annotations

import threading

from rbit.message import Message


def test_a_hook_registered_before_the_signal_exists_runs_once_on_cancel():
    message = Message(b"", "q")
    calls = []
    message.on_cancel(lambda: calls.append("early"))
    assert not message.is_cancelled()
    assert calls == []
    message.cancelled.on_set(lambda: calls.append("late"))
    message.cancelled.set()
    message.cancelled.set()  # a second cancel runs nothing again
    assert calls == ["early", "late"]
    assert message.is_cancelled()


def test_a_hook_registered_after_the_cancel_runs_at_once():
    message = Message(b"", "q")
    message.cancelled.set()
    calls = []
    message.on_cancel(lambda: calls.append(1))
    assert calls == [1]


def test_hooks_registered_while_another_thread_cancels_each_run_exactly_once():
    for _ in range(200):
        message = Message(b"", "q")
        calls = []
        start = threading.Barrier(2)

        def cancel(message=message, start=start):
            start.wait()
            message.cancelled.set()

        thread = threading.Thread(target=cancel)
        thread.start()
        start.wait()
        for n in range(5):
            message.on_cancel(lambda n=n, calls=calls: calls.append(n))
        thread.join()
        assert sorted(calls) == [0, 1, 2, 3, 4]
