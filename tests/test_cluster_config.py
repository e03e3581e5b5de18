"""What rbit declares for a cluster, and how it picks the next node (no broker needed).

With ``queue_type = quorum`` every durable queue of a runner is a quorum queue (a
classic delay queue homed on a lost node made every declaration through another node
fail); the replication factor is sent only when configured; ``rbit-credit`` declares
the credit queue exactly as the worker does; after a node loss the reconnect pause
stays short once a node of the list has answered.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from rbit.amqp.connection import ANSWERED_MAX_DELAY, HostRotation
from rbit.config import AmqpSettings, HostAddress, load_config
from rbit.credit.settings import load_credit_config
from rbit.topology import runner_queues, work_queue

QUEUE = "cnx_any_latex_pdf"


def settings(tmp_path: Path, rbit: str = "", runner: str = ""):
    path = tmp_path / "rbit.ini"
    path.write_text(f"[rbit]\nname = box1\n{rbit}\n"
                    "[amqp]\nurl = amqp://n1, amqp://n2, amqp://n3\n"
                    f"[runner:{QUEUE}]\nrunner = shell!true\n{runner}\n")
    return load_config(str(path))


def test_a_quorum_runner_declares_only_quorum_queues(tmp_path: Path) -> None:
    runner = settings(tmp_path, "queue_type = quorum").runners[0]

    queues = runner_queues(runner, "pybit")

    assert [q.name for q in queues][:2] == [QUEUE, f"{QUEUE}.dead"]
    assert len(queues) > 2  # the delay queues
    assert all(q.arguments["x-queue-type"] == "quorum" for q in queues)
    for delay in queues[2:]:
        assert delay.arguments["x-dead-letter-routing-key"] == QUEUE
        assert delay.arguments["x-dead-letter-strategy"] == "at-least-once"
        assert delay.arguments["x-overflow"] == "reject-publish"
    assert all("x-quorum-initial-group-size" not in q.arguments for q in queues)


def test_the_replication_factor_is_sent_when_configured(tmp_path: Path) -> None:
    loaded = settings(tmp_path, "queue_type = quorum\nquorum_group_size = 3",
                      "delivery_limit = 4")
    runner = loaded.runners[0]

    queues = runner_queues(runner, "pybit")

    assert loaded.warnings == ()
    assert {q.arguments["x-quorum-initial-group-size"] for q in queues} == {3}
    assert queues[0].arguments["x-delivery-limit"] == 4


def test_a_classic_runner_keeps_argument_free_classic_queues(tmp_path: Path) -> None:
    loaded = settings(tmp_path, runner="quorum_group_size = 3")

    queues = runner_queues(loaded.runners[0], "pybit")

    assert dict(queues[0].arguments) == {}
    assert dict(queues[1].arguments) == {}
    assert all("x-queue-type" not in q.arguments for q in queues)
    assert any("quorum_group_size" in w for w in loaded.warnings)


def test_the_credit_daemon_declares_its_queue_as_the_worker_does(tmp_path: Path) -> None:
    worker = settings(tmp_path, "queue_type = quorum\nquorum_group_size = 3",
                      "delivery_limit = 7").runners[0]
    config = tmp_path / "credit.conf"
    config.write_text(textwrap.dedent(f"""\
        [amqp]
        url = amqp://n1, amqp://n2
        credit_queue = {QUEUE}
        credit_queue_type = quorum
        credit_delivery_limit = 7
        credit_quorum_group_size = 3
        """))

    credit = load_credit_config(str(config))

    assert credit.warnings == ()
    assert dict(credit.credit_queue_arguments) == dict(work_queue(worker, "pybit").arguments)


def rotation(hosts: int) -> HostRotation:
    amqp = AmqpSettings(hosts=tuple(HostAddress(f"n{i}", 5672) for i in range(hosts)),
                        reconnect_delay=1.0, reconnect_max_delay=30.0)
    return HostRotation(amqp, rng=lambda: 0.5)  # jitter factor 1.0


def test_after_a_node_loss_the_next_node_is_tried_at_once_and_pauses_stay_short() -> None:
    hosts = rotation(3)
    hosts.connected()

    pauses = []
    for _ in range(30):  # ten rounds: the broker answers, but the set-up fails
        hosts.opened()
        pauses.append(hosts.failed())

    assert pauses[0] == 0.0
    assert pauses[1] == 0.0
    assert max(pauses) == ANSWERED_MAX_DELAY


def test_when_no_node_answers_the_backoff_grows_to_its_cap() -> None:
    hosts = rotation(3)
    hosts.connected()

    pauses = [hosts.failed() for _ in range(30)]

    assert max(pauses) == 30.0
