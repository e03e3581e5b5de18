"""The command line's own exit codes, compared with the documented numbers."""

from __future__ import annotations

import pytest

from rbit.cli import ExitCode, main


@pytest.mark.parametrize("argv", [["--no-such-option", "x.ini"], [], ["x.ini", "--poll-time", "0"]])
def test_bad_command_line_exits_2(argv, capsys):
    assert main(argv) == 2
    assert "rbit" in capsys.readouterr().err


def test_exit_codes_are_the_documented_numbers():
    assert {code.name: int(code) for code in ExitCode} == {
        "OK": 0, "ERROR": 1, "USAGE": 2, "FORCED": 3, "JOB_FAILED": 10,
        "JOB_TIMEOUT": 11, "UNROUTABLE": 12, "NO_QUEUE": 66,
        "BROKER_UNREACHABLE": 69, "DUPLICATE_NAME": 73, "CONFIG": 78}
