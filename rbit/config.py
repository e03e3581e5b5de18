"""Settings: the ini file loaded, interpolated and validated in one place.

Nothing else in rbit reads the ini file or the environment. Every error raised here is a
:class:`rbit.errors.ConfigError` naming file, section, key and reason.
"""

from __future__ import annotations

import configparser
import dataclasses
import math
import os
import re
import shlex
import string
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rbit import backoff
from rbit.credit.pricing import KEYS as PRICING_KEYS
from rbit.credit.pricing import (
    Pricing,
    check_machine_id,
    default_machine_id,
    parse_pricing,
)
from rbit.dashboard.settings import DashboardSettings, parse_dashboard
from rbit.errors import ConfigError

if TYPE_CHECKING:
    from rbit.schedule.settings import ScheduleSettings


class RunnerOptions(dict):
    """A runner section's own keys, as handed to the runner.

    A plain ``dict`` (JSON-serialisable, ``format_map``-able) whose ``repr`` hides the
    values of keys that look secret (password, secret, token, auth, api_key), so that
    logging a :class:`RunnerSettings` never leaks them.
    """

    def __repr__(self) -> str:
        shown = {key: "***" if _is_secret(key) else value for key, value in self.items()}
        return f"RunnerOptions({shown!r})"


@dataclass(frozen=True)
class HostAddress:
    host: str
    port: int


@dataclass(frozen=True)
class AmqpSettings:
    """How to reach RabbitMQ. ``hosts`` are tried in order (failover)."""

    hosts: tuple[HostAddress, ...] = (HostAddress("localhost", 5672),)
    user: str = "guest"
    password: str = field(default="guest", repr=False)
    virtual_host: str = "/"
    heartbeat: int = 60
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_verify: bool = True
    connect_timeout: float = 10.0
    reconnect_delay: float = 1.0  # first backoff step after a lost connection
    reconnect_max_delay: float = 30.0  # backoff cap


@dataclass(frozen=True)
class RetryPolicy:
    """Delayed retries of a failed job.

    Try ``n`` waits ``min(retry_delay * backoff**(n-1), max_delay)`` seconds, spread by
    +-``jitter`` (a fraction).
    """

    max_retries: int = 3
    retry_delay: float = 10.0
    backoff: float = 2.0
    max_delay: float = 3600.0
    jitter: float = 0.1


@dataclass(frozen=True)
class RunnerSettings:
    """One ``[runner:<queue>]`` section."""

    queue: str
    runner: str  # the spec as written, e.g. "python!pkg.mod:func"
    kind: str  # "python" or "shell"
    target: str  # what follows the "!"
    routing_key: str  # binding on the pybit exchange
    concurrency: int = 1
    prefetch: int = 1
    # Whether prefetch was written in the section or [rbit]; if not, a batching runner's
    # batch size may raise it (rbit.worker), so that a default section batches.
    prefetch_set: bool = False
    timeout: float | None = None
    python: str | None = None  # interpreter for a child-process python! runner
    # Warm python! children: retire one after this many jobs / above this RSS (bytes).
    max_jobs_per_child: int | None = None
    max_memory_per_child: int | None = None
    queue_type: str = "classic"  # or "quorum"
    delivery_limit: int | None = None  # quorum queues: x-delivery-limit
    # Quorum queues: x-quorum-initial-group-size, the replication factor (None: the
    # broker's default, every cluster node at declaration).
    quorum_group_size: int | None = None
    retry: RetryPolicy = RetryPolicy()
    # Extra classes a jsonpickle body may name ([rbit] and this section's
    # jsonpickle_classes), added to the decoder's built-in allow-list.
    allowed_classes: frozenset[str] = frozenset()
    settings: Mapping[str, str] = field(default_factory=dict)  # every other key
    # Environment variables the file interpolated into a secret key (anywhere in it):
    # never passed on to a job's process (rbit.runners.environment).
    secret_env: frozenset[str] = frozenset()
    # Verify job signatures before anything else (None: as [security] require_signed).
    require_signed: bool | None = None
    # Where the section was written, for errors found when the runner is loaded.
    file: str = ""
    section: str = ""
    # Credits earned by each Done job from its usage (rbit.credit.pricing), if priced.
    pricing: Pricing | None = None

    @property
    def where(self) -> str:
        """``section [runner:Q]`` (and the file when known), for error messages."""
        section = self.section or f"{_RUNNER_PREFIX}{self.queue}"
        return f"file {self.file}, section [{section}]" if self.file else f"section [{section}]"


@dataclass(frozen=True)
class StatusSettings:
    """Where job statuses go (``[status]``)."""

    sinks: tuple[str, ...] = ("log",)  # any of "log", "amqp", "http"
    exchange: str = "rbit.status"  # topic exchange for the amqp sink
    routing_key: str = "{queue}.{status}"  # template; {queue}, {status}, {job_id}, {worker}
    http_url: str | None = None  # PyBit front-end base URL
    http_user: str | None = None
    http_password: str | None = field(default=None, repr=False)
    http_timeout: float = 10.0
    retry_max_delay: float = 60.0  # cap of the backoff while a sink is down
    max_pending: int = 100_000  # events kept in memory per sink while it is down


@dataclass(frozen=True)
class WorkerSettings:
    """The ``[rbit]`` section."""

    name: str
    distribution: str = ""
    architecture: str = ""
    suites: tuple[str, ...] = ()
    format: str = ""
    polling_time: float = 60.0
    mode: str = "consume"  # or "poll"
    concurrency: int = 1  # default for runners
    prefetch: int | None = None  # default: follows concurrency
    shutdown_grace: float = 30.0
    exchange: str = "pybit"
    queue_type: str = "classic"  # default for runners
    quorum_group_size: int | None = None  # default for runners
    consumer_timeout: float | None = None  # broker's delivery-ack timeout, if lowered
    jsonpickle_classes: tuple[str, ...] = ()  # extra classes every runner may decode
    pybit_commands: bool = False  # a command queue for PyBit's CancelRequest/StatusRequest
    # The machine usage credits are claimed for (rbit.credit.pricing.default_machine_id).
    machine_id: str = ""


