"""Signed jobs end to end: a real RabbitMQ node, real worker processes, shell! canaries.

Each shell! runner touches ``OUT/<job id>``: a job that must never run must never
create its canary file. A refused job must land in its queue's dead letters with the
reason in ``x-rbit-dead-reason``.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest
from worker_helpers import Amqp, WorkerProcess, wait_until, write_config

from rbit.cli import ExitCode, main
from rbit.client import Client
from rbit.config import load_config
from rbit.security import keys
from rbit.security.signing import Signer

JOBS = "cnx_any_signed_sh"  # a PyBit name: published to pybit with cnx.any.signed.sh
OTHER = "cnx_any_other_sh"
FLAKY = "flaky"  # not a PyBit name: a section, so pybit with routing key "flaky"
FAILING = "failing"
ONCE = "once"  # fails its first try (no retry), then succeeds
LONG = "long"  # runs for seconds: its lease is renewed through the holding queue
CANARY = "shell!sh -c 'touch \"$0/$RBIT_JOB_ID\"' {out}"
ONCE_CMD = ("shell!sh -c 'echo x >> \"$0/$RBIT_JOB_ID.runs\"; "
            "[ $(wc -l < \"$0/$RBIT_JOB_ID.runs\") -ge 2 ]' {out}")
# Its first run lasts long enough to be killed; the next one ends at once.
LONG_CMD = ("shell!sh -c 'echo x >> \"$0/$RBIT_JOB_ID.runs\"; "
            "[ $(wc -l < \"$0/$RBIT_JOB_ID.runs\") -ge 2 ] || sleep 60' {out}")
# Fails its first two tries, then succeeds; every try leaves a line.
FLAKY_CMD = ("shell!sh -c 'echo x >> \"$0/$RBIT_JOB_ID.runs\"; "
             "[ $(wc -l < \"$0/$RBIT_JOB_ID.runs\") -ge 3 ]' {out}")


@pytest.fixture
def keyring(tmp_path):
    """Private keys of two publishers and a worker; their public keys all trusted."""
    trusted, private = tmp_path / "trusted", tmp_path / "private"
    trusted.mkdir()
    for name in ("alice", "bob", "worker"):
        keys.generate(name, private)
        os.replace(private / f"{name}.pub", trusted / f"{name}.pub")
    return private, trusted


def _configs(tmp_path, url, out, keyring, *, replay="replay.sqlite", rbit=None):
    private, trusted = keyring
    runners = {
        JOBS: {"runner": CANARY.format(out=out), "max_retries": 0},
        OTHER: {"runner": CANARY.format(out=out), "max_retries": 0},
        FLAKY: {"runner": FLAKY_CMD.format(out=out), "max_retries": 2, "retry_delay": 0.2,
                "retry_jitter": 0},
        FAILING: {"runner": "shell!false", "max_retries": 0},
        ONCE: {"runner": ONCE_CMD.format(out=out), "max_retries": 0},
        LONG: {"runner": LONG_CMD.format(out=out), "max_retries": 0},
    }
    status = {"sinks": "amqp, log"}
    worker = write_config(tmp_path, url, runners, status=status, rbit=rbit)
    with open(worker, "a") as handle:
        handle.write(f"[security]\nsigning_key = {private / 'worker.key'}\n"
                     f"trusted_keys = {trusted}\nrequire_signed = yes\nmax_skew = 60\n"
                     f"replay_file = {tmp_path / replay}\n")
    publisher = write_config(tmp_path, url, runners, status=status, name="publisher.ini")
    with open(publisher, "a") as handle:
        handle.write(f"[security]\nsigning_key = {private / 'alice.key'}\n")
    return worker, publisher


@contextlib.contextmanager
def _worker(config: Path, amqp: Amqp, *args: str, module: str = "rbit"):
    process = WorkerProcess(config, "--poll-time", "1", *args, module=module)
    try:
        # Ready once its queues exist and are consumed.
        wait_until(lambda: _consumed(amqp, JOBS) or process.proc.poll() is not None,
                   timeout=30, what="the worker to consume")
        assert process.proc.poll() is None, process.output
        yield process
    finally:
        process.signal(15)
        try:
            process.wait(30)
        finally:
            process.kill()


def _consumed(amqp: Amqp, queue: str) -> bool:
    try:
        return amqp.channel.queue_declare(queue, passive=True).method.consumer_count > 0
    except Exception:  # noqa: BLE001 -- 404 closes the channel: reopen
        amqp.channel = amqp.connection.channel()
        amqp.channel.confirm_delivery()
        return False


def _dead(amqp: Amqp, queue: str, timeout: float = 15.0):
    def take():
        try:
            return amqp.get(f"{queue}.dead")
        except Exception:  # noqa: BLE001 -- not declared yet
            amqp.channel = amqp.connection.channel()
            return None

    _method, props, body = wait_until(take, timeout, f"a dead letter in {queue}.dead")
    reason = props.headers["x-rbit-dead-reason"]
    return props.message_id, reason.decode() if isinstance(reason, bytes) else reason, body


def _signed(signer, exchange, route, job_id, body=b"job", headers=None):
    headers = dict(headers or {"owner": "ana"})
    headers.update(signer.sign(exchange, route, job_id, None, headers, body))
    return headers


@pytest.fixture
def alice(keyring):
    return Signer(keys.load_private(keyring[0] / "alice.key"))


def test_signed_jobs_run_and_changed_or_unsigned_ones_never_do(
        tmp_path, rabbit, vhost, amqp, out, keyring, alice):
    worker, publisher = _configs(tmp_path, rabbit.url(vhost), out, keyring)
    with _worker(worker, amqp):
        with Client(load_config(str(publisher))) as client:
            result = client.submit(JOBS, b"job", job_id="good-1", wait=True, timeout=20)
        assert (result.status.value, (out / "good-1").exists()) == ("Done", True)

        route = "cnx.any.signed.sh"
        cases = {
            "body": (b"jOb", _signed(alice, "pybit", route, "t-body"), route),
            "header": (b"job", {**_signed(alice, "pybit", route, "t-header"), "owner": "eve"},
                       route),
            "route": (b"job", _signed(alice, "pybit", route, "t-route"), "cnx.any.other.sh"),
            "unsigned": (b"job", {"owner": "ana"}, route),
            "stale": (b"job", _signed(Signer(alice._key, clock=lambda: time.time() - 3600),
                                      "pybit", route, "t-stale"), route),
        }
        expected = {"body": "bad signature", "header": "bad signature",
                    "route": "does not lead to queue", "unsigned": "unsigned job",
                    "stale": "more than 60 s"}
        for name, (body, headers, routing_key) in cases.items():
            amqp.publish(body, routing_key=routing_key, message_id=f"t-{name}", headers=headers)
            queue = OTHER if name == "route" else JOBS
            message_id, reason, dead_body = _dead(amqp, queue)
            assert (message_id, dead_body) == (f"t-{name}", body)
            assert "signature refused" in reason
            assert expected[name] in reason
            assert not (out / f"t-{name}").exists()


def test_a_replayed_job_never_runs_again_even_after_a_restart(
        tmp_path, rabbit, vhost, amqp, out, keyring, alice):
    worker, _ = _configs(tmp_path, rabbit.url(vhost), out, keyring)
    route = "cnx.any.signed.sh"
    headers = _signed(alice, "pybit", route, "once")
    with _worker(worker, amqp):
        amqp.publish(b"job", routing_key=route, message_id="once", headers=headers)
        wait_until((out / "once").exists, 15, "the first run")
        (out / "once").unlink()
        amqp.publish(b"job", routing_key=route, message_id="once", headers=headers)
        assert "a replay" in _dead(amqp, JOBS)[1]
    with _worker(worker, amqp):
        amqp.publish(b"job", routing_key=route, message_id="once", headers=headers)
        assert "a replay" in _dead(amqp, JOBS)[1]
    assert not (out / "once").exists()


def test_a_signed_job_that_fails_twice_is_retried_and_runs_each_retry(
        tmp_path, rabbit, vhost, amqp, out, keyring):
    worker, publisher = _configs(tmp_path, rabbit.url(vhost), out, keyring)
    with _worker(worker, amqp), Client(load_config(str(publisher))) as client:
        result = client.submit(FLAKY, b"job", job_id="flaky-1", wait=True, timeout=30)
    assert result.status.value == "Done", result
    assert (out / "flaky-1.runs").read_text() == "x\nx\nx\n"


def test_two_keys_at_once_and_a_removed_key_is_refused_without_restart(
        tmp_path, rabbit, vhost, amqp, out, keyring, alice):
    worker, _ = _configs(tmp_path, rabbit.url(vhost), out, keyring)
    bob = Signer(keys.load_private(keyring[0] / "bob.key"))
    route = "cnx.any.signed.sh"
    # The worker looks at its keys again on every lookup: the next job sees the removal.
    with _worker(worker, amqp, module="rbit_rescanning"):
        for signer, job_id in ((alice, "by-alice"), (bob, "by-bob")):
            amqp.publish(b"job", routing_key=route, message_id=job_id,
                         headers=_signed(signer, "pybit", route, job_id))
            wait_until((out / job_id).exists, 15, f"job {job_id}")
        os.remove(keyring[1] / "bob.pub")
        amqp.publish(b"job", routing_key=route, message_id="bob-revoked",
                     headers=_signed(bob, "pybit", route, "bob-revoked"))
        assert "unknown or revoked key" in _dead(amqp, JOBS)[1]
        assert not (out / "bob-revoked").exists()


def test_submit_exit_codes(tmp_path, rabbit, vhost, amqp, out, keyring, capsys):
    worker, publisher = _configs(tmp_path, rabbit.url(vhost), out, keyring)
    amqp.channel.queue_declare("parked", durable=True)  # routable, nobody consumes it
    with _worker(worker, amqp):
        assert main(["submit", str(publisher), JOBS, "body", "--job-id", "cli-1",
                     "--wait", "--timeout", "20"]) == ExitCode.OK
        assert capsys.readouterr().out.startswith("cli-1\tDone")
        assert (out / "cli-1").exists()
        assert main(["submit", str(publisher), FAILING, "--wait", "--timeout", "20"]) \
            == ExitCode.JOB_FAILED == 10
        assert "\tFailed\t" in capsys.readouterr().out
        assert main(["submit", str(publisher), "parked", "x", "--wait", "--timeout", "1"]) \
            == ExitCode.JOB_TIMEOUT == 11
    assert main(["submit", str(publisher), "nobody_listens", "x"]) == ExitCode.UNROUTABLE == 12
    assert "no queue is bound" in capsys.readouterr().err


def _runs(out: Path, job_id: str) -> int:
    path = out / f"{job_id}.runs"
    return len(path.read_text().split()) if path.exists() else 0


def _renewals(worker: WorkerProcess) -> int:
    return worker.output.count("job long-1: renewing its lease")


def test_a_long_signed_job_held_by_a_killed_worker_comes_back_and_runs(
        tmp_path, rabbit, vhost, amqp, out, keyring):
    # consumer_timeout = 2: the lease is renewed every second, well within the job's 4 s.
    worker, publisher = _configs(tmp_path, rabbit.url(vhost), out, keyring,
                                 rbit={"consumer_timeout": 2})
    watcher = amqp.watch("rbit.status")
    with _worker(worker, amqp, "--debug") as first:
        with Client(load_config(str(publisher))) as client:
            client.submit(LONG, b"job", job_id="long-1")
        # A second renewal starts once the first one ended (they run one at a time).
        wait_until(lambda: _renewals(first) >= 2, 30, "a renewed lease")
        first.kill()  # SIGKILL, the whole process group
    assert _runs(out, "long-1") == 1
    # The held copy expires back to the work queue; the restarted worker verifies its
    # counter-signature and runs it.
    with _worker(worker, amqp):
        events = watcher.wait_for("long-1", "Done", timeout=60)
    assert _runs(out, "long-1") == 2
    assert not any(e["status"] == "Failed" for e in events), events
    assert "signature refused" not in (tmp_path / "worker.log").read_text()


def _replay(config: Path, queue: str) -> int:
    return main(["dead-letters", str(config), "replay", queue])


def test_a_dead_signed_job_replayed_by_an_operator_runs_and_a_forged_replay_never_does(
        tmp_path, rabbit, vhost, amqp, out, keyring, alice, capsys):
    worker, publisher = _configs(tmp_path, rabbit.url(vhost), out, keyring)
    watcher = amqp.watch("rbit.status")
    headers = _signed(alice, "pybit", ONCE, "once-1")
    with _worker(worker, amqp):
        amqp.publish(b"job", routing_key=ONCE, message_id="once-1", headers=headers)
        watcher.wait_for("once-1", "Failed")
        wait_until(lambda: rabbit.list_queues(vhost).get(f"{ONCE}.dead") == (1, 0), 15,
                   "the failed job in the dead letters")
        # The operator (publisher.ini: [security] signing_key, a trusted key) replays it.
        assert _replay(publisher, ONCE) == ExitCode.OK
        assert "replayed 1 job(s)" in capsys.readouterr().out
        watcher.wait_for("once-1", "Done")
        assert _runs(out, "once-1") == 2

        # Forged replays of the captured job: the replay count a replay carries and no
        # counter-signature, or one by a key the workers do not trust.
        forged = {**headers, "x-rbit-replayed": 1}
        amqp.publish(b"job", exchange="", routing_key=ONCE, message_id="once-1",
                     headers=forged)
        assert "a replay" in _dead(amqp, ONCE)[1]
        mallory = Signer(keys.load_private(keys.generate("mallory", tmp_path / "m")[0]))
        with_sig = {**forged, **mallory.countersign_copy("replay", forged, ONCE, 1,
                                                         int(time.time()) + 60)}
        amqp.publish(b"job", exchange="", routing_key=ONCE, message_id="once-1",
                     headers=with_sig)
        assert "replay counter-signed by an unknown or revoked key" in _dead(amqp, ONCE)[1]
    assert _runs(out, "once-1") == 2


def test_replaying_a_signed_job_without_an_operator_key_fails_and_keeps_it(
        tmp_path, rabbit, vhost, amqp, out, keyring, alice, capsys):
    worker, _publisher = _configs(tmp_path, rabbit.url(vhost), out, keyring)
    plain = write_config(tmp_path, rabbit.url(vhost),
                         {ONCE: {"runner": "shell!true", "require_signed": "yes"}},
                         name="plain.ini")
    amqp.channel.queue_declare(f"{ONCE}.dead", durable=True)
    amqp.publish(b"job", exchange="", routing_key=f"{ONCE}.dead", message_id="d-1",
                 headers=_signed(alice, "pybit", ONCE, "d-1"))
    assert _replay(plain, ONCE) == ExitCode.ERROR
    assert "set [security] signing_key" in capsys.readouterr().err
    assert rabbit.list_queues(vhost).get(f"{ONCE}.dead") == (1, 0)
