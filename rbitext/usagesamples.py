"""Cumulative usage samples, as the group-billing runner reads them.

A sample is one reading of a cumulative usage gauge for one group: ``(group, metric,
value, time)``, e.g. ``("physics", "project_vcpu_usage", 112.5, None)``. Three formats:

* Prometheus text exposition, as a usage exporter serves it (:func:`parse_prometheus`):
  the metric is the family name, the group is one label (``project_name`` by default).
  Series of one group and metric (other labels differing, e.g. one per hypervisor) are
  summed.
* InfluxDB line protocol (:func:`parse_line_protocol`): the group is the same tag; a
  field named ``value``, ``gauge``, ``counter`` or ``untyped`` is a sample of the
  measurement (Telegraf's first metric layout); any other numeric field is a sample of
  the metric the field names (its second layout). Timestamps are nanoseconds.
* A JSON list of ``{"group", "metric", "value", "time"}`` objects (:func:`parse_json_list`);
  ``time`` (seconds since the epoch) may be omitted or null.

Only metrics in ``metrics`` (the priced ones) become samples; a body or scrape with more
than ``max_samples`` of them is refused, so that a runaway exporter cannot flood the
state file. Anything that does not parse raises :class:`rbit.errors.DecodeError`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from rbit.errors import DecodeError

#: The longest group name accepted (UTF-8 bytes).
MAX_GROUP_BYTES = 200
#: Field names that mean "the measurement's own value" in line protocol.
VALUE_FIELDS = frozenset({"value", "gauge", "counter", "untyped"})


@dataclass(frozen=True)
class Sample:
    """One reading of a cumulative usage gauge.

    Attributes:
        group: Whom the usage belongs to (a project, a tenant).
        metric: The gauge's name, e.g. ``project_vcpu_usage``.
        value: The cumulative value (unit-hours).
        time: Seconds since the epoch when it was read, or ``None`` when the source
            gave no time (the runner then uses the time it got the sample).
    """

    group: str
    metric: str
    value: float
    time: float | None = None

    def __post_init__(self) -> None:
        # The group is the bills' routing key, an AMQP short string: a longer one could
        # never be published, and would hold up every bill after it.
        if not self.group or len(self.group.encode("utf-8")) > MAX_GROUP_BYTES:
            raise DecodeError(f"group name must be 1 to {MAX_GROUP_BYTES} bytes, "
                              f"got {self.group[:40]!r}...")


def _finite(value: float, where: str) -> float:
    if not math.isfinite(value):
        raise DecodeError(f"{where}: value {value!r} is not a finite number")
    return value


def _bounded(samples: list[Sample], max_samples: int) -> list[Sample]:
    if len(samples) > max_samples:
        raise DecodeError(f"{len(samples)} usage samples, more than max_samples {max_samples}")
    return samples


# ---------------------------------------------------------------------------------------
# Prometheus text


def parse_prometheus(text: str, metrics: Collection[str], *, group_label: str = "project_name",
                     max_samples: int = 10_000) -> list[Sample]:
    """The samples of ``metrics`` in a Prometheus text exposition.

    Series without ``group_label`` are left out (they belong to no group).

    Raises:
        DecodeError: The text is not valid exposition format, or holds more than
            ``max_samples`` series of ``metrics``.
    """
    sums: dict[tuple[str, str], float] = {}
    times: dict[tuple[str, str], float | None] = {}
    series = 0
    try:
        for family in text_string_to_metric_families(text):
            if family.name not in metrics:
                continue
            for sample in family.samples:
                if sample.name not in (family.name, family.name + "_total"):
                    continue  # _created, _bucket, ...: not the cumulative value
                group = sample.labels.get(group_label)
                if not group:  # an empty label is no label in Prometheus
                    continue
                series += 1
                if series > max_samples:
                    raise DecodeError(f"more than max_samples {max_samples} usage samples")
                key = (group, family.name)
                sums[key] = sums.get(key, 0.0) + _finite(float(sample.value), family.name)
                stamp = sample.timestamp
                times[key] = None if stamp is None else _latest(times.get(key), float(stamp))
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise DecodeError(f"not valid Prometheus text: {exc}") from exc
    return [Sample(g, m, v, times[(g, m)]) for (g, m), v in sums.items()]


def _latest(known: float | None, stamp: float) -> float:
    return stamp if known is None else max(known, stamp)


# ---------------------------------------------------------------------------------------
# InfluxDB line protocol


def parse_line_protocol(text: str, metrics: Collection[str], *, group_label: str = "project_name",
                        max_samples: int = 10_000) -> list[Sample]:
    """The samples of ``metrics`` in InfluxDB line protocol.

    Raises:
        DecodeError: A line is not valid line protocol, or there are more than
            ``max_samples`` samples of ``metrics``.
    """
    samples: list[Sample] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            samples.extend(_line_samples(line, metrics, group_label))
        except DecodeError as exc:
            raise DecodeError(f"line protocol, line {number}: {exc}") from None
        if len(samples) > max_samples:
            raise DecodeError(f"more than max_samples {max_samples} usage samples")
    return samples


def _line_samples(line: str, metrics: Collection[str], group_label: str) -> Iterable[Sample]:
    head, fields_text, stamp_text = _split_line(line)
    key_parts = _split_unescaped(head, ",", quotes=False)
    measurement = _unescape(key_parts[0])
    if not measurement:
        raise DecodeError("no measurement")
    tags = {name: _unescape(value) for name, value in map(_pair, key_parts[1:])}
    fields = [_pair(part) for part in _split_unescaped(fields_text, ",", quotes=True)]
    when = _timestamp(stamp_text)
    group = tags.get(group_label)
    samples = []
    for name, raw in fields:
        metric = measurement if name in VALUE_FIELDS else name
        value = _field_number(raw)
        if metric in metrics and group is not None and value is not None:
            samples.append(Sample(group, metric, _finite(value, metric), when))
    return samples


def _split_line(line: str) -> tuple[str, str, str]:
    """Measurement-and-tags, fields, timestamp: split on spaces outside quotes/escapes."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in line:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == '"' and parts:  # quotes delimit string fields, not tag values
            quoted = not quoted
            current.append(char)
        elif char == " " and not quoted:
            if current:
                parts.append("".join(current))
                current = []
        else:
            current.append(char)
    if quoted:
        raise DecodeError("unterminated string")
    if current:
        parts.append("".join(current))
    if len(parts) not in (2, 3):
        raise DecodeError("expected 'measurement[,tags] fields [timestamp]'")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else ""


