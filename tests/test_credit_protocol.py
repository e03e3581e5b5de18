"""The front door's line protocol: parsing, validation and round trips."""

from __future__ import annotations

import contextlib
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rbit.credit.events import CreditEvent
from rbit.credit.protocol import MAX_LINE_BYTES, ProtocolError, format_line, parse_line, reply_for
from rbit.errors import RbitError

# Text a slot, name or value may hold: printable, no "," (the separator), no control
# characters, not starting or ending with whitespace (stripped from the line's ends),
# not only whitespace of any kind (a blank slot or machine is refused).
_SAFE = st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters=",")
_VALUE = st.text(_SAFE, min_size=1, max_size=30).filter(
    lambda s: s == s.strip(" \t\r\n") and s.strip())
_NAME = st.text(
    st.sampled_from(string.ascii_letters + string.digits + "_/.-:"), min_size=1, max_size=20
)
_NAMES = st.lists(_NAME.filter(lambda n: n != "slot"), min_size=1, max_size=5, unique=True)
_COUNT = st.integers(min_value=-(10**12), max_value=10**12)
_AMOUNT = st.integers(min_value=0, max_value=10**9)


@st.composite
def _events(draw: st.DrawFn) -> CreditEvent:
    command = draw(st.sampled_from(["alloc", "claim", "counters", "meta", "discard"]))
    args: dict[str, object] = {"slot": draw(_VALUE)}
    if command == "alloc":
        if draw(st.booleans()):
            args["credits"] = draw(_AMOUNT)
        else:
            low = draw(_AMOUNT)
            args.update(min=low, max=low + draw(_AMOUNT))
        if draw(st.booleans()):
            args["expire"] = draw(st.integers(1, 10**6))
    elif command == "claim":
        args["machine"] = draw(_VALUE)
        if draw(st.booleans()):
            args["credits"] = draw(_AMOUNT)
    elif command == "counters":
        args.update((name, draw(_COUNT)) for name in draw(_NAMES))
    elif command == "meta":
        args.update((name, draw(_VALUE)) for name in draw(_NAMES))
    elif draw(st.booleans()):
        args["reason"] = draw(_VALUE)
    return CreditEvent(command, args)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_line(data)
    assert issubclass(ProtocolError, RbitError)


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_protocol_error(text: str) -> None:
    with contextlib.suppress(ProtocolError):
        parse_line(text)


@settings(max_examples=300)
@given(_events())
def test_valid_lines_round_trip(event: CreditEvent) -> None:
    parsed = parse_line(format_line(event) + "\n")
    assert parsed.command == event.command
    assert dict(parsed.args) == dict(event.args)
    assert parsed.id != event.id  # without its id, a line is a new event
    assert parse_line(format_line(event, with_id=True) + "\n").id == event.id


@given(_events(), st.data())
def test_commands_are_case_insensitive(event: CreditEvent, data: st.DataObject) -> None:
    line = format_line(event)
    command, _, rest = line.partition(",")
    cased = "".join(data.draw(st.sampled_from([c.lower(), c.upper()])) for c in command)
    assert dict(parse_line(f"{cased},{rest}").args) == dict(parse_line(line).args)


@given(_VALUE, st.text(_SAFE, max_size=20))
def test_values_keep_every_equals_sign(slot: str, tail: str) -> None:
    value = f"a=b=={tail}".rstrip(" \t\r\n")
    event = parse_line(f"META,slot={slot},note={value}")
    assert event.args == {"slot": slot, "note": value}


@given(st.binary(min_size=1, max_size=50))
def test_replies_are_single_lines(reason: bytes) -> None:
    reply = reply_for(ProtocolError(reason.decode("utf-8", "replace")))
    assert reply.startswith(b"ER ")
    assert reply.endswith(b"\n")
    assert reply.count(b"\n") == 1


def test_ok_reply() -> None:
    assert reply_for(None) == b"OK\n"


