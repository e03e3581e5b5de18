"""The dashboard's HTTP server over real HTTP on 127.0.0.1: token, login cookie, CSRF,
cross-site refusals, read-only mode, escaping of what is shown, pagination, the event
stream, and the ``[dashboard]`` section."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rbit.config import load_config
from rbit.dashboard.jobs import MAX_PER_PAGE, JobLog
from rbit.dashboard.live import Hub
from rbit.dashboard.server import DashboardServer, Sessions
from rbit.dashboard.settings import DashboardSettings
from rbit.errors import ConfigError

TOKEN = "dash-s3cret"
HOSTILE = '<img src=x onerror="alert(1)">'


class FakeBoard:
    """What the server shows, without a fleet: the server's own behaviour is under test."""

    def __init__(self, jobs: JobLog) -> None:
        self.hub = Hub()
        self._jobs = jobs
        self.pokes = 0

    def fleet(self) -> dict[str, Any]:
        return {"workers": [{"name": HOSTILE, "queues": [{"queue": "q1", "paused": False}]}],
                "missing": [], "queues": [{"queue": "q1", "consuming_on": ["w1"],
                                           "paused_on": []}], "dead": {}, "error": None}

    def jobs(self, queue: str, status: str, page: int, per_page: int) -> dict[str, Any]:
        return self._jobs.page(queue, status, page, per_page)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._jobs.job(job_id)

    def workers_for(self, queue: str, paused: bool) -> list[str]:
        return [] if paused else ["w1"]

    def poke(self) -> None:
        self.pokes += 1


class FakeActions:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def pause(self, queue: str, workers: list[str]) -> dict[str, Any]:
        self.calls.append(("pause", queue, tuple(workers)))
        return {"ok": True, "answers": []}

    def resume(self, queue: str, workers: list[str]) -> dict[str, Any]:
        self.calls.append(("resume", queue, tuple(workers)))
        return {"ok": True, "answers": []}

    def shutdown(self, worker: str) -> dict[str, Any]:
        self.calls.append(("shutdown", worker))
        return {"ok": True, "answers": []}

    def replay(self, queue: str) -> dict[str, Any]:
        self.calls.append(("replay", queue))
        return {"ok": True, "count": 1}

    def purge(self, queue: str) -> dict[str, Any]:
        self.calls.append(("purge", queue))
        return {"ok": True, "count": 1}


@contextlib.contextmanager
def dashboard(token: str | None, rows: int = 0) -> Iterator[tuple[tuple[str, int], Any]]:
    jobs = JobLog(20_000)
    jobs.add_history([{"job_id": f"job-{i:05d}", "queue": "q1" if i % 2 else "q2",
                       "status": "Done" if i % 3 else "Failed", "attempt": 1, "ended": i,
                       "duration": 0.5, "usage": None, "worker": "w1", "message": f"m{i}"}
                      for i in range(rows)])
    board, actions = FakeBoard(jobs), FakeActions()
    server = DashboardServer(DashboardSettings(host="127.0.0.1", port=0, token=token),
                             board, actions)
    server.start()
    try:
        yield server.address, (board, actions)
    finally:
        server.close()


