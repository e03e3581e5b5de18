"""Safe decoding: PyBit BuildRequests rebuilt from the allow-list, nothing else runs."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import jsonpickle
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rbit import decoding
from rbit.decoding import DEFAULT_ALLOWED_CLASSES, BuildRequestRecord, Record
from rbit.errors import DecodeError
from rbit.message import Message


# Classes shaped like PyBit's models (pybit/models.py), named as jsonpickle sees them.
class _Model:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def _model(name):
    cls = type(name, (_Model,), {"__module__": "pybit.models"})
    cls.__qualname__ = name
    return cls


Arch, Suite, Dist, Format, Package, PackageInstance, Job, Transport, BuildRequest = (
    _model(n)
    for n in (
        "Arch",
        "Suite",
        "Dist",
        "Format",
        "Package",
        "PackageInstance",
        "Job",
        "Transport",
        "BuildRequest",
    )
)


def _pybit_request(job_id=42):
    arch = Arch(id=1, name="any")
    instance = PackageInstance(
        id=3,
        package=Package(id=7, version="1.0", name="col10001"),
        arch=arch,
        suite=Suite(id=2, name="latex"),
        distribution=Dist(id=1, name="cnx"),
        format=Format(id=4, name="pdf"),
        master=True,
    )
    return BuildRequest(
        job=Job(id=job_id, packageinstance=instance, buildclient=None),
        transport=Transport(id=1, method="git", uri="https://git.example/col10001", vcs_id=None),
        web_host="pybit.example:8080",
        commands=None,
        timestamp=1357000000,
        extra_arch=arch,  # the same object twice: jsonpickle writes a py/id reference
    )


# Written out as jsonpickle 4 encodes _pybit_request(): root BuildRequest is object 0,
# Job 1, PackageInstance 2, Package 3, Arch 4 -- so the repeated Arch is {"py/id": 4}.
HAND_WRITTEN_REQUEST = {
    "py/object": "pybit.models.BuildRequest",
    "job": {
        "py/object": "pybit.models.Job",
        "id": 42,
        "packageinstance": {
            "py/object": "pybit.models.PackageInstance",
            "id": 3,
            "package": {
                "py/object": "pybit.models.Package",
                "id": 7,
                "version": "1.0",
                "name": "col10001",
            },
            "arch": {"py/object": "pybit.models.Arch", "id": 1, "name": "any"},
            "suite": {"py/object": "pybit.models.Suite", "id": 2, "name": "latex"},
            "distribution": {"py/object": "pybit.models.Dist", "id": 1, "name": "cnx"},
            "format": {"py/object": "pybit.models.Format", "id": 4, "name": "pdf"},
            "master": True,
        },
        "buildclient": None,
    },
    "transport": {
        "py/object": "pybit.models.Transport",
        "id": 1,
        "method": "git",
        "uri": "https://git.example/col10001",
        "vcs_id": None,
    },
    "web_host": "pybit.example:8080",
    "commands": None,
    "timestamp": 1357000000,
    "extra_arch": {"py/id": 4},
}


def _body(document) -> bytes:
    return json.dumps(document).encode()


def test_hand_written_request_matches_what_jsonpickle_encodes():
    encoded = json.loads(jsonpickle.encode(_pybit_request(), keys=True))
    assert encoded == HAND_WRITTEN_REQUEST


def test_pybit_build_request_decodes_with_attributes_and_getters():
    request = decoding.decode(_body(HAND_WRITTEN_REQUEST), DEFAULT_ALLOWED_CLASSES)

    assert isinstance(request, BuildRequestRecord)
    assert request.job.packageinstance.package.name == "col10001"
    assert request.web_host == "pybit.example:8080"
    assert request.get_job_id() == 42
    assert request.get_package() == "col10001"
    assert request.get_version() == "1.0"
    assert request.get_arch() == "any"
    assert request.get_suite() == "latex"
    assert request.get_dist() == "cnx"
    assert request.get_format() == "pdf"
    assert request.get_buildstamp() == 1357000000


def test_py_id_back_reference_is_the_same_record():
    request = decoding.decode(_body(HAND_WRITTEN_REQUEST), DEFAULT_ALLOWED_CLASSES)
    assert request.extra_arch is request.job.packageinstance.arch


def test_py_id_numbering_matches_jsonpickle_for_lists_and_dicts():
    arch = Arch(id=1, name="any")
    value = {"first": [arch, {"nested": arch}], "again": arch, "pair": (arch, 2), "tags": {"a"}}
    body = jsonpickle.encode(value, keys=True).encode()

    decoded = decoding.decode(body, DEFAULT_ALLOWED_CLASSES)

    assert decoded["again"] is decoded["first"][0]
    assert decoded["first"][1]["nested"] is decoded["first"][0]
    assert decoded["pair"] == (decoded["first"][0], 2)
    assert decoded["tags"] == {"a"}


def test_self_referencing_object_decodes_to_a_cycle():
    document = {"py/object": "pybit.models.Job", "id": 1, "me": {"py/id": 0}}
    job = decoding.decode(_body(document), DEFAULT_ALLOWED_CLASSES)
    assert job.me is job
    assert "..." in repr(job)
    as_dict = job.to_dict()
    assert as_dict["me"] is as_dict


def test_py_state_fills_attributes():
    document = {"py/object": "pybit.models.Arch", "py/state": {"id": 9, "name": "armhf"}}
    arch = decoding.decode(_body(document), DEFAULT_ALLOWED_CLASSES)
    assert (arch.id, arch.name) == (9, "armhf")


def test_record_to_dict_and_repr():
    request = decoding.decode(_body(HAND_WRITTEN_REQUEST), DEFAULT_ALLOWED_CLASSES)
    plain = request.to_dict()
    assert plain["job"]["packageinstance"]["format"] == {"id": 4, "name": "pdf"}
    assert "pybit.models.Package(id=7" in repr(request)
    with pytest.raises(AttributeError):
        _ = request.no_such_field


def test_extra_allowed_class_is_a_plain_record():
    document = {"py/object": "site.jobs.Thing", "size": 3}
    thing = decoding.decode(_body(document), DEFAULT_ALLOWED_CLASSES | {"site.jobs.Thing"})
    assert type(thing) is Record
    assert thing.class_name == "site.jobs.Thing"
    assert thing.size == 3


def test_pybit_job_id_extracts_job_id():
    assert decoding.pybit_job_id(_body(HAND_WRITTEN_REQUEST)) == "42"
    assert Message(body=_body(HAND_WRITTEN_REQUEST), queue="q").job_id == "42"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xff\xfe",
        b"{not json",
        b'{"job": {"id": 1}}',
        b'"pybit.models.BuildRequest"',
        b'{"py/object": "pybit.models.BuildRequest", "job": {"py/object": "os.system"}}',
    ],
)
def test_pybit_job_id_is_none_for_other_bodies(body):
    assert decoding.pybit_job_id(body) is None


def test_plain_json_decodes_as_is():
    document = {"a": [1, 2.5, None, True], "b": {"c": "d"}}
    assert decoding.decode(_body(document), DEFAULT_ALLOWED_CLASSES) == document
    assert decoding.json_document(_body(document)) == document
    assert decoding.text("é".encode()) == "é"


@pytest.mark.parametrize("body", [b"\xff\xfeinvalid", b'{"a": ', b"[1, 2,]", b"\xc3"])
def test_invalid_utf8_or_json_raises_decode_error(body):
    with pytest.raises(DecodeError):
        decoding.decode(body, DEFAULT_ALLOWED_CLASSES)


def test_deeply_nested_body_raises_decode_error():
    with pytest.raises(DecodeError):
        decoding.decode(b"[" * 100_000 + b"]" * 100_000, DEFAULT_ALLOWED_CLASSES)


def _attacks(target: Path) -> list[tuple[str, dict]]:
    touch = ["touch", str(target)]
    shell = f"touch {target}"
    return [
        (
            "subprocess.Popen",
            {"py/object": "subprocess.Popen", "py/newargs": {"py/tuple": [touch]}},
        ),
        ("py/reduce", {"py/reduce": [{"py/function": "os.system"}, {"py/tuple": [shell]}]}),
        ("py/function", {"cmd": {"py/function": "os.system"}}),
        ("py/type", {"py/type": "subprocess.Popen"}),
        ("py/repr", {"py/repr": f"os/os.system({shell!r})"}),
        ("py/mod", {"py/mod": "os"}),
        ("py/newargs", {"py/object": "pybit.models.Job", "py/newargs": {"py/tuple": [touch]}}),
        ("py/b64", {"py/b64": "aGVsbG8="}),
        (
            "py/reduce",
            {"py/object": "pybit.models.Job", "x": {"py/reduce": [{"py/type": "os.system"}]}},
        ),
    ]


@pytest.mark.parametrize("index", range(9))
def test_dangerous_documents_raise_and_run_nothing(tmp_path, index):
    target = tmp_path / "pwned"
    expected, document = _attacks(target)[index]
    body = _body(document)
    # The documents are real attacks: jsonpickle itself would run them.
    modules_before = set(sys.modules)

    with pytest.raises(DecodeError, match=expected.replace("/", ".")):
        decoding.decode(body, DEFAULT_ALLOWED_CLASSES)

    assert not target.exists()
    assert set(sys.modules) == modules_before


def test_popen_attack_would_work_with_jsonpickle_itself(tmp_path):
    """Shows the test documents are real: unrestricted jsonpickle runs the reduce one."""
    target = tmp_path / "pwned"
    _, document = _attacks(target)[1]
    jsonpickle.decode(json.dumps(document), keys=True)  # noqa: S301 (the point of the test)
    assert target.exists()


_TAGS = [
    "py/object",
    "py/reduce",
    "py/function",
    "py/type",
    "py/repr",
    "py/mod",
    "py/id",
    "py/ref",
    "py/tuple",
    "py/set",
    "py/state",
    "py/newargs",
    "py/b64",
    "py/seq",
    "py/iterator",
]
_NAMES = [
    "os.system",
    "subprocess.Popen",
    "pybit.models.Job",
    "pybit.models.BuildRequest",
    "antigravity",
    "this",
    "json.loads",
    "builtins.eval",
    "pybit.models.Arch",
    "xml.dom.minidom",
]
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 50),
    st.floats(allow_nan=False),
    st.sampled_from(_NAMES),
    st.text(max_size=5),
)
_trees = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(_TAGS), st.text(max_size=4)), children, max_size=4
        ),
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=_trees)
def test_decode_of_arbitrary_tagged_trees_only_raises_decode_error_and_imports_nothing(tree):
    modules_before = set(sys.modules)
    with contextlib.suppress(DecodeError):
        decoding.decode(_body(tree), DEFAULT_ALLOWED_CLASSES)
    decoding.pybit_job_id(_body(tree))
    assert set(sys.modules) == modules_before
