"""Safe decoding of job bodies: UTF-8 text, plain JSON, and jsonpickle documents.

``jsonpickle.decode`` on broker input is remote code execution: a document may name
any importable callable (``py/reduce``, ``py/function``, ``py/type``, ...). This module
never hands input to jsonpickle. It parses the body with :mod:`json` and walks the tree
itself, rebuilding only:

* plain JSON values;
* ``py/object`` documents whose class is in an allow-list, rebuilt as :class:`Record`
  instances (the named module is never imported, the named class never instantiated);
* ``py/state`` inside an allowed ``py/object``;
* ``py/tuple`` and ``py/set``;
* ``py/id`` back-references and legacy ``py/ref`` path references.

Any other ``py/...`` tag, or a class outside the allow-list, raises
:class:`rbit.errors.DecodeError` naming it.

``py/id`` follows jsonpickle's own numbering: every list, dict and ``py/object`` gets
the next index (counting from 0, the document's root included) at the moment the
decoder first enters it, before its children; ``py/tuple`` and ``py/set`` get none.
``{"py/id": n}`` is the object with index ``n``.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Callable
from typing import Any

from rbit.errors import DecodeError

#: PyBit's model classes (``pybit/models.py``), the ones a PyBit body may name.
DEFAULT_ALLOWED_CLASSES: frozenset[str] = frozenset(
    "pybit.models." + name
    for name in (
        "Arch",
        "BuildD",
        "BuildRequest",
        "CancelRequest",
        "CommandRequest",
        "Dist",
        "Format",
        "Job",
        "JobHistory",
        "Package",
        "PackageInstance",
        "Status",
        "StatusRequest",
        "Suite",
        "SuiteArch",
        "TaskComplete",
        "Transport",
    )
)

_BUILD_REQUEST = "pybit.models.BuildRequest"
_TAG_PREFIX = "py/"
# Keys jsonpickle may put beside "py/object"; everything else prefixed py/ is refused.
_OBJECT_TAGS = frozenset({"py/object", "py/state"})


class Record:
    """An object rebuilt from an allowed jsonpickle ``py/object``.

    Fields are read as attributes (``record.job.id``). ``record.class_name`` is the
    dotted class name the document gave; :meth:`to_dict` turns the record (and the
    records inside it) into plain dicts.
    """

    def __init__(self, class_name: str, fields: dict[str, Any] | None = None) -> None:
        object.__setattr__(self, "_class_name", class_name)
        object.__setattr__(self, "_fields", dict(fields or {}))

    @property
    def class_name(self) -> str:
        """The dotted class name from the document's ``py/object``."""
        return self._class_name

    def __getattr__(self, name: str) -> Any:
        # Dunder lookups (copy, pickle, pytest) must not be answered from input data.
        fields = self.__dict__.get("_fields", {})
        if not (name.startswith("__") and name.endswith("__")) and name in fields:
            return fields[name]
        raise AttributeError(f"{self.__dict__.get('_class_name')} record has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        self._fields[name] = value

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._fields))

    @reprlib.recursive_repr()
    def __repr__(self) -> str:
        fields = ", ".join(f"{key}={value!r}" for key, value in self._fields.items())
        return f"<{self._class_name}({fields})>"

    def to_dict(self) -> dict[str, Any]:
        """The record's fields as a dict, records inside it converted too.

        A record reached twice becomes the same dict both times (cycles included).
        """
        return _plain(self, {})


class BuildRequestRecord(Record):
    """A PyBit ``BuildRequest``, with PyBit's getters."""

    def get_job_id(self) -> Any:
        return self.job.id

    def get_package(self) -> Any:
        return self.job.packageinstance.package.name

    def get_version(self) -> Any:
        return self.job.packageinstance.package.version

    def get_arch(self) -> Any:
        return self.job.packageinstance.arch.name

    def get_suite(self) -> Any:
        return self.job.packageinstance.suite.name

    def get_dist(self) -> Any:
        return self.job.packageinstance.distribution.name

    def get_format(self) -> Any:
        return self.job.packageinstance.format.name

    def get_buildstamp(self) -> Any:
        return self.timestamp


