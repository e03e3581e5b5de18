"""How many finished jobs make an ack flush: sized by the job queues' windows only."""

from __future__ import annotations

from rbit.amqp.acks import ack_batch
from rbit.amqp.records import ConsumerSpec


def _spec(queue: str, prefetch: int, *, commands: bool = False) -> ConsumerSpec:
    return ConsumerSpec(queue=queue, prefetch=prefetch, on_delivery=lambda d: None,
                        commands=commands)


def test_half_the_smallest_job_window():
    assert ack_batch([_spec("a", 100), _spec("b", 30)]) == 15


def test_a_window_of_one_flushes_every_ack():
    assert ack_batch([_spec("a", 1)]) == 1


def test_a_command_queue_does_not_shrink_the_batches():
    jobs = _spec("jobs", 100)
    assert ack_batch([jobs, _spec("w1", 20, commands=True)]) == 50
    # Without job queues there is nothing to batch: each ack goes out at once.
    assert ack_batch([_spec("w1", 20, commands=True)]) == 1


def test_the_pybit_command_queue_is_marked_as_commands():
    from rbit.pybit import Commands

    spec = Commands(broker=None, tracker=None).spec("worker-1")  # type: ignore[arg-type]
    assert spec.commands
