"""The parts of broadcast that need no broker: answers, whom to expect, exit codes."""

from __future__ import annotations

import dataclasses
import json

from rbit.amqp.broadcast import MAX_ANSWER_BYTES, answer_document
from rbit.amqp.records import Delivery
from rbit.broadcast import BroadcastExit, exit_code, expected_workers
from rbit.message import BroadcastMessage
from rbit.outcome import Outcome, Output
from rbit.runners.shell.readers import Head


def _delivery() -> Delivery:
    return Delivery(BroadcastMessage(b"", "q", message_id="b-1"), 1, 0)


def _answer(outcome, error="", refused=False):
    return json.loads(answer_document("w1", _delivery(), outcome, error, refused))


def test_an_answer_carries_the_result_or_the_error():
    done = _answer(dataclasses.replace(Outcome.done(), result={"n": [1, 2]}))
    assert done == {"worker": "w1", "queue": "q", "job_id": "b-1", "ok": True,
                    "status": "Done", "result": {"n": [1, 2]}}
    failed = _answer(Outcome.failed("boom"))
    assert failed["ok"] is False
    assert failed["status"] == "Failed"
    assert failed["error"] == "boom"
    assert _answer(Outcome.blocked("later"))["status"] == "Blocked"
    refused = _answer(None, "signature refused: unsigned job", refused=True)
    assert refused["refused"] is True
    assert refused["ok"] is False


def test_a_shell_output_says_whether_it_was_cut():

    answer = _answer(dataclasses.replace(Outcome.done(), result=Output("hi\n", True)))
    assert answer["result"] == "hi\n"
    assert answer["truncated"] is True


def test_an_unserialisable_or_huge_result_is_an_error_not_a_crash():

    odd = _answer(dataclasses.replace(Outcome.done(), result={"x": object()}))
    assert odd["ok"] is False
    assert "not JSON-serialisable" in odd["error"]
    assert "result" not in odd
    nan = _answer(dataclasses.replace(Outcome.done(), result=float("nan")))
    assert nan["ok"] is False
    huge = _answer(dataclasses.replace(Outcome.done(), result="x" * MAX_ANSWER_BYTES))
    assert huge["ok"] is False
    assert "more than" in huge["error"]


def test_head_keeps_the_first_bytes_and_reads_the_rest():
    head = Head(5)
    for chunk in (b"ab", b"cdef", b"gh"):
        head.feed(chunk)
    assert head.output() == Output("abcde", True)
    exact = Head(4)
    exact.feed(b"abcd")
    assert exact.output() == Output("abcd", False)


def test_only_workers_announcing_the_queue_are_expected():
    def hello(name, queues, event="hello"):
        doc = {"name": name, "host": "h", "pid": 1, "event": event}
        if queues is not None:
            doc["broadcast"] = queues
        return json.dumps(doc).encode()

    announces = [hello("a", ["q", "r"]), hello("b", ["r"]), hello("c", None),
                 hello("d", ["q"]), hello("d", ["q"], "bye"), b"not json",
                 hello("e", ["q"]), hello("e", ["r"])]
    assert set(expected_workers(announces, "q")) == {"a"}
    assert set(expected_workers(announces, "r")) == {"a", "b", "e"}


def test_exit_codes_follow_rbit_ctl():
    ok = {"worker": "a", "ok": True}
    bad = {"worker": "b", "ok": False}
    refused = {"worker": "c", "ok": False, "refused": True}
    gone = [{"name": "d"}]
    assert exit_code({"replies": [ok], "missing": []}) == BroadcastExit.OK == 0
    assert exit_code({"replies": [ok, bad], "missing": []}) == BroadcastExit.FAILED == 1
    assert exit_code({"replies": [ok, bad], "missing": gone}) == BroadcastExit.NOT_ANSWERED == 4
    assert exit_code({"replies": [], "missing": []}) == BroadcastExit.NOT_ANSWERED
    assert exit_code({"replies": [refused], "missing": gone}) == BroadcastExit.REFUSED == 5
