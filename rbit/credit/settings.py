"""The ``rbit-credit`` daemon's configuration: a CreditPiggy daemon config, unchanged.

::

    [server]   socket = unix | tcp, bind = socket path | host:port, pidfile,
               loglevel (a number such as 20, or a name such as INFO), logfile,
               and rbit's own limits: idle_timeout (seconds before an idle connection
               is closed), reply_timeout (every line is answered within it),
               line_timeout (a line must be complete, and its replies taken, within
               it), max_connections (clients served at once)
    [api]      api_url, api_key (alias project_id), api_secret (alias project_auth),
               flush_interval -- read for the credit runner's sake; the daemon itself
               only publishes to RabbitMQ
    [amqp]     rbit's broker settings (see :func:`rbit.config.parse_amqp_section`), plus
               credit_queue (default ``rbit.credits``); in a cluster
               credit_queue_type = quorum, credit_delivery_limit and
               credit_quorum_group_size, which must match the keys queue_type,
               delivery_limit and quorum_group_size of the worker's section
               [runner:<credit queue>] (both declare the queue)
    [http]     rbit's own, optional: bind = HOST:PORT and token, for /healthz and
               /metrics (see :func:`rbit.config.parse_http_section`)

A site that ran the old daemon moves by adding ``[amqp]``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from rbit.config import AmqpSettings, HttpSettings, parse_amqp_section, parse_http_section, read_ini
from rbit.errors import ConfigError

DEFAULT_SOCKET = "/run/rbit/credit.socket"
DEFAULT_PIDFILE = "/run/rbit/credit.pid"
DEFAULT_QUEUE = "rbit.credits"
DEFAULT_API_URL = "https://creditpiggy.cern.ch/api"

_SERVER_KEYS = ("socket", "bind", "pidfile", "loglevel", "logfile", "idle_timeout",
                "reply_timeout", "line_timeout", "max_connections")
_API_KEYS = ("api_url", "api_key", "api_secret", "project_id", "project_auth", "flush_interval")
_ALIASES = {"api_key": "project_id", "api_secret": "project_auth"}


@dataclass(frozen=True)
class ApiSettings:
    """``[api]``: the CreditPiggy server (used by the credit runner, kept for reference)."""

    api_url: str = DEFAULT_API_URL
    api_key: str | None = None
    api_secret: str | None = field(default=None, repr=False)
    flush_interval: float = 5.0


@dataclass(frozen=True)
class CreditSettings:
    """The daemon's settings.

    ``unix_path`` is set for ``socket = unix``; ``host`` and ``port`` for ``tcp``.
    Paths are absolute (the daemon changes directory to ``/``).
    """

    file: str
    socket: str = "unix"
    unix_path: str | None = DEFAULT_SOCKET
    host: str | None = None
    port: int | None = None
    pidfile: str = DEFAULT_PIDFILE
    loglevel: int = logging.INFO
    logfile: str | None = None
    idle_timeout: float | None = 1.0
    reply_timeout: float = 5.0
    line_timeout: float = 10.0
    max_connections: int = 1000
    api: ApiSettings = ApiSettings()
    amqp: AmqpSettings = AmqpSettings()
    credit_queue: str = DEFAULT_QUEUE
    # The credit queue's declaration arguments (rbit.topology.work_queue_arguments).
    credit_queue_arguments: Mapping[str, object] = field(default_factory=dict)
    http: HttpSettings | None = None  # None: no HTTP endpoint
    warnings: tuple[str, ...] = ()


def load_credit_config(path: str, environ: Mapping[str, str] | None = None) -> CreditSettings:
    """Load a CreditPiggy daemon config with rbit's ``[amqp]`` section.

    Args:
        path: The config file.
        environ: Variables for ``${NAME}`` references in ``[amqp]``; defaults to
            ``os.environ``.

    Returns:
        The validated settings; unknown keys and sections are listed in ``warnings``.

    Raises:
        ConfigError: The file cannot be read, ``[amqp]`` is missing, or a value is
            invalid; the message names file, section, key and reason.
    """
    path = os.path.abspath(path)
    parser = read_ini(path)
    if not parser.has_section("amqp"):
        raise ConfigError("required section is missing (where RabbitMQ is)", file=path,
                          section="amqp")
    server = dict(parser["server"]) if parser.has_section("server") else {}
    api = dict(parser["api"]) if parser.has_section("api") else {}
    amqp_values = dict(parser["amqp"])
    queue = _queue(path, amqp_values.get("credit_queue", DEFAULT_QUEUE))
    amqp, amqp_warnings = parse_amqp_section(
        amqp_values, file=path, environ=environ, extra_keys=_CREDIT_QUEUE_KEYS
    )
    http, http_warnings = parse_http_section(
        dict(parser["http"]) if parser.has_section("http") else {}, file=path, environ=environ)
    warnings = [*_unknown(path, "server", server, _SERVER_KEYS), *http_warnings,
                *_unknown(path, "api", api, _API_KEYS), *amqp_warnings,
                *_unknown_sections(path, parser.sections())]
    return CreditSettings(
        file=path,
        **_listen(path, server),
        pidfile=_path(server.get("pidfile", DEFAULT_PIDFILE), path, "server", "pidfile"),
        loglevel=_loglevel(path, server.get("loglevel", "INFO")),
        logfile=_logfile(path, server.get("logfile")),
        idle_timeout=_idle_timeout(path, server.get("idle_timeout")),
        reply_timeout=_bound(path, server, "reply_timeout", 5.0),
        line_timeout=_bound(path, server, "line_timeout", 10.0),
        max_connections=_max_connections(path, server.get("max_connections")),
        api=_api(path, api),
        amqp=amqp,
        credit_queue=queue,
        credit_queue_arguments=_queue_arguments(path, queue, amqp_values),
        http=http,
        warnings=tuple(warnings),
    )


def _error(path: str, section: str, key: str, reason: str) -> ConfigError:
    return ConfigError(reason, file=path, section=section, key=key)


def _listen(path: str, server: Mapping[str, str]) -> dict[str, object]:
    kind = server.get("socket", "unix").strip().lower()
    if kind == "unix":
        bind = _path(server.get("bind", DEFAULT_SOCKET), path, "server", "bind")
        # sun_path holds 108 bytes including the terminating NUL.
        if len(os.fsencode(bind)) > 107:
            raise _error(path, "server", "bind", "a unix socket path is at most 107 bytes")
        return {"socket": "unix", "unix_path": bind, "host": None, "port": None}
    if kind == "tcp":
        host, port = _host_port(path, server.get("bind", "").strip())
        return {"socket": "tcp", "unix_path": None, "host": host, "port": port}
    raise _error(path, "server", "socket", f"expected unix or tcp, got {kind!r}")


def _host_port(path: str, bind: str) -> tuple[str, int]:
    host, colon, port_text = bind.rpartition(":")
    host = host.strip("[]")  # [::1]:9999
    port = _whole(port_text)
    if not colon or not host or port is None or not 0 < port < 65536:
        raise _error(path, "server", "bind", f"expected host:port for a tcp socket, got {bind!r}")
    return host, port


def _whole(text: str) -> int | None:
    """``text`` as a whole number of ASCII digits, or None.

    ``int()`` itself accepts more, and raises on superscripts and on thousands of digits.
    """
    text = text.strip()
    if not text or len(text) > 18 or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def _path(value: str, path: str, section: str, key: str) -> str:
    value = value.strip()
    if not value:
        raise _error(path, section, key, "must not be empty")
    return os.path.abspath(value)


def _loglevel(path: str, value: str) -> int:
    text = value.strip()
    number = _whole(text)
    level = number if number is not None else logging.getLevelName(text.upper())
    if not isinstance(level, int) or not 0 <= level <= logging.CRITICAL:
        raise _error(path, "server", "loglevel",
                     f"expected a number (0-50) or a level name such as INFO, got {text[:80]!r}")
    return level


def _logfile(path: str, value: str | None) -> str | None:
    if value is None or not value.strip() or value.strip() == os.devnull:
        return None
    return _path(value, path, "server", "logfile")


#: The longest ``idle_timeout`` and ``flush_interval``: a day keeps every timer in range.
MAX_SECONDS = 86400.0


def _number(path: str, section: str, key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise _error(path, section, key, f"expected a number, got {value.strip()[:80]!r}") from None
    if not math.isfinite(number) or not 0 <= number <= MAX_SECONDS:
        raise _error(path, section, key, f"expected a number >= 0 and <= {MAX_SECONDS:g}")
    return number


def _idle_timeout(path: str, value: str | None) -> float | None:
    if value is None:
        return 1.0
    number = _number(path, "server", "idle_timeout", value)
    return number or None  # 0 keeps idle connections open


def _bound(path: str, server: Mapping[str, str], key: str, default: float) -> float:
    """A time limit of ``[server]``: positive, since none may be switched off."""
    value = server.get(key)
    if value is None:
        return default
    number = _number(path, "server", key, value)
    if not 0 < number <= 3600:
        raise _error(path, "server", key, "expected seconds, more than 0 and at most 3600")
    return number


def _max_connections(path: str, value: str | None) -> int:
    if value is None:
        return 1000
    number = _whole(value)
    if number is None or not 1 <= number <= 1_000_000:
        raise _error(path, "server", "max_connections",
                     f"expected a whole number from 1 to 1000000, got {value.strip()[:80]!r}")
    return number


def _api(path: str, api: Mapping[str, str]) -> ApiSettings:
    values = {}
    for key, alias in _ALIASES.items():
        if key in api and alias in api:
            raise _error(path, "api", alias, f"{alias} is an alias of {key}; give only one")
        values[key] = api.get(key, api.get(alias))
    interval = api.get("flush_interval")
    return ApiSettings(
        api_url=api.get("api_url", DEFAULT_API_URL).strip(),
        flush_interval=5.0 if interval is None else _number(path, "api", "flush_interval",
                                                            interval),
        **values,
    )


_CREDIT_QUEUE_KEYS = ("credit_queue", "credit_queue_type", "credit_delivery_limit",
                      "credit_quorum_group_size")


def _queue_arguments(path: str, queue: str, values: Mapping[str, str]) -> dict[str, object]:
    from rbit.topology import work_queue_arguments  # the worker's own rule

    queue_type = values.get("credit_queue_type", "classic").strip().lower()
    if queue_type not in ("classic", "quorum"):
        raise _error(path, "amqp", "credit_queue_type", "expected classic or quorum")
    limit, size = (_count(path, values, key) for key in ("credit_delivery_limit",
                                                         "credit_quorum_group_size"))
    return work_queue_arguments(queue, queue_type, limit, size)


def _count(path: str, values: Mapping[str, str], key: str) -> int | None:
    text = values.get(key)
    if text is None or not text.strip():
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise _error(path, "amqp", key, "expected a whole number >= 1")
    return int(text)


def _queue(path: str, value: str) -> str:
    queue = value.strip()
    if not queue or len(queue.encode("utf-8")) > 255:
        raise _error(path, "amqp", "credit_queue", "expected a queue name of 1-255 bytes")
    return queue


def _unknown(
    path: str, section: str, values: Mapping[str, str], known: tuple[str, ...]
) -> list[str]:
    return [f"file {path}, section [{section}], key {key!r}: unknown key, ignored"
            for key in values if key not in known]


def _unknown_sections(path: str, sections: list[str]) -> list[str]:
    return [f"file {path}, section [{name}]: unknown section, ignored"
            for name in sections if name not in ("server", "api", "amqp", "http")]