def _split_unescaped(text: str, sep: str, *, quotes: bool) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
            continue
        if char == "\\":
            escaped = True
        elif char == '"' and quotes:
            quoted = not quoted
        elif char == sep and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


_ESCAPED = re.compile(r"\\(.)")


def _unescape(text: str) -> str:
    return _ESCAPED.sub(r"\1", text)


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = _split_first_equals(text)
    if not sep or not name or value == "":
        raise DecodeError(f"expected key=value, got {text[:60]!r}")
    return _unescape(name), value


def _split_first_equals(text: str) -> tuple[str, str, str]:
    escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "=":
            return text[:index], "=", text[index + 1:]
    return text, "", ""


def _field_number(raw: str) -> float | None:
    """A numeric field's value; ``None`` for a string or boolean field."""
    if raw.startswith('"'):
        if len(raw) < 2 or not raw.endswith('"'):
            raise DecodeError(f"bad string field {raw[:60]!r}")
        return None
    if raw.lower() in ("t", "true", "f", "false"):
        return None
    number = raw[:-1] if raw[-1:] in ("i", "u") else raw
    try:
        return float(number)
    except ValueError:
        raise DecodeError(f"bad field value {raw[:60]!r}") from None


def _timestamp(text: str) -> float | None:
    if not text:
        return None
    if not text.lstrip("-").isdigit():
        raise DecodeError(f"bad timestamp {text[:30]!r}")
    return int(text) / 1e9


# ---------------------------------------------------------------------------------------
# JSON list


def parse_json_list(body: bytes | str, metrics: Collection[str], *,
                    max_samples: int = 10_000) -> list[Sample]:
    """The samples of ``metrics`` in a JSON list of ``{group, metric, value, time}``.

    Raises:
        DecodeError: Not a JSON list of such objects, or more than ``max_samples``
            samples of ``metrics``.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"usage samples are not JSON: {exc}") from exc
    if not isinstance(doc, list):
        raise DecodeError("usage samples must be a JSON list")
    samples = []
    for index, item in enumerate(doc):
        sample = _json_sample(item, index)
        if sample.metric in metrics:
            samples.append(sample)
    return _bounded(samples, max_samples)


def _json_sample(item: object, index: int) -> Sample:
    where = f"sample {index}"
    if not isinstance(item, dict):
        raise DecodeError(f"{where} is not an object")
    group, metric, value, when = (item.get(k) for k in ("group", "metric", "value", "time"))
    if not isinstance(group, str) or not group:
        raise DecodeError(f"{where}: 'group' must be a non-empty string")
    if not isinstance(metric, str) or not metric:
        raise DecodeError(f"{where}: 'metric' must be a non-empty string")
    if not _is_number(value):
        raise DecodeError(f"{where}: 'value' must be a number")
    if when is not None and not _is_number(when):
        raise DecodeError(f"{where}: 'time' must be a number of seconds or null")
    return Sample(group, metric, _finite(float(value), where),
                  None if when is None else _finite(float(when), where))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