@pytest.mark.parametrize(
    ("line", "command", "args"),
    [
        ("ALLOC,slot=job42,credits=10", "alloc", {"slot": "job42", "credits": 10}),
        ("alloc,slot=j,min=1,max=5,expire=60", "alloc",
         {"slot": "j", "min": 1, "max": 5, "expire": 60}),
        ("ALLOC,slot=slot_unique_id", "alloc", {"slot": "slot_unique_id"}),
        ("CLAIM,slot=j,machine=m-1", "claim", {"slot": "j", "machine": "m-1"}),
        ("claim,slot=j,machine=m,credits=+3", "claim", {"slot": "j", "machine": "m", "credits": 3}),
        ("COUNTERS,slot=j,errors/io=-2,events=+7", "counters",
         {"slot": "j", "errors/io": -2, "events": 7}),
        ("META,slot=j,host=a.b,empty=", "meta", {"slot": "j", "host": "a.b", "empty": ""}),
        ("DISCARD,slot=j,reason=out of memory", "discard",
         {"slot": "j", "reason": "out of memory"}),
        ("  Discard,slot=j  \r\n", "discard", {"slot": "j"}),
    ],
)
def test_documented_commands_parse(line: str, command: str, args: dict) -> None:
    event = parse_line(line)
    assert (event.command, dict(event.args)) == (command, args)
    assert len(event.id) == 32


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("", "empty line"),
        ("HELLO,slot=x", "unknown command 'HELLO'"),
        ("ALLOC", "missing argument 'slot'"),
        ("ALLOC,slot=", "empty slot"),
        ("ALLOC,slot=  ", "empty slot"),
        ("ALLOC,slot=a,colour=red", "unknown argument 'colour'"),
        ("CLAIM,slot=a,machine=m,extra=1", "unknown argument 'extra'"),
        ("DISCARD,slot=a,why=x", "unknown argument 'why'"),
        ("ALLOC,slot=a,slot=b", "duplicate argument 'slot'"),
        ("COUNTERS,slot=a,x=1,x=2", "duplicate argument 'x'"),
        ("ALLOC,slot=a,credits=ten", "argument 'credits' must be a non-negative integer"),
        ("ALLOC,slot=a,credits=-1", "argument 'credits' must be a non-negative integer"),
        ("ALLOC,slot=a,credits=1,min=1", "give either credits or min/max, not both"),
        ("ALLOC,slot=a,min=5,max=1", "min is greater than max"),
        ("ALLOC,slot=a,expire=0", "argument 'expire' must be at least 1 (minutes)"),
        ("CLAIM,slot=a", "missing argument 'machine'"),
        ("COUNTERS,slot=a", "COUNTERS needs at least one name=±n"),
        ("COUNTERS,slot=a,n=1.5", "argument 'n' must be an integer"),
        ("META,slot=a", "META needs at least one name=value"),
        ("ALLOC,slot", "argument 'slot' has no '='"),
        ("ALLOC,slot=a,", "empty argument"),
        ("ALLOC,=a", "argument with an empty name"),
        ("ALLOC,slot=a\x00b", "line contains control characters"),
        (b"ALLOC,slot=\xff", "line is not valid UTF-8"),
        ("META,slot=a,x=" + "y" * MAX_LINE_BYTES, "line too long"),
    ],
)
def test_malformed_lines_are_refused_with_a_reason(line: str | bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_line(line)
    assert caught.value.reason == reason


def test_a_line_of_exactly_the_limit_is_accepted() -> None:
    prefix = "META,slot=a,x="
    line = prefix + "y" * (MAX_LINE_BYTES - len(prefix))
    assert parse_line(line + "\n").args["x"] == "y" * (MAX_LINE_BYTES - len(prefix))


def test_format_line_refuses_values_that_cannot_travel_on_one_line() -> None:
    with pytest.raises(ProtocolError):
        format_line(CreditEvent("meta", {"slot": "a", "x": "1,2"}))


def test_event_id_becomes_the_event_id_and_is_no_argument() -> None:
    event = parse_line("META,slot=a,event_id=job-42.meta:1,x=y")
    assert (event.id, event.args) == ("job-42.meta:1", {"slot": "a", "x": "y"})
    assert parse_line("DISCARD,slot=a,event_id=abcdefgh").id == "abcdefgh"


@pytest.mark.parametrize("value", ["short", "-leading-dash", "with/slash", "x" * 129, ""])
def test_a_bad_event_id_is_refused(value: str) -> None:
    with pytest.raises(ProtocolError, match="event_id"):
        parse_line(f"DISCARD,slot=a,event_id={value}")
