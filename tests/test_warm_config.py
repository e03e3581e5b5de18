"""The warm-children keys of a python! runner section: parsed, validated, warned about."""

from __future__ import annotations

import pytest

from rbit.config import load_config
from rbit.errors import ConfigError


def _load(tmp_path, **keys):
    lines = ["[rbit]", "name = w", "[amqp]", "host = localhost",
             "[runner:cnx_any_latex_pdf]", "runner = python!rbitext.examples:noop"]
    lines += [f"{key} = {value}" for key, value in keys.items()]
    path = tmp_path / "w.ini"
    path.write_text("\n".join(lines) + "\n")
    return load_config(str(path)), str(path)


def test_limits_are_read_with_size_units(tmp_path):
    settings, _ = _load(tmp_path, timeout=60, max_jobs_per_child=500,
                        max_memory_per_child="512M")
    runner = settings.runners[0]
    assert runner.max_jobs_per_child == 500
    assert runner.max_memory_per_child == 512 * 1024 * 1024
    assert "max_jobs_per_child" not in runner.settings  # rbit's keys, not the runner's


def test_limits_default_to_none(tmp_path):
    runner = _load(tmp_path, timeout=60)[0].runners[0]
    assert (runner.max_jobs_per_child, runner.max_memory_per_child) == (None, None)


@pytest.mark.parametrize(("key", "value"), [("max_jobs_per_child", "0"),
                                            ("max_jobs_per_child", "many"),
                                            ("max_memory_per_child", "lots"),
                                            ("max_memory_per_child", "0")])
def test_bad_limits_name_file_section_and_key(tmp_path, key, value):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, timeout=60, **{key: value})
    assert info.value.key == key
    assert info.value.section == "runner:cnx_any_latex_pdf"
