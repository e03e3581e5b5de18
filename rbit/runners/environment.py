"""The environment of a job's process: what it keeps of the worker's, what is added.

A job's process (a ``shell!`` command, a ``python!`` runner child) does not inherit
the worker's whole environment: the worker's may hold the broker password
(``password = ${RBIT_AMQP_PASSWORD}``) and other secrets a job has no use for.
Two keys of a runner section decide what it gets:

* ``env_keep`` -- the names (comma- or space-separated; ``*``, ``?`` and ``[...]``
  patterns allowed, as in ``LC_*``) of the worker's variables the job keeps. Default:
  :data:`DEFAULT_KEEP`. ``env_keep = *`` keeps everything, ``env_keep =`` (empty)
  nothing.
* ``setenv`` -- variables to set, ``NAME=VALUE``, one per line (continuation lines
  of the ini value); they win over kept ones.

A variable the configuration interpolated into a secret key (``password``,
``secret``, ``token``, ``auth``, ``api_key``, any ``url``, in any section; see
:attr:`rbit.config.Settings.secret_env`) is never kept, whatever ``env_keep`` says,
and a ``setenv`` value that holds such a variable's value is refused when the runner
loads. rbit's own variables (``RBIT_JOB_ID`` and the like) are set last.

The environment is built once, when the runner loads: later changes to the
worker's ``os.environ`` are not seen by jobs.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from rbit.errors import RunnerLoadError

if TYPE_CHECKING:  # imported by runner children, which do not need the configuration
    from rbit.config import RunnerSettings

#: What ``env_keep`` is when a runner section does not set it.
DEFAULT_KEEP = (
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "LC_*", "TZ", "TERM",
    "TMPDIR", "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH",
)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PATTERN = re.compile(r"[A-Za-z0-9_*?\[\]!]+")


def job_environment(
    runner: RunnerSettings, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment a job of ``runner`` starts with (before rbit's ``RBIT_*``).

    Args:
        runner: The runner section; reads ``env_keep``, ``setenv`` and ``secret_env``.
        environ: The worker's environment; defaults to ``os.environ``.

    Raises:
        RunnerLoadError: ``env_keep`` or ``setenv`` is malformed, or ``setenv`` would
            pass on a secret.
    """
    source = os.environ if environ is None else environ
    where = f"runner:{runner.queue}"
    keep = _keep_patterns(runner.settings.get("env_keep"), where)
    secrets = runner.secret_env
    env = {name: value for name, value in source.items()
           if name not in secrets and _kept(name, keep)}
    for name, value in _setenv(runner.settings.get("setenv"), where):
        _refuse_secret(name, value, secrets, source, where)
        env[name] = value
    return env


def job_environb(runner: RunnerSettings) -> dict[bytes, bytes]:
    """:func:`job_environment`, encoded for ``exec`` (as ``os.environb`` is)."""
    return {os.fsencode(name): os.fsencode(value)
            for name, value in job_environment(runner).items()}


def _keep_patterns(raw: str | None, where: str) -> tuple[str, ...]:
    if raw is None:
        return DEFAULT_KEEP
    patterns = tuple(word for word in re.split(r"[\s,]+", raw) if word)
    for pattern in patterns:
        if not _PATTERN.fullmatch(pattern):
            raise RunnerLoadError(f"{where}: env_keep: {pattern!r} is not a variable name "
                                  "or a pattern of one")
    return patterns


def _kept(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _setenv(raw: str | None, where: str) -> list[tuple[str, str]]:
    pairs = []
    for line in (raw or "").splitlines():
        line = line.strip()
        if not line:
            continue
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not _NAME.fullmatch(name):
            # Only the name is quoted: the value may be a secret.
            raise RunnerLoadError(f"{where}: setenv: expected NAME=VALUE, one per line, "
                                  f"got a line starting {name[:40]!r}")
        pairs.append((name, value.strip()))
    return pairs


def _refuse_secret(name: str, value: str, secrets: Iterable[str],
                   source: Mapping[str, str], where: str) -> None:
    for secret in secrets:
        if source.get(secret) and source[secret] in value:
            raise RunnerLoadError(f"{where}: setenv: {name} would pass the value of "
                                  f"{secret}, which the configuration reads as a secret, "
                                  "to every job")
