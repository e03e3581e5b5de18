"""The usage sample parsers: Prometheus text, InfluxDB line protocol, JSON lists."""

from __future__ import annotations

import pytest

from rbit.errors import DecodeError
from rbitext.usagesamples import (
    Sample,
    parse_json_list,
    parse_line_protocol,
    parse_prometheus,
)

METRICS = {"project_vcpu_usage", "project_mb_usage"}

EXPOSITION = """\
# HELP project_vcpu_usage Cumulative vCPU-hours per project
# TYPE project_vcpu_usage gauge
project_vcpu_usage{project_name="physics",hypervisor="h1"} 100
project_vcpu_usage{project_name="physics",hypervisor="h2"} 12.5
project_vcpu_usage{project_name="chem"} 7 1700000000000
project_vcpu_usage{hypervisor="h3"} 99
# TYPE project_mb_usage gauge
project_mb_usage{project_name="physics"} 2048
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 4.5
"""


def _by_key(samples):
    return {(s.group, s.metric): s for s in samples}


def test_prometheus_sums_series_per_group_and_keeps_only_priced_metrics():
    samples = _by_key(parse_prometheus(EXPOSITION, METRICS))
    assert samples == {
        ("physics", "project_vcpu_usage"): Sample("physics", "project_vcpu_usage", 112.5),
        ("chem", "project_vcpu_usage"): Sample("chem", "project_vcpu_usage", 7.0, 1700000000.0),
        ("physics", "project_mb_usage"): Sample("physics", "project_mb_usage", 2048.0),
    }


def test_prometheus_group_label_is_configurable():
    text = 'project_vcpu_usage{tenant="t1",project_name="p"} 3\n'
    assert parse_prometheus(text, METRICS, group_label="tenant") == [
        Sample("t1", "project_vcpu_usage", 3.0)]


@pytest.mark.parametrize("text", [
    'project_vcpu_usage{project_name="a"} abc\n',
    'project_vcpu_usage{project_name="a" 1\n',
    'project_vcpu_usage{project_name="a"} NaN\n',
])
def test_malformed_prometheus_text_is_a_decode_error(text):
    with pytest.raises(DecodeError):
        parse_prometheus(text, METRICS)


def test_prometheus_series_beyond_max_samples_are_refused():
    text = "".join(f'project_vcpu_usage{{project_name="g{i}"}} {i}\n' for i in range(11))
    assert len(parse_prometheus(text, METRICS, max_samples=11)) == 11
    with pytest.raises(DecodeError, match="max_samples"):
        parse_prometheus(text, METRICS, max_samples=10)


def test_line_protocol_measurement_value_and_field_per_metric_layouts():
    text = (
        "# a comment\n"
        "project_vcpu_usage,project_name=physics value=112.5 1700000000000000000\n"
        "prometheus,project_name=chem project_mb_usage=2048i,note=\"a b,c=d\" 1700000001000000000\n"
        "project_vcpu_usage,project_name=my\\ lab\\,x gauge=3\n"
        "cpu,host=h1 value=9\n"
    )
    assert parse_line_protocol(text, METRICS) == [
        Sample("physics", "project_vcpu_usage", 112.5, 1700000000.0),
        Sample("chem", "project_mb_usage", 2048.0, 1700000001.0),
        Sample("my lab,x", "project_vcpu_usage", 3.0),
    ]


@pytest.mark.parametrize("line", [
    "project_vcpu_usage,project_name=a",  # no fields
    "project_vcpu_usage,project_name=a value=abc",  # not a number
    "project_vcpu_usage,project_name=a value=1 12x",  # bad timestamp
    "project_vcpu_usage,=a value=1",  # tag without a key
    'project_vcpu_usage,project_name=a s="open',  # unterminated string
    "project_vcpu_usage,project_name=a value=1 2 3",  # too many parts
    "project_vcpu_usage,project_name=a value=inf",  # not finite
])
def test_malformed_line_protocol_is_a_decode_error_naming_the_line(line):
    with pytest.raises(DecodeError, match="line 2"):
        parse_line_protocol("project_vcpu_usage,project_name=a value=1\n" + line, METRICS)


def test_json_list_of_samples():
    body = (b'[{"group": "physics", "metric": "project_vcpu_usage", "value": 112.5, '
            b'"time": 1700000000}, {"group": "chem", "metric": "project_mb_usage", '
            b'"value": 1024}, {"group": "x", "metric": "unpriced", "value": 1}]')
    assert parse_json_list(body, METRICS) == [
        Sample("physics", "project_vcpu_usage", 112.5, 1700000000.0),
        Sample("chem", "project_mb_usage", 1024.0, None),
    ]


@pytest.mark.parametrize(("body", "reason"), [
    (b"[{", "not JSON"),
    (b'{"group": "a"}', "must be a JSON list"),
    (b"[1]", "not an object"),
    (b'[{"metric": "project_vcpu_usage", "value": 1}]', "'group'"),
    (b'[{"group": "a", "value": 1}]', "'metric'"),
    (b'[{"group": "a", "metric": "project_vcpu_usage", "value": "1"}]', "'value'"),
    (b'[{"group": "a", "metric": "project_vcpu_usage", "value": true}]', "'value'"),
    (b'[{"group": "a", "metric": "project_vcpu_usage", "value": 1, "time": "now"}]', "'time'"),
])
def test_malformed_json_samples_are_a_decode_error(body, reason):
    with pytest.raises(DecodeError, match=reason):
        parse_json_list(body, METRICS)


def test_json_samples_beyond_max_samples_are_refused():
    body = b"[" + b",".join(
        b'{"group": "g%d", "metric": "project_vcpu_usage", "value": 1}' % i
        for i in range(3)) + b"]"
    with pytest.raises(DecodeError, match="max_samples"):
        parse_json_list(body, METRICS, max_samples=2)


def test_a_group_name_too_long_for_a_routing_key_is_a_decode_error():
    name = "g" * 201
    with pytest.raises(DecodeError, match="group name"):
        parse_prometheus(f'project_vcpu_usage{{project_name="{name}"}} 1\n', METRICS)
    with pytest.raises(DecodeError, match="group name"):
        parse_line_protocol(f"project_vcpu_usage,project_name={name} value=1", METRICS)
    assert parse_prometheus('project_vcpu_usage{project_name=""} 1\n', METRICS) == []
