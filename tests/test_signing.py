"""Signed jobs without a broker: keys, the signed encoding, the replay window."""

from __future__ import annotations

import os
import stat

import pytest

from rbit.cli import main
from rbit.config import load_config
from rbit.errors import ConfigError, SignatureError
from rbit.security import keys
from rbit.security.replay import ReplayWindow
from rbit.security.signing import SIG_HEADER, Signer, verify

TARGET = ("pybit", "a.b.c.d")


def _signed(signer, body=b"job", headers=None, message_id="job-1"):
    headers = dict(headers or {"owner": "ana"})
    headers.update(signer.sign(*TARGET, message_id, "text/plain", headers, body))
    return headers


def _verify(trusted, body, headers, *, message_id="job-1", now=None, targets=None):
    return verify(trusted, body=body, headers=headers, message_id=message_id,
                  content_type="text/plain", targets=targets or {TARGET}, queue="a_b_c_d",
                  now=now if now is not None else headers["x-rbit-sig-time"],
                  max_skew=60, redelivered=False)


@pytest.fixture
def pair(tmp_path):
    private, _public = keys.generate("publisher", tmp_path / "trusted")
    return Signer(keys.load_private(private)), keys.TrustedKeys(str(tmp_path / "trusted"))


def test_generate_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path):
    private, public = keys.generate("ops", tmp_path)
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert keys.fingerprint(keys.load_public(public)) == \
        keys.fingerprint(keys.load_private(private).public_key())
    with pytest.raises(FileExistsError):
        keys.generate("ops", tmp_path)


def test_keys_cli_generates_and_prints_the_same_fingerprint(tmp_path, capsys):
    assert main(["keys", "generate", "ops", "--out", str(tmp_path)]) == 0
    key_id = capsys.readouterr().out.split()[0]
    assert main(["keys", "fingerprint", str(tmp_path / "ops.pub")]) == 0
    assert capsys.readouterr().out.strip() == key_id
    assert key_id.startswith("ed25519:")
    assert main(["keys", "generate", "ops", "--out", str(tmp_path)]) == 1


def test_a_signed_job_verifies(pair):
    signer, trusted = pair
    headers = _signed(signer)
    assert _verify(trusted, b"job", headers).key_id == signer.key_id


@pytest.mark.parametrize("change", ["body", "header", "new header", "message id", "route"])
def test_any_change_breaks_the_signature(pair, change):
    signer, trusted = pair
    headers, body, message_id = _signed(signer), b"job", "job-1"
    if change == "body":
        body = b"jOb"
    elif change == "header":
        headers["owner"] = "eve"
    elif change == "new header":
        headers["extra"] = "1"
    elif change == "message id":
        message_id = "job-2"
    else:
        headers["x-rbit-sig-route"] = "a.b.c.e"
    with pytest.raises(SignatureError, match="bad signature"):
        _verify(trusted, body, headers, message_id=message_id,
                targets={TARGET, ("pybit", "a.b.c.e")})


def test_a_target_that_does_not_lead_to_the_queue_is_refused(pair):
    signer, trusted = pair
    with pytest.raises(SignatureError, match="does not lead to queue"):
        _verify(trusted, b"job", _signed(signer), targets={("pybit", "other")})


def test_a_stale_signature_is_refused(pair):
    signer, trusted = pair
    headers = _signed(signer)
    with pytest.raises(SignatureError, match="more than 60 s"):
        _verify(trusted, b"job", headers, now=headers["x-rbit-sig-time"] + 61)


def test_a_retry_without_a_counter_signature_is_refused(pair):
    signer, trusted = pair
    headers = _signed(signer)
    headers["x-rbit-attempts"] = 1
    with pytest.raises(SignatureError, match="counter-signature"):
        _verify(trusted, b"job", headers)


def test_a_counter_signed_retry_verifies_until_its_deadline_only(pair):
    signer, trusted = pair
    headers = _signed(signer)
    headers["x-rbit-attempts"] = 1
    now = headers["x-rbit-sig-time"] + 3600  # far past max_skew: retries wait
    headers.update(signer.countersign(headers, "a_b_c_d", 1, now + 10))
    assert _verify(trusted, b"job", headers, now=now).retry
    with pytest.raises(SignatureError, match="stale retry"):
        _verify(trusted, b"job", headers, now=now + 11)
    headers["x-rbit-attempts"] = 2  # a changed try count breaks the counter-signature
    with pytest.raises(SignatureError, match="bad retry"):
        _verify(trusted, b"job", headers, now=now)


def test_a_removed_key_is_revoked_after_the_rescan_interval(tmp_path, pair):
    signer, _ = pair
    clock = [0.0]
    trusted = keys.TrustedKeys(str(tmp_path / "trusted"), clock=lambda: clock[0])
    assert trusted.get(signer.key_id) is not None
    os.remove(tmp_path / "trusted" / "publisher.pub")
    assert trusted.get(signer.key_id) is not None  # checked at most once a second
    clock[0] = 1.5
    assert trusted.get(signer.key_id) is None