def call(address: tuple[str, int], method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(*address, timeout=10)
    sent = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        sent["Content-Type"] = "application/json"
    try:
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def login(address: tuple[str, int]) -> tuple[str, str]:
    """Log in; returns (the Cookie header to send, the anti-CSRF token)."""
    status, headers, body = call(address, "POST", "/api/login", {"token": TOKEN})
    assert status == 200, body
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    return cookie.split(";")[0], json.loads(body)["csrf"]


def test_without_a_token_everything_reads_and_every_post_is_refused():
    with dashboard(None) as (address, (_board, actions)):
        status, _, body = call(address, "GET", "/api/session")
        assert status == 200
        session = json.loads(body)
        assert session["auth_required"] is False
        assert session["actions"] is False
        assert call(address, "GET", "/api/fleet")[0] == 200
        for path, document in (("/api/pause", {"queue": "q1"}), ("/api/purge", {"queue": "q1"}),
                               ("/api/shutdown", {"worker": "w1"}),
                               ("/api/login", {"token": "anything"})):
            status, _, body = call(address, "POST", path, document)
            assert status == 403, (path, body)
            assert b"read-only" in body
        assert actions.calls == []


def test_with_a_token_reading_needs_it_and_a_wrong_one_is_refused():
    with dashboard(TOKEN) as (address, (_board, actions)):
        assert call(address, "GET", "/")[0] == 200  # the page itself (its login form)
        assert call(address, "GET", "/api/fleet")[0] == 401
        assert call(address, "GET", "/api/fleet",
                    headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(address, "GET", "/api/fleet",
                    headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert call(address, "POST", "/api/login", {"token": "wrong"})[0] == 401
        assert call(address, "POST", "/api/pause", {"queue": "q1"})[0] == 401
        assert call(address, "GET", "/api/fleet",
                    headers={"Cookie": "rbit_dashboard=forged"})[0] == 401
        assert actions.calls == []


def test_a_bearer_token_acts_without_a_csrf_token():
    with dashboard(TOKEN) as (address, (board, actions)):
        status, _, body = call(address, "POST", "/api/pause", {"queue": "q1"},
                               headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200, body
        assert actions.calls == [("pause", "q1", ("w1",))]
        assert board.pokes == 1


def test_the_login_cookie_acts_only_with_the_sessions_csrf_token():
    with dashboard(TOKEN) as (address, (_board, actions)):
        cookie, csrf = login(address)
        status, _, body = call(address, "GET", "/api/session", headers={"Cookie": cookie})
        assert json.loads(body)["actions"] is True
        assert json.loads(body)["csrf"] == csrf
        assert call(address, "GET", "/api/fleet", headers={"Cookie": cookie})[0] == 200
        # The cookie alone (what a forged cross-site form would carry) is refused.
        status, _, body = call(address, "POST", "/api/shutdown", {"worker": "w1"},
                               headers={"Cookie": cookie})
        assert status == 403, body
        status, _, body = call(address, "POST", "/api/shutdown", {"worker": "w1"},
                               headers={"Cookie": cookie, "X-CSRF-Token": "guess"})
        assert status == 403, body
        assert actions.calls == []
        status, _, body = call(address, "POST", "/api/shutdown", {"worker": "w1"},
                               headers={"Cookie": cookie, "X-CSRF-Token": csrf})
        assert status == 200, body
        assert actions.calls == [("shutdown", "w1")]
        # Logged out: the cookie is worth nothing any more.
        assert call(address, "POST", "/api/logout", {}, headers={"Cookie": cookie})[0] == 204
        assert call(address, "GET", "/api/fleet", headers={"Cookie": cookie})[0] == 401


def test_a_post_from_another_site_is_refused_even_with_valid_credentials():
    with dashboard(TOKEN) as (address, (_board, actions)):
        cookie, csrf = login(address)
        good = {"Cookie": cookie, "X-CSRF-Token": csrf}
        for hostile in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
            status, _, body = call(address, "POST", "/api/replay", {"queue": "q1"},
                                   headers={**good, **hostile})
            assert status == 403, body
            assert b"another site" in body
        host = f"{address[0]}:{address[1]}"
        status, _, _ = call(address, "POST", "/api/replay", {"queue": "q1"},
                            headers={**good, "Origin": f"http://{host}",
                                     "Sec-Fetch-Site": "same-origin"})
        assert status == 200
        assert actions.calls == [("replay", "q1")]


def test_purge_needs_the_queue_name_as_confirmation():
    with dashboard(TOKEN) as (address, (_board, actions)):
        auth = {"Authorization": f"Bearer {TOKEN}"}
        status, _, body = call(address, "POST", "/api/purge", {"queue": "q1"}, headers=auth)
        assert status == 400, body
        status, _, _ = call(address, "POST", "/api/purge", {"queue": "q1", "confirm": "q2"},
                            headers=auth)
        assert status == 400
        assert actions.calls == []
        status, _, _ = call(address, "POST", "/api/purge", {"queue": "q1", "confirm": "q1"},
                            headers=auth)
        assert status == 200
        assert actions.calls == [("purge", "q1")]


def test_bodies_are_bounded_and_must_be_json_objects():
    with dashboard(TOKEN) as (address, (_board, actions)):
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert call(address, "POST", "/api/pause", "q1", headers=auth)[0] == 400
        assert call(address, "POST", "/api/pause", {"queue": "x" * 70_000},
                    headers=auth)[0] == 413
        assert actions.calls == []


def test_the_page_carries_no_data_and_its_script_never_parses_html():
    with dashboard(None) as (address, _):
        status, headers, page = call(address, "GET", "/")
        assert status == 200
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert b"<script src=\"/static/app.js\"" in page
        assert re.search(rb"https?://", page) is None  # nothing fetched from elsewhere
        _, _, script = call(address, "GET", "/static/app.js")
        for sink in (b"innerHTML", b"outerHTML", b"insertAdjacentHTML", b"document.write",
                     b"eval("):
            assert sink not in script
        assert b"textContent" in script
        # Data is only ever JSON, never HTML: a hostile name stays a JSON string.
        status, headers, body = call(address, "GET", "/api/fleet")
        assert headers["Content-Type"] == "application/json"
        assert json.loads(body)["workers"][0]["name"] == HOSTILE


def test_recent_jobs_are_paginated_and_filtered():
    with dashboard(None, rows=10_000) as (address, _):
        status, _, body = call(address, "GET", "/api/jobs?per_page=50")
        assert status == 200
        first = json.loads(body)
        assert first["total"] == 10_000
        assert first["pages"] == 200
        assert len(first["rows"]) == 50
        assert first["rows"][0]["job_id"] == "job-09999"  # newest first
        _, _, body = call(address, "GET", "/api/jobs?page=3&per_page=50")
        assert json.loads(body)["rows"][0]["job_id"] == "job-09899"
        _, _, body = call(address, "GET", "/api/jobs?page=999&per_page=5000")
        last = json.loads(body)
        assert len(last["rows"]) <= MAX_PER_PAGE
        assert last["page"] == last["pages"]
        _, _, body = call(address, "GET", "/api/jobs?queue=q1&status=Failed")
        rows = json.loads(body)["rows"]
        assert rows
        assert {(r["queue"], r["status"]) for r in rows} == {("q1", "Failed")}
        assert call(address, "GET", "/api/jobs?page=x")[0] == 400


def test_statuses_stream_to_the_page_as_server_sent_events():
    with dashboard(None) as (address, (board, _actions)):
        connection = http.client.HTTPConnection(*address, timeout=10)
        connection.request("GET", "/api/events")
        response = connection.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/event-stream"
        assert response.fp.readline() == b"retry: 3000\n"
        response.fp.readline()
        # The stream subscribed before its first line: an event published now is its.
        event = {"job_id": "j1", "status": "Failed", "message": f"line 1\n{HOSTILE}"}
        board.hub.publish(event)
        line = response.fp.readline()
        assert line.startswith(b"data: ")
        assert json.loads(line[6:]) == event  # one line: the break is escaped in JSON
        connection.close()


def test_sessions_expire():
    now = [1000.0]
    sessions = Sessions(clock=lambda: now[0])
    sid, csrf = sessions.open()
    assert sessions.csrf(sid) == csrf
    now[0] += 13 * 3600
    assert sessions.csrf(sid) is None


def _config(tmp_path: Path, section: str) -> str:
    path = tmp_path / "dash.ini"
    path.write_text("[rbit]\nname = d\n[amqp]\nhost = 127.0.0.1\n" + section)
    return str(path)


def test_the_dashboard_section_is_read_with_defaults_and_secrets_from_the_environment(
        tmp_path):
    settings = load_config(_config(tmp_path, ""))
    assert (settings.dashboard.host, settings.dashboard.port) == ("127.0.0.1", 8080)
    assert settings.dashboard.token is None
    settings = load_config(_config(tmp_path, "[dashboard]\nbind = [::1]:9000\n"
                                   "token = ${DASH_TOKEN}\nrefresh = 10\nhistory_rows = 99\n"),
                           environ={"DASH_TOKEN": TOKEN})
    dash = settings.dashboard
    assert (dash.host, dash.port, dash.token, dash.refresh, dash.history_rows) == \
        ("::1", 9000, TOKEN, 10.0, 99)
    assert TOKEN not in repr(dash)
    assert settings.warnings == ()


@pytest.mark.parametrize(("section", "key"), [
    ("bind = nowhere", "bind"), ("refresh = 0.5", "refresh"), ("history_rows = 0", "history_rows"),
    ("token = ", "token"), ("dead_letters_shown = -1", "dead_letters_shown")])
def test_a_bad_dashboard_key_names_file_section_and_key(tmp_path, section, key):
    path = _config(tmp_path, f"[dashboard]\n{section}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    text = str(caught.value)
    assert path in text
    assert "[dashboard]" in text
    assert key in text


def test_an_unknown_dashboard_key_is_warned_about(tmp_path):
    settings = load_config(_config(tmp_path, "[dashboard]\nrefrsh = 3\n"))
    assert any("refrsh" in w and "refresh" in w for w in settings.warnings)


def test_the_command_line_maps_bad_configs_and_binds_to_the_documented_codes(tmp_path):
    from rbit.cli import ExitCode
    from rbit.cli import main as rbit_main

    bad = _config(tmp_path, "[dashboard]\nrefresh = 0\n")
    assert rbit_main(["dashboard", bad]) == ExitCode.CONFIG == 78
    good = _config(tmp_path, "")
    assert rbit_main(["dashboard", good, "--bind", "nowhere"]) == ExitCode.USAGE == 2
    assert rbit_main(["dashboard"]) == ExitCode.USAGE