_RECORD_TYPES: dict[str, type[Record]] = {_BUILD_REQUEST: BuildRequestRecord}


def _plain(value: Any, memo: dict[int, Any]) -> Any:
    if id(value) in memo:
        return memo[id(value)]
    if isinstance(value, Record):
        result: dict[str, Any] = {}
        memo[id(value)] = result
        result.update((k, _plain(v, memo)) for k, v in value._fields.items())
        return result
    if isinstance(value, dict):
        result = {}
        memo[id(value)] = result
        result.update((k, _plain(v, memo)) for k, v in value.items())
        return result
    if isinstance(value, list):
        items: list[Any] = []
        memo[id(value)] = items
        items.extend(_plain(v, memo) for v in value)
        return items
    if isinstance(value, tuple):
        return tuple(_plain(v, memo) for v in value)
    return value


def text(body: bytes | bytearray | memoryview | str) -> str:
    """The body as UTF-8 text.

    Raises:
        DecodeError: The body is not valid UTF-8.
    """
    if isinstance(body, str):
        return body
    try:
        return bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"body is not valid UTF-8: {exc}") from exc


def json_document(body: bytes | bytearray | memoryview | str) -> Any:
    """The body parsed as plain JSON (jsonpickle tags are left as they are).

    Raises:
        DecodeError: The body is not UTF-8 or not JSON.
    """
    document = text(body)
    try:
        return json.loads(document)
    except json.JSONDecodeError as exc:
        raise DecodeError(f"body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise DecodeError("body is nested too deeply to decode") from exc


def decode(body: bytes | bytearray | memoryview | str, allowed: frozenset[str]) -> Any:
    """The body as JSON, with jsonpickle objects rebuilt from the allow-list only.

    Args:
        body: The message body.
        allowed: Dotted class names a ``py/object`` may name.

    Returns:
        Plain JSON values, tuples, sets and :class:`Record` instances
        (:class:`BuildRequestRecord` for ``pybit.models.BuildRequest``).

    Raises:
        DecodeError: The body is not UTF-8 JSON, names a class outside ``allowed``,
            uses a jsonpickle tag other than the safe ones, or is malformed.
    """
    document = json_document(body)
    try:
        return _Walker(allowed).restore(document)
    except RecursionError as exc:
        raise DecodeError("body is nested too deeply to decode") from exc


def pybit_job_id(body: bytes) -> str | None:
    """The ``job.id`` of a PyBit BuildRequest body, or ``None``.

    Only a string or an integer counts as an id (PyBit's are integers): any other
    value, which a crafted body could make expand enormously once turned into text,
    means no PyBit id. The id is never longer than the body. Cheap for other bodies:
    unless the class name appears in the raw bytes nothing is parsed. Never raises.
    """
    try:
        if _BUILD_REQUEST.encode() not in body:
            return None
        request = decode(body, DEFAULT_ALLOWED_CLASSES)
        if not isinstance(request, BuildRequestRecord):
            return None
        job_id = request.job.id
    except Exception:  # any malformed body simply has no PyBit id
        return None
    if job_id.__class__ is str:
        return job_id or None
    if job_id.__class__ is int:  # not bool; str() of it is at most as long as the body
        return str(job_id)
    return None


class _Walker:
    """One pass over a parsed document; holds jsonpickle's reference table."""

    def __init__(self, allowed: frozenset[str]) -> None:
        self._allowed = allowed
        self._objects: list[Any] = []
        self._paths: dict[str, Any] = {}
        self._path: list[str] = []

    def restore(self, node: Any) -> Any:
        if isinstance(node, list):
            return self._restore_list(node)
        if isinstance(node, dict):
            return self._restore_dict(node)
        return node

    def _register(self, value: Any) -> None:
        self._objects.append(value)
        self._paths.setdefault("/" + "/".join(self._path), value)

    def _child(self, key: str, node: Any) -> Any:
        self._path.append(key)
        try:
            return self.restore(node)
        finally:
            self._path.pop()

    def _restore_list(self, node: list[Any]) -> list[Any]:
        result: list[Any] = []
        self._register(result)
        result.extend(self._child(str(index), item) for index, item in enumerate(node))
        return result

    def _restore_dict(self, node: dict[str, Any]) -> Any:
        tags = [key for key in node if key.startswith(_TAG_PREFIX)]
        if not tags:
            result: dict[str, Any] = {}
            self._register(result)
            result.update((key, self._child(key, value)) for key, value in node.items())
            return result
        if "py/object" in node:
            return self._restore_object(node, tags)
        if len(node) != 1:
            raise DecodeError(f"jsonpickle tags {sorted(tags)} cannot be combined")
        tag = tags[0]
        handler = self._SINGLE_TAGS.get(tag)
        if handler is None:
            raise DecodeError(f"jsonpickle tag {tag!r} is not allowed")
        return handler(self, node[tag])

    def _restore_tuple(self, items: Any) -> tuple[Any, ...]:
        return tuple(self._restore_items(items, "py/tuple"))

    def _restore_set(self, items: Any) -> set[Any]:
        try:
            return set(self._restore_items(items, "py/set"))
        except TypeError as exc:
            raise DecodeError(f"py/set holds an unhashable item: {exc}") from exc

    def _restore_items(self, items: Any, tag: str) -> list[Any]:
        if not isinstance(items, list):
            raise DecodeError(f"{tag} must hold a list")
        return [self._child(str(index), item) for index, item in enumerate(items)]

    def _restore_id(self, index: Any) -> Any:
        if type(index) is not int or not 0 <= index < len(self._objects):
            raise DecodeError(f"py/id {index!r} does not refer to an earlier object")
        return self._objects[index]

    def _restore_ref(self, path: Any) -> Any:
        if not isinstance(path, str) or path not in self._paths:
            raise DecodeError(f"py/ref {path!r} does not refer to an earlier object")
        return self._paths[path]

    _SINGLE_TAGS: dict[str, Callable[[_Walker, Any], Any]] = {
        "py/tuple": _restore_tuple,
        "py/set": _restore_set,
        "py/id": _restore_id,
        "py/ref": _restore_ref,
    }

    def _restore_object(self, node: dict[str, Any], tags: list[str]) -> Record:
        class_name = node["py/object"]
        if not isinstance(class_name, str):
            raise DecodeError("py/object must name a class")
        if class_name not in self._allowed:
            raise DecodeError(f"class {class_name!r} is not in the allow-list")
        unsafe = sorted(set(tags) - _OBJECT_TAGS)
        if unsafe:
            raise DecodeError(f"jsonpickle tag {unsafe[0]!r} is not allowed (in {class_name})")
        record = _RECORD_TYPES.get(class_name, Record)(class_name)
        # Registered before its children, so they can refer back to it (cycles).
        self._register(record)
        for key, value in node.items():
            if not key.startswith(_TAG_PREFIX):
                setattr(record, key, self._child(key, value))
        if "py/state" in node:
            self._apply_state(record, self._child("py/state", node["py/state"]))
        return record

    @staticmethod
    def _apply_state(record: Record, state: Any) -> None:
        # jsonpickle's default for classes without __setstate__: a dict of attributes,
        # or a (dict, slots dict) pair.
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            parts = [state[1], state[0]] if isinstance(state[0], dict) else [state[1]]
        elif isinstance(state, dict):
            parts = [state]
        else:
            raise DecodeError(f"py/state of {record.class_name} must be a dict of attributes")
        for part in parts:
            for key, value in part.items():
                setattr(record, str(key), value)