def test_unknown_and_x_rbit_headers_are_refused(pair):
    signer, trusted = pair
    with pytest.raises(SignatureError, match="rbit's own"):
        signer.sign(*TARGET, "j", None, {"x-rbit-attempts": 3}, b"")
    headers = _signed(signer)
    headers[SIG_HEADER] = "not base64!"
    with pytest.raises(SignatureError, match="base64"):
        _verify(trusted, b"job", headers)


def test_the_replay_window_survives_a_restart(tmp_path):
    path = str(tmp_path / "state" / "replay.sqlite")
    window = ReplayWindow(path)
    assert window.first_time("k m", until=100, now=10)
    assert not window.first_time("k m", until=100, now=20)
    window.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    window = ReplayWindow(path)
    assert not window.first_time("k m", until=100, now=30)
    assert window.first_time("k m", until=200, now=101)  # expired: stale anyway


def test_require_signed_without_a_usable_key_fails_naming_file_section_key(tmp_path):
    from rbit.security.gate import WorkerSecurity

    (tmp_path / "empty").mkdir()
    config = tmp_path / "w.ini"
    config.write_text(f"[rbit]\nname = w\n[amqp]\nhost = localhost\n[security]\n"
                      f"trusted_keys = {tmp_path / 'empty'}\nrequire_signed = yes\n"
                      f"replay_file = {tmp_path / 'r.sqlite'}\n"
                      "[runner:q]\nrunner = shell!true\nmax_retries = 0\n")
    with pytest.raises(ConfigError) as caught:
        WorkerSecurity(load_config(str(config)))
    error = caught.value
    assert (error.file, error.section, error.key) == (str(config), "security", "trusted_keys")
    assert "no usable trusted key" in error.reason


def _outsider(tmp_path):
    private, _public = keys.generate("outsider", tmp_path / "untrusted")
    return Signer(keys.load_private(private))


def test_a_held_copy_verifies_once_per_hold_id_and_only_counter_signed_by_a_trusted_key(
        tmp_path, pair):
    signer, trusted = pair
    headers = {**_signed(signer), "x-rbit-held-by": "w.1", "x-rbit-hold-id": "h1"}
    now = headers["x-rbit-sig-time"] + 3600  # a long job: the signature itself is stale
    forged = {**headers, **_outsider(tmp_path).countersign_copy("hold", headers, "a_b_c_d",
                                                                "h1", int(now) + 10)}
    with pytest.raises(SignatureError, match="unknown or revoked key"):
        _verify(trusted, b"job", forged, now=now)
    with pytest.raises(SignatureError, match="more than 60 s"):  # no counter-signature
        _verify(trusted, b"job", headers, now=now)
    held = {**headers, **signer.countersign_copy("hold", headers, "a_b_c_d", "h1",
                                                 int(now) + 10)}
    verified = _verify(trusted, b"job", held, now=now)
    assert verified.retry
    assert verified.replay_key.endswith(" hold h1")  # each held copy taken once
    with pytest.raises(SignatureError, match="bad held copy"):
        _verify(trusted, b"job", {**held, "x-rbit-hold-id": "h2"}, now=now)
    with pytest.raises(SignatureError, match="stale held copy"):
        _verify(trusted, b"job", held, now=now + 11)


def test_a_replay_and_the_retries_of_a_replayed_job_verify_with_keys_of_their_own(pair):
    signer, trusted = pair
    headers = {**_signed(signer), "x-rbit-replayed": 1}
    now = headers["x-rbit-sig-time"] + 3600
    replayed = {**headers, **signer.countersign_copy("replay", headers, "a_b_c_d", 1,
                                                     int(now) + 10)}
    assert _verify(trusted, b"job", replayed, now=now).replay_key.endswith(" replay 1")
    with pytest.raises(SignatureError, match="bad replay"):  # the count is covered
        _verify(trusted, b"job", {**replayed, "x-rbit-replayed": 2}, now=now)
    with pytest.raises(SignatureError, match="bad replay"):  # so is the queue
        verify(trusted, body=b"job", headers=replayed, message_id="job-1",
               content_type="text/plain", targets={TARGET, ("", "other")}, queue="other",
               now=now, max_skew=60, redelivered=False)
    # Its retry: remembered apart from the original job's retry of the same number.
    retry = {**replayed, "x-rbit-attempts": 2}
    retry.update(signer.countersign(retry, "a_b_c_d", 2, int(now) + 20))
    assert _verify(trusted, b"job", retry, now=now).replay_key.endswith(" retry 2 replay 1")
    with pytest.raises(SignatureError, match="bad replay"):  # the replay count is covered
        _verify(trusted, b"job", {**retry, "x-rbit-replayed": 5}, now=now)
