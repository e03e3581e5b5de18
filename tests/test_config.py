"""Tests for rbit.config: loading, interpolation, validation, warnings and defaults."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from rbit.config import (
    HostAddress,
    Settings,
    default_routing_key,
    load_config,
    parse_bool,
)
from rbit.errors import ConfigError
from rbit.topology import delay_queue, policy_delays_ms

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"

MINIMAL = """
[rbit]
name = box1

[amqp]
host = localhost
"""

SECRET = "s3cr3t-Pa55"


def write(tmp_path: Path, text: str, name: str = "rbit.ini") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> Settings:
    return load_config(write(tmp_path, text), environ=environ or {})


def load_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, environ)
    return info.value


def runner_section(body: str, queue: str = "cnx_any_latex_pdf") -> str:
    return MINIMAL + f"\n[runner:{queue}]\n" + textwrap.dedent(body)


# --- files ------------------------------------------------------------------------------


def test_the_original_clients_sample_config_loads_without_warnings() -> None:
    settings = load_config(str(DATA / "rbit-client-sample.ini"), environ={})

    assert settings.warnings == ()
    assert settings.worker.name == "bob-villa"
    assert settings.worker.suites == ("latex", "princexml")
    assert settings.worker.polling_time == 60.0
    assert settings.amqp.hosts == (HostAddress("localhost", 5672),)
    runners = {runner.queue: runner for runner in settings.runners}
    assert runners["cnx_desktop_princexml_epub"].kind == "shell"
    assert runners["cnx_desktop_princexml_epub"].target == "%ID.pdf"
    printing = runners["cnx_any_latex_pdf"]
    assert printing.kind == "python"
    assert printing.target == "rbitext.rhaptos_print:make_print"
    assert printing.python == "/usr/local/bin/python2.4"
    assert printing.settings == {
        "print-dir": "Products.RhaptosPrint/Products/RhaptosPrint/printing",
        "host": "http://cnx.org",
    }
    assert runners["ccap_any_latex_completezip"].settings == {"name": "World"}


def test_a_runner_sections_host_key_does_not_touch_amqp(tmp_path: Path) -> None:
    settings = load(tmp_path, runner_section("runner = shell!true\nhost = http://cnx.org\n"))

    assert settings.amqp.hosts == (HostAddress("localhost", 5672),)
    assert settings.runners[0].settings == {"host": "http://cnx.org"}


def test_logging_sections_are_tolerated_silently_and_reported(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        MINIMAL
        + textwrap.dedent("""
        [loggers]
        keys = root
        [handlers]
        keys = h
        [formatters]
        keys = f
        [logger_root]
        handlers = h
        [handler_h]
        class = StreamHandler
        [formatter_f]
        format = %(message)s ${NOT_INTERPOLATED}
        """),
    )

    assert settings.warnings == ()
    assert settings.logging_sections == (
        "loggers", "handlers", "formatters", "logger_root", "handler_h", "formatter_f",
    )


def test_a_missing_file_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.ini")

    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})

    assert info.value.file == path
    assert path in str(info.value)
    assert "cannot read" in info.value.reason


def test_a_duplicate_key_is_an_error_naming_file_and_line(tmp_path: Path) -> None:
    error = load_error(tmp_path, MINIMAL + f"password = {SECRET}\npassword = {SECRET}\n")

    assert error.file.endswith("rbit.ini")
    assert "line 8" in str(error)
    assert "duplicate key 'password'" in str(error)
    assert SECRET not in str(error)


def test_a_duplicate_section_is_an_error_naming_the_section(tmp_path: Path) -> None:
    error = load_error(tmp_path, MINIMAL + "[rbit]\nname = again\n")

    assert "duplicate section [rbit]" in str(error)
    assert "line" in str(error)


def test_a_key_before_any_section_is_an_error_without_echoing_the_line(tmp_path: Path) -> None:
    error = load_error(tmp_path, f"password = {SECRET}\n" + MINIMAL)

    assert "line 1" in str(error)
    assert SECRET not in str(error)


def test_a_line_that_is_not_key_value_is_an_error_naming_its_line(tmp_path: Path) -> None:
    error = load_error(tmp_path, MINIMAL + "this is not a key\n")

    assert "line(s) 7" in str(error)


@pytest.mark.parametrize("section", ["rbit", "amqp"])
def test_a_missing_required_section_is_an_error(tmp_path: Path, section: str) -> None:
    text = "[rbit]\nname = x\n" if section == "amqp" else "[amqp]\nhost = h\n"

    error = load_error(tmp_path, text)

    assert error.section == section
    assert "required section is missing" in str(error)


def test_a_missing_name_is_an_error_naming_the_key(tmp_path: Path) -> None:
    error = load_error(tmp_path, "[rbit]\nsuites = a\n[amqp]\n")

    assert (error.section, error.key) == ("rbit", "name")
    assert "required key is missing" in str(error)


# --- types and error messages -----------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "reason"),
    [
        ("rbit", "concurrency", "abc", "expected an integer >= 1 and <= 1000, got 'abc'"),
        ("rbit", "concurrency", "0", "expected an integer >= 1 and <= 1000, got '0'"),
        ("rbit", "prefetch", "1.5", "expected an integer >= 1 and <= 65535, got '1.5'"),
        ("rbit", "polling_time", "0", "expected a number > 0 and <= 86400, got '0'"),
        ("rbit", "polling_time", "soon", "expected a number > 0 and <= 86400, got 'soon'"),
        ("rbit", "shutdown_grace", "-1", "expected a number >= 0 and <= 1.2096e+06, got '-1'"),
        ("rbit", "mode", "push", "expected one of consume, poll, got 'push'"),
        ("rbit", "queue_type", "stream", "expected one of classic, quorum, got 'stream'"),
        ("rbit", "consumer_timeout", "inf", "expected a number > 0 and <= 1.2096e+06, got 'inf'"),
        ("rbit", "jsonpickle_classes", "Build Request", "expected dotted class names"),
        ("amqp", "heartbeat", "often", "expected an integer >= 0 and <= 65535, got 'often'"),
        ("amqp", "port", "70000", "expected an integer >= 1 and <= 65535, got '70000'"),
        ("amqp", "tls", "maybe", "expected yes/no, true/false, on/off or 1/0, got 'maybe'"),
        ("amqp", "connect_timeout", "nan", "expected a number > 0 and <= 3600, got 'nan'"),
    ],
)
def test_a_wrong_type_is_an_error_naming_file_section_key_and_reason(
    tmp_path: Path, section: str, key: str, value: str, reason: str
) -> None:
    sections = {"rbit": "name = box\n", "amqp": ""}
    sections[section] += f"{key} = {value}\n"
    path = write(tmp_path, "".join(f"[{name}]\n{body}" for name, body in sections.items()))

    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})

    error = info.value
    assert (error.file, error.section, error.key) == (path, section, key)
    assert reason in error.reason
    assert path in str(error)
    assert f"[{section}]" in str(error)
    assert repr(key) in str(error)


@pytest.mark.parametrize(
    ("word", "expected"),
    [("yes", True), ("TRUE", True), ("on", True), ("1", True),
     ("no", False), ("False", False), ("off", False), ("0", False)],
)
def test_booleans_accept_the_usual_ini_words(tmp_path: Path, word: str, expected: bool) -> None:
    settings = load(tmp_path, MINIMAL + f"tls_verify = {word}\n")

    assert settings.amqp.tls_verify is expected
    assert parse_bool(word) is expected


def test_an_invalid_password_type_error_never_shows_the_value(tmp_path: Path) -> None:
    error = load_error(
        tmp_path, MINIMAL + f"[status]\nsinks = http\nhttp_url = {SECRET}\n"
    )

    assert (error.section, error.key) == ("status", "http_url")
    assert SECRET not in str(error)


# --- warnings ---------------------------------------------------------------------------


def test_an_unknown_section_is_warned_about_by_name(tmp_path: Path) -> None:
    settings = load(tmp_path, MINIMAL + "[amqq]\nhost = x\n[runners:q]\nrunner = shell!x\n")

    assert len(settings.warnings) == 2
    assert "section [amqq]: unknown section" in settings.warnings[0]
    assert "did you mean 'amqp'" in settings.warnings[0]
    assert "section [runners:q]" in settings.warnings[1]


@pytest.mark.parametrize("section", ["rbit", "amqp", "status"])
def test_an_unknown_key_is_warned_about_by_section_and_name(tmp_path: Path, section: str) -> None:
    text = MINIMAL + ("[status]\n" if section == "status" else "")
    text = text.replace(f"[{section}]\n", f"[{section}]\nconcurency = {SECRET}\n")

    settings = load(tmp_path, text)

    assert len(settings.warnings) == 1
    warning = settings.warnings[0]
    assert f"section [{section}], key 'concurency': unknown key" in warning
    assert "rbit.ini" in warning
    assert SECRET not in warning


def test_an_unknown_rbit_key_warning_suggests_the_close_match(tmp_path: Path) -> None:
    settings = load(tmp_path, MINIMAL.replace("name = box1", "name = b\nconcurency = 4"))

    assert "did you mean 'concurrency'" in settings.warnings[0]


def test_runner_keys_rbit_does_not_know_go_to_the_runner_without_warning(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        runner_section("runner = python!pkg.mod:func\nName = World\nbatch_size = 10\n"),
    )

    assert settings.warnings == ()
    # configparser lower-cases keys, as the original client's parser did.
    assert settings.runners[0].settings == {"name": "World", "batch_size": "10"}


def test_delivery_limit_on_a_classic_queue_is_warned_about(tmp_path: Path) -> None:
    settings = load(tmp_path, runner_section("runner = shell!true\ndelivery_limit = 5\n"))

    assert settings.runners[0].delivery_limit == 5
    assert len(settings.warnings) == 1
    assert "key 'delivery_limit'" in settings.warnings[0]
    assert "classic" in settings.warnings[0]


def test_delivery_limit_on_a_quorum_queue_is_fine(tmp_path: Path) -> None:
    settings = load(
        tmp_path, runner_section("runner = shell!true\nqueue_type = quorum\ndelivery_limit = 5\n")
    )

    assert settings.warnings == ()
    assert settings.runners[0].queue_type == "quorum"


# --- environment interpolation ----------------------------------------------------------


def test_env_references_are_replaced_from_the_given_environment(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        MINIMAL + "user = ${RBIT_USER}\npassword = ${RBIT_PASSWORD}\n"
        + "[runner:q]\nrunner = shell!echo ${GREETING}-$${HOME} $HOME\n",
        {"RBIT_USER": "rbit", "RBIT_PASSWORD": SECRET, "GREETING": "hi"},
    )

    assert settings.amqp.user == "rbit"
    assert settings.amqp.password == SECRET
    assert settings.runners[0].target == "echo hi-${HOME} $HOME"


def test_a_missing_env_variable_is_an_error_naming_it_and_the_key(tmp_path: Path) -> None:
    error = load_error(tmp_path, MINIMAL + "password = ${RBIT_AMQP_PASSWORD}\n", {"X": SECRET})

    assert (error.section, error.key) == ("amqp", "password")
    assert "RBIT_AMQP_PASSWORD is not set" in str(error)
    assert "rbit.ini" in str(error)


def test_a_missing_env_variable_in_a_runner_setting_is_an_error(tmp_path: Path) -> None:
    error = load_error(tmp_path, runner_section("runner = shell!true\napi_secret = ${S}\n"))

    assert (error.section, error.key) == ("runner:cnx_any_latex_pdf", "api_secret")
    assert "environment variable S is not set" in error.reason


@pytest.mark.parametrize("value", ["${}", "${1ABC}", "${OPEN"])
def test_a_malformed_env_reference_is_an_error(tmp_path: Path, value: str) -> None:
    error = load_error(tmp_path, MINIMAL + f"user = {value}\n")

    assert error.key == "user"
    assert "malformed ${NAME} reference" in error.reason


def test_the_process_environment_is_the_default(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RBIT_TEST_VHOST", "builds")
    path = write(tmp_path, MINIMAL + "virtual_host = ${RBIT_TEST_VHOST}\n")

    assert load_config(path).amqp.virtual_host == "builds"


# --- secrets ----------------------------------------------------------------------------


def test_secrets_never_appear_in_the_settings_repr(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        MINIMAL.replace("host = localhost", f"url = amqps://rbit:{SECRET}@mq/")
        + "[status]\nsinks = http\nhttp_url = https://front.example/\n"
        + f"http_password = {SECRET}\n"
        + "[runner:credits]\nrunner = python!rbitext.creditpiggy:CreditRunner\n"
        + f"api_secret = {SECRET}\napi_key = {SECRET}\nbatch_size = 10\n",
    )

    assert settings.amqp.password == SECRET
    assert settings.runners[0].settings["api_secret"] == SECRET
    assert SECRET not in repr(settings)
    assert "batch_size" in repr(settings)


def test_a_bad_url_error_never_shows_the_url(tmp_path: Path) -> None:
    text = MINIMAL.replace("host = localhost", f"url = http://u:{SECRET}@h/")

    error = load_error(tmp_path, text)

    assert error.key == "url"
    assert "url #1: expected an amqp:// or amqps:// url" in error.reason
    assert SECRET not in str(error)


# --- [amqp] -----------------------------------------------------------------------------


def test_amqp_defaults(tmp_path: Path) -> None:
    amqp = load(tmp_path, "[rbit]\nname = b\n[amqp]\n").amqp

    assert amqp.hosts == (HostAddress("localhost", 5672),)
    assert (amqp.user, amqp.password, amqp.virtual_host) == ("guest", "guest", "/")
    assert (amqp.heartbeat, amqp.tls, amqp.tls_verify) == (60, False, True)


def test_a_host_list_gives_failover_hosts_with_their_own_or_the_default_port(
    tmp_path: Path,
) -> None:
    amqp = load(
        tmp_path, MINIMAL.replace("localhost", "h1:5673, h2 ,[::1]:5674") + "port = 5700\n"
    ).amqp

    assert amqp.hosts == (
        HostAddress("h1", 5673), HostAddress("h2", 5700), HostAddress("::1", 5674),
    )


def test_tls_changes_the_default_port_to_5671(tmp_path: Path) -> None:
    amqp = load(tmp_path, MINIMAL + "tls = yes\ntls_ca_file = /etc/ca.pem\n").amqp

    assert amqp.tls is True
    assert amqp.hosts == (HostAddress("localhost", 5671),)
    assert amqp.tls_ca_file == "/etc/ca.pem"


def test_vhost_is_an_alias_of_virtual_host(tmp_path: Path) -> None:
    assert load(tmp_path, MINIMAL + "vhost = builds\n").amqp.virtual_host == "builds"


def test_a_url_gives_credentials_host_and_a_decoded_vhost(tmp_path: Path) -> None:
    amqp = load(
        tmp_path, MINIMAL.replace("host = localhost", "url = amqp://us%40er:p%3Ass@mq:5680/%2F")
    ).amqp

    assert amqp.hosts == (HostAddress("mq", 5680),)
    assert (amqp.user, amqp.password, amqp.virtual_host) == ("us@er", "p:ss", "/")
    assert amqp.tls is False


def test_a_list_of_urls_gives_failover_hosts(tmp_path: Path) -> None:
    amqp = load(
        tmp_path,
        MINIMAL.replace(
            "host = localhost", "url = amqps://u:p@mq1/builds, amqps://mq2:5999 amqps://mq3"
        ),
    ).amqp

    assert amqp.tls is True
    assert amqp.hosts == (
        HostAddress("mq1", 5671), HostAddress("mq2", 5999), HostAddress("mq3", 5671),
    )
    assert (amqp.user, amqp.password, amqp.virtual_host) == ("u", "p", "builds")


def test_a_password_key_fills_in_what_the_url_leaves_out(tmp_path: Path) -> None:
    amqp = load(
        tmp_path,
        MINIMAL.replace("host = localhost", "url = amqp://rbit@mq/\npassword = ${PW}"),
        {"PW": "p@ss/word"},
    ).amqp

    assert (amqp.user, amqp.password) == ("rbit", "p@ss/word")


@pytest.mark.parametrize(
    ("extra", "key", "reason"),
    [
        ("url = amqp://mq\nhost = mq", "url", "either url or host"),
        ("url = amqp://mq\nport = 5672", "url", "port inside url"),
        ("url = amqp://u:p@mq\npassword = x", "password", "both in url and as a key"),
        ("url = amqp://mq/a amqp://mq2/b", "url", "disagree on the virtual host"),
        ("url = amqp://mq, amqps://mq2", "url", "same scheme"),
        ("url = amqps://mq\ntls = no", "tls", "amqps:// but tls is off"),
        ("url = amqp://mq:99999", "url", "url #1: the port"),
        ("url = amqp://mq?heartbeat=5", "url", "query parameters are not supported"),
        ("url = amqp:///vhost", "url", "names no host"),
        ("vhost = a\nvirtual_host = b", "vhost", "alias of virtual_host"),
    ],
)
def test_inconsistent_amqp_settings_are_errors(
    tmp_path: Path, extra: str, key: str, reason: str
) -> None:
    error = load_error(tmp_path, "[rbit]\nname = b\n[amqp]\n" + extra + "\n")

    assert (error.section, error.key) == ("amqp", key)
    assert reason in error.reason


# --- [rbit] and [runner:*] defaults ------------------------------------------------------


def test_prefetch_follows_concurrency_unless_set(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        MINIMAL.replace("name = box1", "name = box1\nconcurrency = 3")
        + "[runner:a]\nrunner = shell!true\n"
        + "[runner:b]\nrunner = shell!true\nconcurrency = 5\n"
        + "[runner:c]\nrunner = shell!true\nconcurrency = 5\nprefetch = 8\n",
    )

    assert settings.worker.prefetch is None
    assert [(r.concurrency, r.prefetch) for r in settings.runners] == [(3, 3), (5, 5), (5, 8)]


def test_a_batching_sections_default_prefetch_is_its_batch_size(tmp_path: Path) -> None:
    settings = load(tmp_path, runner_section("runner = python!pkg.mod:Batcher\nbatch_size = 50\n"))

    assert settings.warnings == ()
    assert (settings.runners[0].prefetch, settings.runners[0].prefetch_set) == (50, False)


@pytest.mark.parametrize("where", ["runner", "rbit"])
def test_a_prefetch_set_below_batch_size_is_kept_and_warned_about(tmp_path: Path,
                                                                    where: str) -> None:
    text = runner_section("runner = python!pkg.mod:Batcher\nbatch_size = 50\n"
                          + ("prefetch = 10\n" if where == "runner" else ""))
    if where == "rbit":
        text = text.replace("name = box1", "name = box1\nprefetch = 10")

    settings = load(tmp_path, text)

    assert settings.runners[0].prefetch == 10
    assert len(settings.warnings) == 1
    assert "section [runner:cnx_any_latex_pdf], key 'prefetch'" in settings.warnings[0]
    assert "below batch_size (50)" in settings.warnings[0]


@pytest.mark.parametrize(("typo", "meant"), [
    ("concurency", "concurrency"), ("timout", "timeout"), ("max_retry", "max_retries"),
    ("retry_dely", "retry_delay"), ("prefech", "prefetch"),
])
def test_a_runner_key_one_typo_from_rbits_own_is_warned_about(tmp_path: Path, typo: str,
                                                                meant: str) -> None:
    settings = load(tmp_path, runner_section(f"runner = shell!true\n{typo} = {SECRET}\n"))

    assert len(settings.warnings) == 1
    warning = settings.warnings[0]
    assert f"section [runner:cnx_any_latex_pdf], key {typo!r}" in warning
    assert f"did you mean {meant!r}" in warning
    assert SECRET not in warning
    # Still handed over: the runner may read a key of that name on purpose.
    assert settings.runners[0].settings[typo] == SECRET


def test_a_worker_wide_prefetch_is_the_runners_default(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        MINIMAL.replace("name = box1", "name = box1\nprefetch = 4")
        + "[runner:a]\nrunner = shell!true\nconcurrency = 2\n",
    )

    assert (settings.runners[0].concurrency, settings.runners[0].prefetch) == (2, 4)


def test_worker_wide_queue_type_is_the_runners_default(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        MINIMAL.replace("name = box1", "name = box1\nqueue_type = quorum")
        + "[runner:a]\nrunner = shell!true\n"
        + "[runner:b]\nrunner = shell!true\nqueue_type = classic\n",
    )

    assert [r.queue_type for r in settings.runners] == ["quorum", "classic"]


@pytest.mark.parametrize(
    ("queue", "route"),
    [
        ("cnx_any_latex_pdf", "cnx.any.latex.pdf"),
        ("credits", "credits"),
        ("a_b_c", "a_b_c"),
        ("a_b_c_d_e", "a_b_c_d_e"),
        ("a__c_d", "a__c_d"),
    ],
)
def test_the_routing_key_is_derived_from_a_pybit_queue_name(
    tmp_path: Path, queue: str, route: str
) -> None:
    settings = load(tmp_path, runner_section("runner = shell!true\n", queue))

    assert settings.runners[0].routing_key == route
    assert default_routing_key(queue) == route


def test_an_explicit_routing_key_wins(tmp_path: Path) -> None:
    settings = load(tmp_path, runner_section("runner = shell!true\nrouting_key = jobs.#\n"))

    assert settings.runners[0].routing_key == "jobs.#"
    assert "routing_key" not in settings.runners[0].settings


def test_runner_retry_policy_and_other_rbit_keys_are_read_not_passed_on(tmp_path: Path) -> None:
    runner = load(
        tmp_path,
        runner_section(
            """\
            runner = python!pkg.mod:func
            python = /usr/bin/python3
            timeout = 90
            max_retries = 5
            retry_delay = 2
            retry_backoff = 3
            retry_max_delay = 60
            retry_jitter = 0
            jsonpickle_classes = pybit.models.BuildRequest, pybit.models.Job
            """
        ),
    ).runners[0]

    assert runner.timeout == 90.0
    assert runner.python == "/usr/bin/python3"
    assert (runner.retry.max_retries, runner.retry.retry_delay, runner.retry.backoff) == (5, 2, 3)
    assert (runner.retry.max_delay, runner.retry.jitter) == (60.0, 0.0)
    assert runner.allowed_classes == {"pybit.models.BuildRequest", "pybit.models.Job"}
    assert runner.settings == {}


def test_runner_retry_defaults(tmp_path: Path) -> None:
    retry = load(tmp_path, runner_section("runner = shell!true\n")).runners[0].retry

    assert (retry.max_retries, retry.retry_delay, retry.backoff) == (3, 10.0, 2.0)
    assert (retry.max_delay, retry.jitter) == (3600.0, 0.1)


def test_allowed_classes_join_the_worker_wide_and_the_runners_own(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        MINIMAL.replace("name = box1", "name = box1\njsonpickle_classes = a.B")
        + "[runner:x]\nrunner = shell!true\njsonpickle_classes = c.D\n"
        + "[runner:y]\nrunner = shell!true\n",
    )

    assert settings.worker.jsonpickle_classes == ("a.B",)
    assert [r.allowed_classes for r in settings.runners] == [{"a.B", "c.D"}, {"a.B"}]


@pytest.mark.parametrize(
    ("body", "key", "reason"),
    [
        ("name = x\n", "runner", "required key is missing"),
        ("runner = ruby!x\n", "runner", "unknown runner kind 'ruby'"),
        ("runner = shell echo\n", "runner", "expected python!pkg.module:func or shell!command"),
        ("runner = python!pkg.mod.func\n", "runner", "pkg.module:func"),
        ("runner = python!pkg mod:func\n", "runner", "pkg.module:func"),
        ("runner = shell!echo 'unbalanced\n", "runner", "cannot split the shell command"),
        ("runner = shell!\n", "runner", "the shell command is empty"),
        ("runner = shell!true\npython = /usr/bin/python3\n", "python", "only python! runners"),
        ("runner = shell!true\ntimeout = 0\n", "timeout", "> 0 and <= 1.2096e+06, got '0'"),
        ("runner = shell!true\nconcurrency = x\n", "concurrency", ">= 1 and <= 1000, got 'x'"),
        ("runner = shell!true\nprefetch = 0\n", "prefetch", "integer >= 1 and <= 65535, got '0'"),
        ("runner = shell!true\ndelivery_limit = 0\n", "delivery_limit", "integer >= 1"),
        ("runner = shell!true\nmax_retries = -1\n", "max_retries",
         "integer >= 0 and <= 100000, got '-1'"),
        ("runner = shell!true\nretry_delay = -1\n", "retry_delay", "number >= 0"),
        ("runner = shell!true\nretry_backoff = 0.5\n", "retry_backoff", "number >= 1"),
        ("runner = shell!true\nretry_jitter = 1.5\n", "retry_jitter", ">= 0 and <= 1"),
        ("runner = shell!true\nqueue_type = lazy\n", "queue_type", "classic, quorum"),
        ("runner = shell!true\njsonpickle_classes = Job\n", "jsonpickle_classes", "dotted"),
    ],
)
def test_bad_runner_settings_are_errors_naming_the_section_and_key(
    tmp_path: Path, body: str, key: str, reason: str
) -> None:
    error = load_error(tmp_path, runner_section(body, "q1"))

    assert (error.section, error.key) == ("runner:q1", key)
    assert reason in error.reason
    assert "section [runner:q1]" in str(error)


def test_a_python_target_may_name_a_class(tmp_path: Path) -> None:
    runner = load(
        tmp_path, runner_section("runner = python!rbitext.creditpiggy:CreditRunner\n")
    ).runners[0]

    assert (runner.kind, runner.target) == ("python", "rbitext.creditpiggy:CreditRunner")


def test_a_bad_runner_kind_error_does_not_echo_the_command(tmp_path: Path) -> None:
    error = load_error(tmp_path, runner_section(f"runner = shel!curl -u me:{SECRET} x\n"))

    assert SECRET not in str(error)


@pytest.mark.parametrize(
    ("queue", "reason"),
    [
        ("", "is empty"),
        ("q" * 239, "longer than 238 bytes"),
        ("é" * 120, "longer than 238 bytes"),  # 240 bytes in UTF-8
        ("amq.x", "reserved by RabbitMQ"),
        ("a\x7fb", "control characters"),
    ],
)
def test_a_bad_queue_name_is_an_error(tmp_path: Path, queue: str, reason: str) -> None:
    error = load_error(tmp_path, runner_section("runner = shell!true\n", queue))

    assert error.section == f"runner:{queue}"
    assert reason in error.reason


def test_the_longest_queue_name_leaves_room_for_the_longest_delay_queue(tmp_path: Path) -> None:
    queue = "q" * 238
    body = "runner = shell!true\nretry_delay = 1209600\nretry_max_delay = 1209600\n"

    settings = load(tmp_path, runner_section(body, queue))

    policy = settings.runners[0].retry
    longest = delay_queue(queue, max(policy_delays_ms(policy)))
    assert settings.runners[0].queue == queue
    assert len(longest.name.encode("utf-8")) == 255


# --- [status] ---------------------------------------------------------------------------


def test_status_defaults_to_the_log_sink(tmp_path: Path) -> None:
    status = load(tmp_path, MINIMAL).status

    assert status.sinks == ("log",)
    assert status.exchange == "rbit.status"


def test_an_empty_sink_list_means_no_sinks(tmp_path: Path) -> None:
    assert load(tmp_path, MINIMAL + "[status]\nsinks =\n").status.sinks == ()


def test_status_sinks_and_http_settings_are_read(tmp_path: Path) -> None:
    status = load(
        tmp_path,
        MINIMAL
        + "[status]\nsinks = log, AMQP, http\nhttp_url = https://pybit.example/\n"
        + "http_user = box\nhttp_password = pw\nhttp_timeout = 5\n"
        + "routing_key = {worker}.{queue}.{status}\nmax_pending = 10\nretry_max_delay = 30\n",
    ).status

    assert status.sinks == ("log", "amqp", "http")
    assert (status.http_url, status.http_user, status.http_password) == (
        "https://pybit.example/", "box", "pw",
    )
    assert (status.http_timeout, status.max_pending, status.retry_max_delay) == (5.0, 10, 30.0)
    assert status.routing_key == "{worker}.{queue}.{status}"


@pytest.mark.parametrize(
    ("body", "key", "reason"),
    [
        ("sinks = log, smtp", "sinks", "got 'smtp'"),
        ("sinks = http", "http_url", "required when the http sink is chosen"),
        ("sinks = http\nhttp_url = ftp://x/", "http_url", "http:// or https://"),
        ("routing_key = {queue}.{colour}", "routing_key", "unknown placeholder {colour}"),
        ("routing_key = {queue", "routing_key", "malformed template"),
        ("max_pending = 0", "max_pending", "integer >= 1"),
        ("http_timeout = -2", "http_timeout", "number > 0"),
    ],
)
def test_bad_status_settings_are_errors(tmp_path: Path, body: str, key: str, reason: str) -> None:
    error = load_error(tmp_path, MINIMAL + "[status]\n" + body + "\n")

    assert (error.section, error.key) == ("status", key)
    assert reason in error.reason


# --- the shipped example ----------------------------------------------------------------


def test_the_shipped_example_loads_without_warnings() -> None:
    environ = {"RBIT_AMQP_PASSWORD": SECRET, "RBIT_STATUS_PASSWORD": SECRET}

    settings = load_config(str(ROOT / "rbit.ini.example"), environ=environ)

    assert settings.warnings == ()
    assert settings.amqp.password == SECRET
    assert {runner.queue for runner in settings.runners} >= {"cnx_any_latex_pdf"}
    kinds = {runner.kind for runner in settings.runners}
    assert kinds == {"python", "shell"}
    assert any(r.target == "rbitext.examples:hello" for r in settings.runners)
    assert SECRET not in repr(settings)


def test_the_shipped_example_documents_a_credit_runner_section() -> None:
    text = (ROOT / "rbit.ini.example").read_text(encoding="utf-8")
    uncommented = re.sub(r"(?m)^#\s?", "", text)

    for key in ("api_url", "api_key", "api_secret", "batch_size", "flush_interval",
                "max_requests_per_second", "seen_ids_file"):
        assert re.search(rf"(?m)^{key}\s*=", uncommented), key
    assert "[runner:rbit.credits]" in uncommented
    assert "python!rbitext.creditpiggy:CreditRunner" in uncommented


def test_the_shipped_credit_runner_section_loads_when_uncommented(tmp_path: Path) -> None:
    text = (ROOT / "rbit.ini.example").read_text(encoding="utf-8")
    head, marker, credits = text.partition("#[runner:rbit.credits]")
    credits = re.sub(r"(?m)^#(?!#)", "", marker + credits)
    path = tmp_path / "credits.ini"
    path.write_text(head + credits, encoding="utf-8")
    environ = {"RBIT_AMQP_PASSWORD": SECRET, "RBIT_CREDIT_SECRET": SECRET}

    settings = load_config(str(path), environ=environ)

    assert settings.warnings == ()
    credit = next(r for r in settings.runners if r.queue == "rbit.credits")
    assert credit.target == "rbitext.creditpiggy:CreditRunner"
    assert credit.prefetch >= int(credit.settings["batch_size"])
    assert credit.settings["api_secret"] == SECRET
    assert "seen_ids_file" in credit.settings


def test_two_sections_for_the_same_queue_are_an_error(tmp_path: Path) -> None:
    error = load_error(
        tmp_path, MINIMAL + "[runner:q]\nrunner = shell!a\n[runner: q ]\nrunner = shell!b\n"
    )

    assert "queue 'q' has more than one runner section" in error.reason