@dataclass(frozen=True)
class HttpSettings:
    """``[http]``: the observability endpoint (off unless ``bind`` is set)."""

    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class SecuritySettings:
    """``[security]``: signing published jobs, verifying consumed ones (rbit.security)."""

    signing_key: str | None = None  # Ed25519 private key (PEM): signs jobs and retries
    trusted_keys: str | None = None  # directory of trusted public keys (*.pub)
    require_signed: bool = False  # default of every runner section
    max_skew: float = 300.0  # seconds a signature's time may be off from the clock
    replay_file: str = ""  # SQLite file of the replay window ("" = beside nothing: unset)


@dataclass(frozen=True)
class Settings:
    file: str
    worker: WorkerSettings
    amqp: AmqpSettings
    status: StatusSettings
    runners: tuple[RunnerSettings, ...]
    warnings: tuple[str, ...] = ()  # unknown sections/keys, by name
    # Python logging sections present ([loggers], [handler_x], ...), in file order; when
    # any is, the CLI may hand the file to logging.config.fileConfig.
    logging_sections: tuple[str, ...] = ()
    # Environment variables interpolated into a secret key (see RunnerSettings).
    secret_env: frozenset[str] = frozenset()
    http: HttpSettings | None = None  # None: no HTTP endpoint
    control: ControlSettings = field(default_factory=lambda: ControlSettings())
    state: StateSettings = field(default_factory=lambda: StateSettings())
    security: SecuritySettings = SecuritySettings()
    schedules: tuple[ScheduleSettings, ...] = ()  # [schedule:NAME] (rbit.schedule)
    dashboard: DashboardSettings = DashboardSettings()  # [dashboard] (rbit.dashboard)

    def require_signed(self, runner: RunnerSettings) -> bool:
        """Whether ``runner``'s jobs must carry a trusted signature."""
        if runner.require_signed is not None:
            return runner.require_signed
        return self.security.require_signed


# ---------------------------------------------------------------------------------------
# Loading

_LOGGING_SECTIONS = frozenset({"loggers", "handlers", "formatters"})
_LOGGING_PREFIXES = ("logger_", "handler_", "formatter_")
_RUNNER_PREFIX = "runner:"
#: rbit.schedule.settings.SECTION_PREFIX: that module is loaded only for such sections.
_SCHEDULE_PREFIX = "schedule:"
# configparser's [DEFAULT] would leak its keys into every section (and so into every
# runner's settings); rbit treats it as an ordinary, unknown section instead.
_NO_DEFAULT_SECTION = "\x00no-default\x00"

_QUEUE_TYPES = ("classic", "quorum")
_SINKS = ("log", "amqp", "http")
_STATUS_FIELDS = frozenset({"queue", "status", "job_id", "worker"})
_TRUE = frozenset({"yes", "true", "on", "1"})
_FALSE = frozenset({"no", "false", "off", "0"})

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_PYTHON_TARGET = re.compile(rf"{_IDENT}(?:\.{_IDENT})*:{_IDENT}(?:\.{_IDENT})*")
_CLASS_NAME = re.compile(rf"{_IDENT}(?:\.{_IDENT})+")
_ENV_REFERENCE = re.compile(r"\$(?:(\$)|\{([^}]*)\}|(\{))")
_ENV_NAME = re.compile(_IDENT)

# The largest values of numeric keys. Each bound keeps every later computation in range:
# poll() and lock timeouts (about 24 days at most), RabbitMQ's message TTLs (about 49
# days), AMQP's 16-bit heartbeat and prefetch fields, and the memory a value sizes.
#: Durations a job or a delay may last: timeout, shutdown_grace, retry delays.
MAX_LONG_DURATION = 14 * 24 * 3600.0
#: How long an idle worker may sleep between checks (polling_time, --poll-time).
MAX_POLL_TIME = 24 * 3600.0
#: Network waits and reconnect delays: connect_timeout, http_timeout, kill_grace, ...
MAX_SHORT_DURATION = 3600.0
MAX_CONCURRENCY = 1000  # each slot is a thread or a process
MAX_PREFETCH = 65535  # basic.qos prefetch-count is a 16-bit field
MAX_HEARTBEAT = 65535  # the heartbeat is a 16-bit field in seconds
MAX_RETRIES = 100_000
#: Distinct retry delays a policy may have: each is a queue declared on every connect.
MAX_DELAY_QUEUES = 100
MAX_BACKOFF = 100.0
MAX_DELIVERY_LIMIT = 1_000_000
MAX_GROUP_SIZE = 1_000  # replicas of one quorum queue; real clusters use 3, 5 or 7
MAX_PENDING = 10_000_000
#: The longest value an error message quotes.
_SHOWN_CHARS = 80

_RESERVED_PREFIX = "amq."
# The longest name rbit derives from a queue's: a delay queue of the longest delay.
_LONGEST_SUFFIX = f".retry.{int(MAX_LONG_DURATION * 1000)}"
#: The longest queue name a runner section may have, in UTF-8 bytes.
MAX_QUEUE_NAME = 255 - len(_LONGEST_SUFFIX)
_MAX_AMQP_NAME = 255  # exchange names and routing keys are AMQP short strings

# Keys whose values must never be echoed in an error or warning.
_SECRET_WORDS = ("password", "secret", "token", "auth", "url", "api_key")


