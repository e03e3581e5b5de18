"""Signed ``rbit ctl`` commands against a real worker process on the real broker.

The worker has ``[control] trusted_keys``: a command is obeyed only with a signature by
an operator key in that directory (and from a user in ``[control] users``). Each
refused command must be answered ``refused`` with the reason and change nothing: the
queue's pause state is read back after each one.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pika
import pytest
from test_control import ctl, replies
from worker_helpers import QUEUE, WorkerProcess, wait_until, write_config

from rbit.cli import ExitCode
from rbit.control.authority import sign_command
from rbit.control.client import CtlExit
from rbit.control.commands import Command
from rbit.security import keys
from rbit.security.signing import Signer

NAME = "signed-ctl"
RUNNER = {"runner": "python!worker_runners:succeed"}


@pytest.fixture
def operator_keys(tmp_path):
    """An operator key (trusted) and an intruder's (not), as private key paths."""
    trusted, private = tmp_path / "operators", tmp_path / "private"
    trusted.mkdir()
    for name in ("operator", "intruder"):
        keys.generate(name, private)
    os.replace(private / "operator.pub", trusted / "operator.pub")
    return private / "operator.key", private / "intruder.key", trusted


def _config(tmp_path: Path, url: str, out: Path, name: str, control: str) -> Path:
    path = write_config(tmp_path, url, {QUEUE: {**RUNNER, "outdir": out}},
                        rbit={"name": NAME}, name=name)
    path.write_text(path.read_text() + f"\n[control]\n{control}\n")
    return path


def _paused(config: Path) -> list[str]:
    code, result = ctl(config, "status", "--worker", NAME)
    assert code == CtlExit.OK, result
    return [q["queue"] for q in replies(result)[NAME]["queues"] if q["paused"]]


def _send(url: str, body: bytes, headers: dict, message_id: str) -> dict:
    """Publish a command as the test user, with the given headers; its reply."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        got: list[bytes] = []
        channel.basic_consume("amq.rabbitmq.reply-to",
                              lambda _c, _m, _p, b: got.append(b), auto_ack=True)
        props = pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", user_id="guest",
                                     message_id=message_id, content_type="application/json",
                                     headers=headers)
        channel.basic_publish("rbit.control", f"worker:{NAME}", body, props)
        wait_until(lambda: got or connection.process_data_events(0.1), timeout=10,
                   what="a reply")
        return json.loads(got[0])
    finally:
        connection.close()


def test_only_commands_signed_by_a_trusted_operator_key_are_obeyed(
        tmp_path, rabbit, vhost, out, operator_keys):
    operator, intruder, trusted = operator_keys
    url = rabbit.url(vhost)
    worker = _config(tmp_path, url, out, "worker.ini",
                     f"trusted_keys = {trusted}\nsigning_key = {operator}")
    unsigned = _config(tmp_path, url, out, "unsigned.ini", "")
    wrong = _config(tmp_path, url, out, "wrong.ini", f"signing_key = {intruder}")
    proc = WorkerProcess(worker)
    try:
        wait_until(lambda: NAME in replies(ctl(worker, "ping", "--worker", NAME,
                                               timeout=1.0)[1]),
                   timeout=30, what="the worker to answer a signed ping")
        # A signed pause works.
        code, result = ctl(worker, "pause", QUEUE)
        assert code == CtlExit.OK, result
        assert _paused(worker) == [QUEUE]

        # Unsigned, or signed by a key the worker does not trust: refused, no effect.
        for config, reason in ((unsigned, "unsigned command"),
                               (wrong, "unknown or revoked key")):
            code, result = ctl(config, "resume", QUEUE)
            assert code == CtlExit.REFUSED == 5, result
            refused = replies(result)[NAME]["refused"]
            assert refused.startswith("signature refused"), refused
            assert reason in refused, refused
            assert _paused(worker) == [QUEUE]

        # A captured signed command, sent again, is refused.
        signer = Signer(keys.load_private(operator))
        body = Command(name="resume", queue=QUEUE).to_json()
        message_id = uuid.uuid4().hex
        headers = sign_command(signer, f"worker:{NAME}", message_id, "application/json", body)
        assert _send(url, body, headers, message_id)["ok"] is True
        assert _paused(worker) == []
        assert ctl(worker, "pause", QUEUE)[0] == CtlExit.OK
        again = _send(url, body, headers, message_id)
        assert "a replay" in again["refused"], again
        assert _paused(worker) == [QUEUE]

        # Signed too long ago, or re-addressed after signing: refused as well.
        old = Signer(signer._key, clock=lambda: time.time() - 3600)
        stale_id = uuid.uuid4().hex
        stale = _send(url, body, sign_command(old, f"worker:{NAME}", stale_id,
                                              "application/json", body), stale_id)
        assert "more than 60 s" in stale["refused"], stale
        other_id = uuid.uuid4().hex
        moved = _send(url, body, sign_command(signer, "worker:elsewhere", other_id,
                                              "application/json", body), other_id)
        assert "does not lead to queue" in moved["refused"], moved
        assert _paused(worker) == [QUEUE]
        assert "control command refused: signature refused" in proc.output
    finally:
        proc.kill()


def test_trusted_keys_without_a_usable_key_fails_at_start(tmp_path, rabbit, vhost, out):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = _config(tmp_path, rabbit.url(vhost), out, "worker.ini", f"trusted_keys = {empty}")
    proc = WorkerProcess(config)
    assert proc.wait(60) == ExitCode.CONFIG == 78
    assert (f"file {config}, section [control], key 'trusted_keys': no usable trusted key"
            in proc.output), proc.output


def test_control_signing_keys_are_read_and_not_warned_about(tmp_path, operator_keys):
    from rbit.config import load_config
    from rbit.control.authority import command_signer

    operator, _intruder, trusted = operator_keys
    config = _config(tmp_path, "amqp://localhost/", tmp_path, "w.ini",
                     f"trusted_keys = {trusted}\nsigning_key = {operator}\nmax_skew = 30")
    settings = load_config(str(config))
    control = settings.control
    assert (control.trusted_keys, control.signing_key, control.max_skew) == (
        str(trusted), str(operator), 30.0)
    assert not [w for w in settings.warnings if "[control]" in w]
    assert command_signer(settings).key_id == keys.fingerprint(
        keys.load_public(trusted / "operator.pub"))