def load_config(path: str, *, environ: Mapping[str, str] | None = None) -> Settings:
    """Load, interpolate and validate an rbit ini file.

    ``${NAME}`` in a value is replaced by the environment variable ``NAME`` (``$$`` is a
    literal ``$``); a lone ``$`` not followed by ``{`` is kept as is. Keys are
    case-insensitive (configparser lower-cases them). Unknown sections and keys do not
    stop loading: each gets a line in :attr:`Settings.warnings`.

    Args:
        path: The ini file.
        environ: Variables for ``${NAME}`` references; defaults to ``os.environ``.

    Returns:
        The validated, frozen settings.

    Raises:
        ConfigError: The file cannot be read or parsed, a required section or key is
            missing, a value has the wrong type, or a variable is not set. The message
            names file, section, key and reason, never a secret's value.
    """
    parser = read_ini(path)
    env = os.environ if environ is None else environ
    warnings: list[str] = []
    readers = {name: _Section(path, name, parser[name], env) for name in parser.sections()}
    for name in ("rbit", "amqp"):
        if name not in readers:
            raise ConfigError("required section is missing", file=path, section=name)
    worker = _worker(readers["rbit"])
    amqp = _amqp(readers["amqp"])
    status = _status(readers["status"]) if "status" in readers else StatusSettings()
    control, state = _control_and_state(readers, worker, amqp, env)
    runners = tuple(
        _runner(reader, worker, warnings)
        for name, reader in readers.items()
        if name.startswith(_RUNNER_PREFIX)
    )
    _check_unique_queues(path, runners)
    secret_env = secret_env_names(parser)
    runners = tuple(dataclasses.replace(runner, secret_env=secret_env) for runner in runners)
    http = _http(readers["http"]) if "http" in readers else None
    security = parse_security(readers.get("security"), worker.name, env)
    scheduled = [reader for name, reader in readers.items() if name.startswith(_SCHEDULE_PREFIX)]
    schedules = _schedules(scheduled, runners, worker.exchange)
    warnings.extend(line for reader in scheduled for line in reader.unknown_keys())
    warnings.extend(_unknown_sections(path, parser.sections()))
    dashboard = parse_dashboard(readers.get("dashboard"))
    for name in ("rbit", "amqp", "status", "http", "control", "security", "dashboard"):
        if name in readers:
            warnings.extend(readers[name].unknown_keys())
    return Settings(
        file=path,
        worker=worker,
        amqp=amqp,
        status=status,
        runners=runners,
        warnings=tuple(warnings),
        logging_sections=tuple(n for n in parser.sections() if _is_logging_section(n)),
        secret_env=secret_env,
        http=http,
        control=control,
        state=state,
        security=security,
        schedules=schedules,
        dashboard=dashboard,
    )


def check_worker(settings: Settings) -> None:
    """Refuse settings a worker could do nothing with.

    ``rbit dead-letters`` reads the same file and needs no runner; a worker does.

    Raises:
        ConfigError: There is no ``[runner:<queue>]`` section.
    """
    if not settings.runners:
        raise ConfigError(
            "no [runner:<queue>] section: a worker without runners would consume nothing",
            file=settings.file,
        )


def parse_amqp_section(
    values: Mapping[str, str],
    *,
    file: str,
    environ: Mapping[str, str] | None = None,
    extra_keys: Sequence[str] = (),
) -> tuple[AmqpSettings, tuple[str, ...]]:
    """Validate an ``[amqp]`` section read from another kind of file (``rbit-credit``).

    Args:
        values: The section's raw key/value pairs.
        file: The file they came from, for error messages.
        environ: Variables for ``${NAME}`` references; defaults to ``os.environ``.
        extra_keys: Keys the caller reads itself; they are not warned about.

    Returns:
        The settings, and warnings about unknown keys.
    """
    env = os.environ if environ is None else environ
    reader = _Section(file, "amqp", values, env)
    amqp = _amqp(reader)
    for key in extra_keys:
        reader.raw(key)
    return amqp, tuple(reader.unknown_keys())


def parse_http_section(
    values: Mapping[str, str], *, file: str, environ: Mapping[str, str] | None = None,
) -> tuple[HttpSettings | None, tuple[str, ...]]:
    """Validate an ``[http]`` section read from another kind of file (``rbit-credit``).

    Returns:
        The settings (None when ``bind`` is not set: no endpoint), and warnings about
        unknown keys.
    """
    reader = _Section(file, "http", values, os.environ if environ is None else environ)
    return _http(reader), tuple(reader.unknown_keys())


def parse_bool(text: str) -> bool:
    """Read an ini boolean: yes/no, true/false, on/off, 1/0 (any case).

    Raises:
        ValueError: ``text`` is none of those.
    """
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def read_ini(path: str) -> configparser.ConfigParser:
    """Parse an ini file, without interpolation.

    Raises:
        ConfigError: The file cannot be read or parsed; the message names the file
            (and the line, never its text: it may hold a secret).
    """
    parser = configparser.ConfigParser(
        interpolation=None, strict=True, default_section=_NO_DEFAULT_SECTION
    )
    try:
        with open(path, encoding="utf-8") as stream:
            parser.read_file(stream, source=path)
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", file=path) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("the file is not valid UTF-8", file=path) from exc
    except configparser.Error as exc:
        raise ConfigError(_parse_error_reason(exc), file=path) from exc
    return parser


def _parse_error_reason(exc: configparser.Error) -> str:
    # Only line numbers and names are reported: the offending line may hold a secret.
    if isinstance(exc, configparser.DuplicateOptionError):
        return f"line {exc.lineno}: duplicate key {exc.option!r} in section [{exc.section}]"
    if isinstance(exc, configparser.DuplicateSectionError):
        return f"line {exc.lineno}: duplicate section [{exc.section}]"
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return f"line {exc.lineno}: a key comes before any [section] header"
    if isinstance(exc, configparser.ParsingError):
        lines = ", ".join(str(lineno) for lineno, _ in exc.errors)
        return f"cannot parse line(s) {lines}"
    return f"cannot parse the file ({type(exc).__name__})"


def _is_logging_section(name: str) -> bool:
    return name in _LOGGING_SECTIONS or name.startswith(_LOGGING_PREFIXES)


def _unknown_sections(path: str, names: Sequence[str]) -> list[str]:
    known = {"rbit", "amqp", "status", "http", "control", "security", "dashboard"}
    return [
        f"file {path}, section [{name}]: unknown section, ignored"
        + _suggestion(name, sorted(known) + ["runner:<queue>", "schedule:<name>"])
        for name in names
        if name not in known and not name.startswith((_RUNNER_PREFIX, _SCHEDULE_PREFIX))
        and not _is_logging_section(name)
    ]


def _suggestion(word: str, candidates: Sequence[str]) -> str:
    import difflib  # only for a name rbit does not know
    close = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def secret_env_names(parser: configparser.ConfigParser) -> frozenset[str]:
    """The variables that ``${NAME}`` references put into secret keys, in any section."""
    names: set[str] = set()
    for section in parser.sections():
        for key, value in parser[section].items():
            if _is_secret(key):
                names.update(match.group(2) for match in _ENV_REFERENCE.finditer(value)
                             if match.group(2))
    return frozenset(names)


def _is_secret(key: str) -> bool:
    return any(word in key for word in _SECRET_WORDS)


def _interpolate(value: str, environ: Mapping[str, str], where: dict[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        dollar, name, unclosed = match.groups()
        if dollar:
            return "$"
        if unclosed or not _ENV_NAME.fullmatch(name):
            raise ConfigError("malformed ${NAME} reference", **where)
        if name not in environ:
            raise ConfigError(f"environment variable {name} is not set", **where)
        return environ[name]

    return _ENV_REFERENCE.sub(substitute, value)


class _Section:
    """Typed reads of one ini section, remembering which keys were read."""

    def __init__(
        self, file: str, name: str, values: Mapping[str, str], environ: Mapping[str, str]
    ) -> None:
        self.file = file
        self.name = name
        self._values = dict(values)
        self._environ = environ
        self._read: set[str] = set()

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(reason, file=self.file, section=self.name, key=key)

    def keys(self) -> list[str]:
        return list(self._values)

    def has(self, key: str) -> bool:
        return key in self._values

    def raw(self, key: str) -> str | None:
        """The interpolated value, or None when the key is absent."""
        self._read.add(key)
        if key not in self._values:
            return None
        where = {"file": self.file, "section": self.name, "key": key}
        return _interpolate(self._values[key], self._environ, where)

    def text(
        self, key: str, default: str | None = None, *, required: bool = False
    ) -> str | None:
        value = self.raw(key)
        if value is None and required:
            raise self.error(key, "required key is missing")
        return default if value is None else value.strip()

    def nonempty(self, key: str, default: str) -> str:
        value = self.text(key, default)
        if not value:
            raise self.error(key, "must not be empty")
        return value

    def integer(
        self, key: str, default: int | None, minimum: int, maximum: int | None = None
    ) -> int | None:
        value = self.text(key)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:  # also a number of more digits than int() converts
            number = minimum - 1
        if number < minimum or (maximum is not None and number > maximum):
            bounds = f">= {minimum}" if maximum is None else f">= {minimum} and <= {maximum}"
            reason = f"expected an integer {bounds}, got {self.shown(key, value)}"
            raise self.error(key, reason)
        return number

    def number(
        self,
        key: str,
        default: float | None,
        minimum: float = 0.0,
        *,
        strict: bool = True,
        maximum: float | None = None,
    ) -> float | None:
        """A float; ``strict`` excludes ``minimum`` itself."""
        value = self.text(key)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not _within(number, minimum, strict, maximum):
            reason = f"expected {_bounds(minimum, strict, maximum)}, got {self.shown(key, value)}"
            raise self.error(key, reason)
        return number

    def boolean(self, key: str, default: bool) -> bool:
        value = self.text(key)
        if value is None:
            return default
        try:
            return parse_bool(value)
        except ValueError:
            raise self.error(
                key, f"expected yes/no, true/false, on/off or 1/0, got {self.shown(key, value)}"
            ) from None

    def choice(self, key: str, default: str, choices: Sequence[str]) -> str:
        value = (self.text(key) or default).lower()
        if value not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def listing(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.text(key)
        if value is None:
            return default
        return tuple(item.strip() for item in value.split(",") if item.strip())

    def class_names(self, key: str) -> tuple[str, ...]:
        names = self.listing(key)
        for name in names:
            if not _CLASS_NAME.fullmatch(name):
                reason = f"expected dotted class names like 'pkg.module.Class', got {name!r}"
                raise self.error(key, reason)
        return names

    def shown(self, key: str, value: str) -> str:
        if _is_secret(key):
            return "a value that is not valid (hidden: secret)"
        if len(value) > _SHOWN_CHARS:
            return f"{value[:_SHOWN_CHARS]!r}... ({len(value)} characters)"
        return repr(value)

    def unknown_keys(self) -> list[str]:
        return [
            f"file {self.file}, section [{self.name}], key {key!r}: unknown key, ignored"
            + _suggestion(key, sorted(self._read))
            for key in self._values
            if key not in self._read
        ]


def _amqp_name(section: _Section, key: str, default: str) -> str:
    """An exchange name or routing key: an AMQP short string, at most 255 bytes."""
    value = section.nonempty(key, default)
    if len(value.encode("utf-8")) > _MAX_AMQP_NAME:
        raise section.error(key, f"longer than {_MAX_AMQP_NAME} bytes, which AMQP refuses")
    return value


def _within(number: float, minimum: float, strict: bool, maximum: float | None) -> bool:
    if not math.isfinite(number) or number < minimum or (strict and number == minimum):
        return False
    return maximum is None or number <= maximum


def _bounds(minimum: float, strict: bool, maximum: float | None) -> str:
    low = f"a number {'>' if strict else '>='} {minimum:g}"
    return f"{low} and <= {maximum:g}" if maximum is not None else low


# ---------------------------------------------------------------------------------------
# [rbit]


def _worker(section: _Section) -> WorkerSettings:
    name = section.text("name", required=True)
    if not name:
        raise section.error("name", "must not be empty")
    return WorkerSettings(
        name=name,
        distribution=section.text("distribution", ""),
        architecture=section.text("architecture", ""),
        suites=section.listing("suites"),
        format=section.text("format", ""),
        polling_time=section.number("polling_time", 60.0, maximum=MAX_POLL_TIME),
        mode=section.choice("mode", "consume", ("consume", "poll")),
        concurrency=section.integer("concurrency", 1, 1, MAX_CONCURRENCY),
        prefetch=section.integer("prefetch", None, 1, MAX_PREFETCH),
        shutdown_grace=section.number(
            "shutdown_grace", 30.0, strict=False, maximum=MAX_LONG_DURATION),
        exchange=_amqp_name(section, "exchange", "pybit"),
        queue_type=section.choice("queue_type", "classic", _QUEUE_TYPES),
        quorum_group_size=section.integer("quorum_group_size", None, 1, MAX_GROUP_SIZE),
        consumer_timeout=section.number("consumer_timeout", None, maximum=MAX_LONG_DURATION),
        jsonpickle_classes=section.class_names("jsonpickle_classes"),
        pybit_commands=_pybit_commands(section),
        machine_id=_machine_id(section),
    )


def _machine_id(section: _Section) -> str:
    value = section.text("machine_id")
    if value is None:
        return default_machine_id()
    problem = check_machine_id(value)
    if problem is not None:
        raise section.error("machine_id", problem)
    return value


def _pybit_commands(section: _Section) -> bool:
    """``pybit_commands``: on by default when the exchange is PyBit's ``pybit``."""
    default = (section.text("exchange", "pybit") or "pybit") == "pybit"
    return section.boolean("pybit_commands", default)


# ---------------------------------------------------------------------------------------
# [http]


def _schedules(sections: list[_Section], runners: Sequence[RunnerSettings],
               exchange: str) -> tuple[ScheduleSettings, ...]:
    if not sections:
        return ()
    # Imported here: a file without schedules loads none of their code.
    from rbit.schedule.settings import parse_schedule
    return tuple(parse_schedule(section, runners, exchange) for section in sections)


def _http(section: _Section) -> HttpSettings | None:
    """``bind = HOST:PORT`` (no bind: off) and an optional bearer ``token``."""
    token = section.text("token")
    bind = section.text("bind")
    if bind is None or not bind.strip():
        return None
    host, colon, port_text = bind.strip().rpartition(":")
    host = host.strip("[]")  # [::1]:9100
    if not colon or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise section.error("bind", f"expected HOST:PORT (port 0-65535), got {bind!r}")
    if token is not None and not token.strip():
        raise section.error("token", "must not be empty (leave the key out for no token)")
    return HttpSettings(host=host, port=int(port_text), token=token)


# ---------------------------------------------------------------------------------------
# [amqp]

_AMQP_PORT, _AMQPS_PORT = 5672, 5671


@dataclass
class _UrlParts:
    """What a list of amqp(s):// URLs says, merged."""

    tls: bool
    hosts: list[tuple[str, int | None]]
    user: str | None = None
    password: str | None = None
    virtual_host: str | None = None


def _amqp(section: _Section) -> AmqpSettings:
    url = section.text("url")
    if url is not None and section.has("host"):
        raise section.error("url", "give either url or host, not both")
    if url is not None and section.has("port"):
        raise section.error("url", "give the port inside url, not as a separate key")
    parts = _parse_urls(section, url) if url is not None else None
    tls = _amqp_tls(section, parts)
    default_port = section.integer("port", _AMQPS_PORT if tls else _AMQP_PORT, 1, 65535)
    hosts = parts.hosts if parts else _parse_hosts(section, section.nonempty("host", "localhost"))
    return AmqpSettings(
        hosts=tuple(HostAddress(host, port or default_port) for host, port in hosts),
        user=_from_url_or_key(section, parts, "user", "guest"),
        password=_from_url_or_key(section, parts, "password", "guest"),
        virtual_host=_virtual_host(section, parts),
        heartbeat=section.integer("heartbeat", 60, 0, MAX_HEARTBEAT),
        tls=tls,
        tls_ca_file=section.text("tls_ca_file"),
        tls_cert_file=section.text("tls_cert_file"),
        tls_key_file=section.text("tls_key_file"),
        tls_verify=section.boolean("tls_verify", True),
        connect_timeout=section.number("connect_timeout", 10.0, maximum=MAX_SHORT_DURATION),
        reconnect_delay=section.number("reconnect_delay", 1.0, maximum=MAX_SHORT_DURATION),
        reconnect_max_delay=section.number(
            "reconnect_max_delay", 30.0, maximum=MAX_SHORT_DURATION),
    )


def _amqp_tls(section: _Section, parts: _UrlParts | None) -> bool:
    from_url = bool(parts and parts.tls)
    tls = section.boolean("tls", from_url)
    if from_url and not tls:
        raise section.error("tls", "url uses amqps:// but tls is off")
    return tls


def _from_url_or_key(section: _Section, parts: _UrlParts | None, key: str, default: str) -> str:
    from_url = getattr(parts, key) if parts else None
    from_key = section.text(key)
    if from_url is not None and from_key is not None:
        raise section.error(key, f"{key} is given both in url and as a key")
    value = from_url if from_url is not None else from_key
    return default if value is None else value


def _virtual_host(section: _Section, parts: _UrlParts | None) -> str:
    alias = section.text("vhost")
    key = section.text("virtual_host")
    if alias is not None and key is not None:
        raise section.error("vhost", "vhost is an alias of virtual_host; give only one")
    from_key = key if key is not None else alias
    from_url = parts.virtual_host if parts else None
    if from_url is not None and from_key is not None:
        raise section.error("virtual_host", "virtual_host is given both in url and as a key")
    value = from_url if from_url is not None else from_key
    return value or "/"


def _parse_urls(section: _Section, text: str) -> _UrlParts:
    urls = [item for item in re.split(r"[,\s]+", text) if item]
    if not urls:
        raise section.error("url", "must not be empty")
    parsed = [_parse_url(section, url, index) for index, url in enumerate(urls, 1)]
    merged = _UrlParts(tls=parsed[0].tls, hosts=[])
    for part in parsed:
        merged.hosts.extend(part.hosts)
        if part.tls != merged.tls:
            raise section.error("url", "all urls must use the same scheme (amqp or amqps)")
        for attr in ("user", "password", "virtual_host"):
            _merge_url_field(section, merged, part, attr)
    return merged


def _merge_url_field(section: _Section, merged: _UrlParts, part: _UrlParts, attr: str) -> None:
    value = getattr(part, attr)
    if value is None:
        return
    if getattr(merged, attr) not in (None, value):
        raise section.error("url", f"the urls disagree on the {attr.replace('_', ' ')}")
    setattr(merged, attr, value)


def _parse_url(section: _Section, url: str, index: int) -> _UrlParts:
    # The url may carry a password: reasons name the url by position, never by text.
    def bad(reason: str) -> ConfigError:
        return section.error("url", f"url #{index}: {reason}")

    split = urllib.parse.urlsplit(url)
    if split.scheme.lower() not in ("amqp", "amqps"):
        raise bad("expected an amqp:// or amqps:// url")
    if split.query or split.fragment:
        raise bad("query parameters are not supported; use the [amqp] keys instead")
    try:
        port = split.port
    except ValueError:
        raise bad("the port is not a number between 0 and 65535") from None
    if not split.hostname:
        raise bad("the url names no host")
    return _UrlParts(
        tls=split.scheme.lower() == "amqps",
        hosts=[(split.hostname, port)],
        user=_unquote(split.username),
        password=_unquote(split.password),
        # An empty path or a lone "/" means "not given": the default vhost is "/".
        virtual_host=_unquote(split.path[1:]) if split.path not in ("", "/") else None,
    )


def _unquote(text: str | None) -> str | None:
    return None if text is None else urllib.parse.unquote(text)


def _parse_hosts(section: _Section, text: str) -> list[tuple[str, int | None]]:
    hosts = [_parse_host(section, item.strip()) for item in text.split(",") if item.strip()]
    if not hosts:
        raise section.error("host", "must not be empty")
    return hosts


def _parse_host(section: _Section, item: str) -> tuple[str, int | None]:
    match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\s\[\]]+)(?::(\d+))?", item)
    if not match:
        raise section.error("host", f"expected host or host:port, got {item!r}")
    host = match.group(1) or match.group(3)
    port_text = match.group(2) or match.group(4)
    port = int(port_text) if port_text else None
    if port is not None and not 1 <= port <= 65535:
        raise section.error("host", f"expected a port number 1-65535 in {item!r}")
    return host, port


# ---------------------------------------------------------------------------------------
# [status]


def _status(section: _Section) -> StatusSettings:
    sinks = _sinks(section)
    http_url = section.text("http_url")
    if "http" in sinks and not http_url:
        raise section.error("http_url", "required when the http sink is chosen")
    if http_url:
        _check_http_url(section, http_url)
    return StatusSettings(
        sinks=sinks,
        exchange=_amqp_name(section, "exchange", "rbit.status"),
        routing_key=_routing_template(section),
        http_url=http_url or None,
        http_user=section.text("http_user"),
        http_password=section.text("http_password"),
        http_timeout=section.number("http_timeout", 10.0, maximum=MAX_SHORT_DURATION),
        retry_max_delay=section.number("retry_max_delay", 60.0, maximum=MAX_SHORT_DURATION),
        max_pending=section.integer("max_pending", 100_000, 1, MAX_PENDING),
    )


def _sinks(section: _Section) -> tuple[str, ...]:
    sinks = section.listing("sinks", ("log",))
    for sink in sinks:
        if sink.lower() not in _SINKS:
            raise section.error("sinks", f"expected a list of {', '.join(_SINKS)}, got {sink!r}")
    return tuple(dict.fromkeys(sink.lower() for sink in sinks))


def _check_http_url(section: _Section, url: str) -> None:
    split = urllib.parse.urlsplit(url)
    if split.scheme.lower() not in ("http", "https") or not split.hostname:
        raise section.error("http_url", "expected an http:// or https:// url with a host")


def _routing_template(section: _Section) -> str:
    template = section.nonempty("routing_key", "{queue}.{status}")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise section.error("routing_key", f"malformed template: {exc}") from None
    unknown = fields - _STATUS_FIELDS
    if unknown:
        raise section.error(
            "routing_key",
            f"unknown placeholder {{{sorted(unknown)[0]}}}; use {{queue}}, {{status}}, "
            "{job_id} or {worker}",
        )
    return template


# ---------------------------------------------------------------------------------------
# [runner:<queue>]

_RUNNER_KEYS = frozenset({
    "runner", "routing_key", "concurrency", "prefetch", "timeout", "python", "queue_type",
    "delivery_limit", "quorum_group_size", "max_retries", "retry_delay", "retry_backoff",
    "retry_max_delay", "retry_jitter", "jsonpickle_classes", "max_jobs_per_child",
    "max_memory_per_child", "require_signed",
})


# Keys rbit reads that stay among the runner's settings (the supervisor reads them too,
# a bundled runner may read credit_queue).
_RUNNER_SETTINGS_READ = frozenset({"kill_grace", *PRICING_KEYS})
_TYPO_CANDIDATES = sorted(_RUNNER_KEYS | _RUNNER_SETTINGS_READ)

#: How alike an unknown runner key must be to a known one to be reported as a typo.
_TYPO_CUTOFF = 0.8


def _runner(section: _Section, worker: WorkerSettings, warnings: list[str]) -> RunnerSettings:
    queue = _queue_name(section)
    spec = section.text("runner", required=True)
    kind, target = _runner_spec(section, spec)
    concurrency = section.integer("concurrency", worker.concurrency, 1, MAX_CONCURRENCY)
    prefetch = _prefetch(section, worker, concurrency, warnings)
    queue_type = section.choice("queue_type", worker.queue_type, _QUEUE_TYPES)
    delivery_limit = section.integer("delivery_limit", None, 1, MAX_DELIVERY_LIMIT)
    group_size = section.integer("quorum_group_size", worker.quorum_group_size, 1,
                                 MAX_GROUP_SIZE)
    # Read by the process supervisor, and left among the runner's settings: checked here
    # so that its error names the file like every other one.
    section.number("kill_grace", None, strict=False, maximum=MAX_SHORT_DURATION)
    if delivery_limit is not None and queue_type != "quorum":
        warnings.append(
            f"file {section.file}, section [{section.name}], key 'delivery_limit': "
            "only quorum queues honour it; ignored for a classic queue"
        )
    if section.has("quorum_group_size") and queue_type != "quorum":
        warnings.append(
            f"file {section.file}, section [{section.name}], key 'quorum_group_size': "
            "only quorum queues are replicated; ignored for a classic queue"
        )
    return RunnerSettings(
        queue=queue,
        runner=spec,
        kind=kind,
        target=target,
        routing_key=_amqp_name(section, "routing_key", default_routing_key(queue)),
        concurrency=concurrency,
        prefetch=prefetch,
        prefetch_set=section.has("prefetch") or worker.prefetch is not None,
        timeout=section.number("timeout", None, maximum=MAX_LONG_DURATION),
        python=_python(section, kind),
        max_jobs_per_child=_child_limit(section, kind, "max_jobs_per_child", warnings),
        max_memory_per_child=_child_limit(section, kind, "max_memory_per_child", warnings),
        queue_type=queue_type,
        delivery_limit=delivery_limit,
        quorum_group_size=group_size if queue_type == "quorum" else None,
        retry=_retry(section),
        allowed_classes=_allowed_classes(section, worker),
        settings=_runner_options(section, warnings),
        require_signed=section.boolean("require_signed", None),  # type: ignore[arg-type]
        file=section.file,
        section=section.name,
        pricing=_pricing(section, worker),
    )


def _pricing(section: _Section, worker: WorkerSettings) -> Pricing | None:
    # The keys stay among the runner's settings: a bundled runner may read
    # credit_queue itself (rbitext.usagebilling).
    values = {key: section.raw(key) or "" for key in section.keys()  # noqa: SIM118
              if key.startswith("credit")}
    return parse_pricing(values, file=section.file, section=section.name,
                         machine_id=worker.machine_id, queue_type=worker.queue_type,
                         group_size=worker.quorum_group_size)


def _prefetch(section: _Section, worker: WorkerSettings, concurrency: int,
              warnings: list[str]) -> int:
    """The section's prefetch: as written, else [rbit]'s, else ``concurrency``.

    A section that sets ``batch_size`` (a batching runner's key) takes at least a whole
    batch ahead by default: with less, every batch would be cut at the prefetch.
    """
    prefetch = section.integer("prefetch", worker.prefetch or concurrency, 1, MAX_PREFETCH)
    batch = _batch_size(section)
    if batch is None or batch <= prefetch:
        return prefetch
    if section.has("prefetch") or worker.prefetch is not None:
        warnings.append(
            f"file {section.file}, section [{section.name}], key 'prefetch': {prefetch} is "
            f"below batch_size ({batch}), so no batch can hold more than {prefetch} events"
        )
        return prefetch
    return min(batch, MAX_PREFETCH)


def _batch_size(section: _Section) -> int | None:
    # The runner's own key (it stays in its settings); rbit only looks at it.
    try:
        return int(section.raw("batch_size") or "")
    except ValueError:
        return None  # absent, or a bad value the runner reports itself


def _allowed_classes(section: _Section, worker: WorkerSettings) -> frozenset[str]:
    return frozenset(worker.jsonpickle_classes + section.class_names("jsonpickle_classes"))


def _runner_options(section: _Section, warnings: list[str]) -> RunnerOptions:
    # Everything rbit does not read itself belongs to the runner, verbatim (interpolated);
    # a key one typo away from one of rbit's own is most likely that key, misspelt.
    options = RunnerOptions()
    for key in section.keys():  # noqa: SIM118 - _Section, not a dict
        if key in _RUNNER_KEYS:
            continue
        options[key] = section.raw(key) or ""
        if key in _RUNNER_SETTINGS_READ:
            continue
        import difflib  # only for a key rbit does not read
        close = difflib.get_close_matches(key, _TYPO_CANDIDATES, n=1, cutoff=_TYPO_CUTOFF)
        if close:
            warnings.append(
                f"file {section.file}, section [{section.name}], key {key!r}: not a key rbit "
                f"reads (did you mean {close[0]!r}?); handed to the runner as a setting"
            )
    return options


def default_routing_key(queue: str) -> str:
    """The routing key a queue is bound with when its section sets none.

    A PyBit queue name ``dist_arch_suite_format`` (exactly four non-empty parts) maps to
    PyBit's dotted route ``dist.arch.suite.format``; any other name routes as itself.
    """
    parts = queue.split("_")
    if len(parts) == 4 and all(parts):
        return ".".join(parts)
    return queue


def _check_unique_queues(path: str, runners: Sequence[RunnerSettings]) -> None:
    # "[runner:q]" and "[runner: q]" are different sections but the same queue.
    seen: set[str] = set()
    for runner in runners:
        if runner.queue in seen:
            raise ConfigError(
                f"queue {runner.queue!r} has more than one runner section",
                file=path,
                section=f"{_RUNNER_PREFIX}{runner.queue}",
            )
        seen.add(runner.queue)


def _queue_name(section: _Section) -> str:
    queue = section.name[len(_RUNNER_PREFIX):].strip()
    where = {"file": section.file, "section": section.name}
    if not queue:
        raise ConfigError("the queue name after 'runner:' is empty", **where)
    if queue.startswith(_RESERVED_PREFIX):
        raise ConfigError(
            "queue names starting with 'amq.' are reserved by RabbitMQ, which refuses to "
            "declare them; choose another name", **where)
    if len(queue.encode("utf-8")) > MAX_QUEUE_NAME:
        # AMQP names are at most 255 bytes, and rbit derives longer ones from this one.
        raise ConfigError(
            f"the queue name is longer than {MAX_QUEUE_NAME} bytes: rbit's delay queues "
            f"('<queue>{_LONGEST_SUFFIX}') must fit in AMQP's 255", **where)
    if any(not char.isprintable() for char in queue):
        raise ConfigError("the queue name contains control characters", **where)
    return queue


def _runner_spec(section: _Section, spec: str) -> tuple[str, str]:
    kind, bang, target = spec.partition("!")
    kind, target = kind.strip().lower(), target.strip()
    # The value is not echoed whole: a shell command may carry a secret.
    if not bang:
        raise section.error("runner", "expected python!pkg.module:func or shell!command")
    if kind not in ("python", "shell"):
        raise section.error("runner", f"unknown runner kind {kind!r}; expected python! or shell!")
    if kind == "python" and not _PYTHON_TARGET.fullmatch(target):
        reason = f"expected python!pkg.module:func or python!pkg.module:Class, got {spec!r}"
        raise section.error("runner", reason)
    if kind == "shell":
        _check_shell_template(section, target)
    return kind, target


def _check_shell_template(section: _Section, template: str) -> None:
    try:
        words = shlex.split(template)
    except ValueError as exc:
        raise section.error("runner", f"cannot split the shell command: {exc}") from None
    if not words:
        raise section.error("runner", "the shell command is empty")


_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def _child_limit(section: _Section, kind: str, key: str, warnings: list[str]) -> int | None:
    """``max_jobs_per_child`` (an integer) or ``max_memory_per_child`` (a size)."""
    if not section.has(key):
        return None
    if kind != "python":
        raise section.error(key, "only python! runners run in child processes")
    limit = section.integer(key, None, 1) if key == "max_jobs_per_child" else _size(section, key)
    if not section.has("python") and not section.has("timeout"):
        warnings.append(
            f"file {section.file}, section [{section.name}], key {key!r}: jobs run in this "
            "process unless python or timeout is set; ignored"
        )
    return limit


def _size(section: _Section, key: str) -> int:
    """A size in bytes: ``512M``, ``2G``, ``300000K`` or a plain number of bytes."""
    value = section.text(key) or ""
    match = re.fullmatch(r"(\d+)\s*([kmg]?)(?:i?b)?", value.strip().lower())
    if not match or int(match.group(1)) < 1:
        raise section.error(
            key, f"expected a size such as 512M, 2G or 300000K, got {section.shown(key, value)}"
        )
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def _python(section: _Section, kind: str) -> str | None:
    python = section.text("python")
    if python is None:
        return None
    if kind != "python":
        raise section.error("python", "only python! runners take an interpreter")
    if not python:
        raise section.error("python", "must not be empty")
    return python


def _retry(section: _Section) -> RetryPolicy:
    policy = RetryPolicy(
        max_retries=section.integer("max_retries", 3, 0, MAX_RETRIES),
        retry_delay=section.number(
            "retry_delay", 10.0, strict=False, maximum=MAX_LONG_DURATION),
        backoff=section.number("retry_backoff", 2.0, 1.0, strict=False, maximum=MAX_BACKOFF),
        max_delay=section.number(
            "retry_max_delay", 3600.0, strict=False, maximum=MAX_LONG_DURATION),
        jitter=section.number("retry_jitter", 0.1, strict=False, maximum=1.0),
    )
    count = _delay_count(policy)
    if count > MAX_DELAY_QUEUES:
        raise section.error(
            "retry_backoff",
            f"these retry settings need {count} delay queues (one per distinct delay), more "
            f"than {MAX_DELAY_QUEUES}; raise retry_backoff or lower retry_max_delay or "
            "max_retries",
        )
    return policy


def _delay_count(policy: RetryPolicy) -> int:
    """How many distinct delays (so delay queues) ``policy`` has, counted up to the cap."""
    delays: set[int] = set()
    for attempt in range(1, policy.max_retries + 1):
        delay = backoff.step(attempt, policy.retry_delay, policy.max_delay, policy.backoff)
        delays.add(int(delay * 1000))
        if delay >= policy.max_delay or len(delays) > MAX_DELAY_QUEUES:
            break  # every later delay is the cap, or there are too many already
    return len(delays)


# ---------------------------------------------------------------------------------------
# [control] and the state directory ([rbit] state_dir, history_depth)


@dataclass(frozen=True)
class ControlSettings:
    """The ``[control]`` section: who may send ``rbit ctl`` commands to this worker."""

    enabled: bool = True
    #: AMQP users whose commands are obeyed (matched against the validated ``user_id``).
    users: tuple[str, ...] = ("guest",)
    #: Directory of operator public keys (*.pub): when set, a command must also carry a
    #: valid signature by one of them (rbit.control.authority).
    trusted_keys: str | None = None
    #: The key ``rbit ctl`` signs commands with (None: ``[security] signing_key``).
    signing_key: str | None = None
    #: Seconds a signed command's time may be off from the worker's clock.
    max_skew: float = 60.0


@dataclass(frozen=True)
class StateSettings:
    """Where a worker keeps what survives a restart (history, paused queues)."""

    state_dir: str = ""
    history_depth: int = 100  # outcomes kept per queue; 0: no history


def default_state_dir(name: str, environ: Mapping[str, str], *, is_root: bool,
                      home: str) -> str:
    """The state directory when ``[rbit] state_dir`` is not set.

    ``$STATE_DIRECTORY`` (set by systemd's ``StateDirectory=``; its first entry), else
    ``/var/lib/rbit/<name>`` for root, else ``~/.local/state/rbit/<name>``.
    """
    given = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if given:
        return given
    if is_root:
        return os.path.join("/var/lib/rbit", name)
    return os.path.join(home, ".local", "state", "rbit", name)


def _control_and_state(readers: Mapping[str, _Section], worker: WorkerSettings,
                       amqp: AmqpSettings, environ: Mapping[str, str],
                       ) -> tuple[ControlSettings, StateSettings]:
    rbit = readers["rbit"]
    state_dir = rbit.text("state_dir") or default_state_dir(
        worker.name, environ, is_root=os.geteuid() == 0, home=os.path.expanduser("~"))
    if not os.path.isabs(state_dir):
        raise rbit.error("state_dir", f"expected an absolute path, got {state_dir!r}")
    depth = rbit.integer("history_depth", 100, 0)
    if depth > 100_000:
        raise rbit.error("history_depth", f"expected an integer <= 100000, got {depth}")
    state = StateSettings(state_dir=state_dir, history_depth=depth)
    section = readers.get("control")
    if section is None:
        return ControlSettings(users=(amqp.user,)), state
    users = section.listing("users", (amqp.user,))
    if not users:
        raise section.error("users", "must name at least one AMQP user")
    return ControlSettings(enabled=section.boolean("enabled", True), users=users,
                           trusted_keys=section.text("trusted_keys") or None,
                           signing_key=section.text("signing_key") or None,
                           max_skew=section.number("max_skew", 60.0, maximum=MAX_SKEW)), state
# [security]

#: The largest max_skew: a replay record is kept this long at most.
MAX_SKEW = 7 * 24 * 3600.0


def parse_security(section: _Section | None, name: str,
                   environ: Mapping[str, str]) -> SecuritySettings:
    """The ``[security]`` section (defaults when there is none).

    Keys are checked for form here; whether the key files are usable is checked where
    they are loaded (:mod:`rbit.security.keys`), with the same file, section and key.
    """
    if section is None:
        return SecuritySettings()
    home = environ.get("HOME") or os.path.expanduser("~")
    state = environ.get("XDG_STATE_HOME") or os.path.join(home, ".local", "state")
    default_replay = os.path.join(state, "rbit", f"{name}.replay.sqlite")
    return SecuritySettings(
        signing_key=section.text("signing_key") or None,
        trusted_keys=section.text("trusted_keys") or None,
        require_signed=section.boolean("require_signed", False),
        max_skew=section.number("max_skew", 300.0, maximum=MAX_SKEW),
        replay_file=section.nonempty("replay_file", default_replay),
    )
