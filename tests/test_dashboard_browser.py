"""``rbit dashboard`` in a real browser (headless chromium through selenium and
chromium-driver) against real workers on the real broker.

The page lists the running workers; jobs published during the test appear with their
final status without a reload; a failed job shows its error (as text, not markup); a
queue paused from the page stops taking jobs and shows as paused; a dead letter
replayed from the page runs; a worker shut down from the page stops; without a token
the page has no action buttons and the server refuses POSTs.

scripts/test installs chromium and chromium-driver; a missing browser fails the test.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from test_control import ctl, replies
from worker_helpers import ROOT_DIR, TESTS_DIR, WorkerProcess, wait_until

from rbit.client import Client
from rbit.config import load_config

TOKEN = "browser-t0ken"
HOSTILE = '<img id="pwned" src="x"> & <b>bold</b>'
QUEUE_A, QUEUE_B = "dash_a", "dash_b"
#: Where to copy the screenshot for the README (unset: it stays in the test's tmp dir).
SCREENSHOT_ENV = "RBIT_DASHBOARD_SCREENSHOT"

pytestmark = pytest.mark.slow


def _ini(path: Path, sections: dict[str, dict[str, object]]) -> Path:
    lines = []
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {value}" for key, value in keys.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def _configs(tmp_path: Path, url: str, out: Path) -> dict[str, Path]:
    runner = {"runner": "python!dashboard_runners:work", "outdir": out, "max_retries": 0}
    common = {"amqp": {"url": url, "connect_timeout": 2},
              "status": {"sinks": "log, amqp"},
              f"runner:{QUEUE_A}": runner}
    nightly = {"queue": QUEUE_B, "body": "{}", "cron": "0 3 * * *"}
    configs = {}
    for name, extra in (("w1", {}), ("w2", {f"runner:{QUEUE_B}": runner,
                                          "schedule:nightly": nightly})):
        configs[name] = _ini(tmp_path / f"{name}.ini", {
            "rbit": {"name": name, "polling_time": 1, "state_dir": tmp_path / f"state-{name}"},
            **common, **extra})
    dash = {"bind": "127.0.0.1:0", "token": "${DASH_TOKEN}", "refresh": 2}
    configs["dash"] = _ini(tmp_path / "dash.ini", {
        "rbit": {"name": "dashboard", "state_dir": tmp_path / "state-dash"},
        **common, f"runner:{QUEUE_B}": runner, "dashboard": dash})
    configs["readonly"] = _ini(tmp_path / "readonly.ini", {
        "rbit": {"name": "dashboard-ro", "state_dir": tmp_path / "state-ro"},
        **common, "dashboard": {"bind": "127.0.0.1:0", "refresh": 2}})
    return configs


def _start_worker(config: Path, name: str) -> WorkerProcess:
    proc = WorkerProcess(config)
    try:
        wait_until(lambda: name in replies(ctl(config, "ping", "--worker", name,
                                               timeout=1.0)[1]),
                   timeout=60, what=f"{name} to answer ping")
    except AssertionError:
        proc.kill()
        raise AssertionError(proc.output) from None
    return proc


@contextlib.contextmanager
def _dashboard_process(config: Path, log: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """``rbit dashboard CONFIG --bind 127.0.0.1:0`` as a real process; yields its URL."""
    env = {**os.environ, "DASH_TOKEN": TOKEN,
           "PYTHONPATH": os.pathsep.join([str(ROOT_DIR), str(TESTS_DIR)])}
    with open(log, "wb") as stream:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rbit", "dashboard", str(config), "--bind", "127.0.0.1:0"],
            cwd=str(ROOT_DIR), env=env, stdin=subprocess.DEVNULL, stdout=stream,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        found = wait_until(lambda: re.search(r"dashboard on (http://127\.0\.0\.1:\d+/)",
                                             log.read_text(errors="replace")),
                           timeout=30, what="the dashboard to listen")
        yield proc, found[1]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@contextlib.contextmanager
def _readonly_dashboard(config: Path) -> Iterator[str]:
    """An in-process dashboard without a token; yields its URL."""
    from rbit.dashboard.app import serve

    stop, started = threading.Event(), []
    thread = threading.Thread(target=serve, args=(load_config(str(config)),),
                              kwargs={"stop": stop, "ready": started.append})
    thread.start()
    try:
        host, port = wait_until(lambda: started and started[0], timeout=20,
                                what="the read-only dashboard to listen")
        yield f"http://{host}:{port}/"
    finally:
        stop.set()
        thread.join(30)


@pytest.fixture
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("chromium and chromium-driver are needed (scripts/test installs them)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1700", "--no-first-run", "--disable-extensions"):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    session.set_page_load_timeout(30)
    try:
        yield session
    finally:
        session.quit()


def _texts(browser, css: str) -> list[str]:
    try:
        return [node.text for node in browser.find_elements(By.CSS_SELECTOR, css)]
    except StaleElementReferenceException:  # the page rebuilt it meanwhile
        return []


def _row(browser, css: str) -> str:
    try:
        return browser.find_element(By.CSS_SELECTOR, css).text
    except (NoSuchElementException, StaleElementReferenceException):
        return ""


def _click(browser, css: str, timeout: float = 20.0) -> None:
    def clicked() -> bool:
        try:
            browser.find_element(By.CSS_SELECTOR, css).click()
        except (NoSuchElementException, StaleElementReferenceException):
            return False
        return True
    wait_until(clicked, timeout=timeout, what=f"a clickable {css}")


def _job_row(browser, job_id: str) -> str:
    return _row(browser, f'#jobs tr[data-job="{job_id}"]')


def _runs(out: Path) -> list[str]:
    path = out / "runs"
    return path.read_text().split() if path.exists() else []


def test_the_dashboard_shows_the_fleet_live_and_acts_on_it(tmp_path, rabbit, vhost, browser):
    out = tmp_path / "out"
    out.mkdir()
    configs = _configs(tmp_path, rabbit.url(vhost), out)
    workers = {name: _start_worker(configs[name], name) for name in ("w1", "w2")}
    try:
        with _dashboard_process(configs["dash"], tmp_path / "dash.log") as (proc, url), \
                Client(load_config(str(configs["dash"]),
                                   environ={**os.environ, "DASH_TOKEN": TOKEN})) as client:
            _drive(browser, url, client, workers, out, tmp_path)
            with _readonly_dashboard(configs["readonly"]) as readonly_url:
                _check_read_only(browser, readonly_url)
            assert proc.poll() is None, (tmp_path / "dash.log").read_text()
    finally:
        for worker in workers.values():
            worker.kill()


def _drive(browser, url: str, client: Client, workers: dict[str, WorkerProcess], out: Path,
           tmp_path: Path) -> None:
    browser.get(url)
    # A token is configured: the page asks for it first.
    wait_until(lambda: browser.find_element(By.ID, "login").is_displayed(), timeout=20,
               what="the login form")
    assert browser.find_elements(By.CSS_SELECTOR, "button.action") == []
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#login button").click()
    wait_until(lambda: set(_texts(browser, "#workers tr[data-worker] td:first-child"))
               >= {"w1", "w2"}, timeout=30, what="both workers listed")
    assert "answered" in _row(browser, '#workers tr[data-worker="w1"]')
    browser.execute_script("window.sameDocument = true;")  # gone if the page reloads

    client.submit(QUEUE_A, json.dumps({"sleep": 0}), job_id="job-ok-1")
    wait_until(lambda: "Done" in _job_row(browser, "job-ok-1"), timeout=30,
               what="job-ok-1 shown Done")
    client.submit(QUEUE_A, json.dumps({"fail": HOSTILE}), job_id="job-bad-1")
    wait_until(lambda: "Failed" in _job_row(browser, "job-bad-1"), timeout=30,
               what="job-bad-1 shown Failed")
    assert HOSTILE in _job_row(browser, "job-bad-1")  # its error, shown as text
    assert browser.find_elements(By.ID, "pwned") == []  # ... never as markup
    assert browser.execute_script("return window.sameDocument === true;")

    # Dead letters: the failed job is there; replayed from the page, it runs.
    wait_until(lambda: "job-bad-1" in _row(browser, f'#dead div[data-dead="{QUEUE_A}"]'),
               timeout=30, what="job-bad-1 in the dead letters")
    client.submit(QUEUE_B, json.dumps({"sleep": 0}), job_id="job-ok-2")
    wait_until(lambda: "nightly" in _row(browser, "#schedules tbody"), timeout=30,
               what="the schedule shown")
    client.submit(QUEUE_B, json.dumps({"sleep": 4}), job_id="job-long-1")
    wait_until(lambda: "job-long-1" in _row(browser, '#workers tr[data-worker="w2"]'),
               timeout=30, what="job-long-1 shown running on w2")
    wait_until(lambda: "Done" in _job_row(browser, "job-ok-2"), timeout=30,
               what="job-ok-2 shown Done")
    _screenshot(browser, tmp_path)
    # Its statuses in order, when opened.
    _click(browser, '#jobs tr[data-job="job-bad-1"] a.job')
    wait_until(lambda: "Failed" in browser.find_element(By.ID, "job-statuses").text,
               timeout=10, what="job-bad-1's statuses")
    statuses = _texts(browser, "#job-statuses li .badge")
    assert statuses == ["Building", "Failed"], statuses

    (out / "fixed").write_text("")
    _click(browser, f'#dead div[data-dead="{QUEUE_A}"] button.action')
    wait_until(lambda: "job-bad-1" in _runs(out), timeout=30, what="the replayed job to run")
    wait_until(lambda: "Done" in _job_row(browser, "job-bad-1"), timeout=30,
               what="the replayed job shown Done")

    # Pause QUEUE_A from the page: deliveries stop, it shows paused on both workers.
    _click(browser, f'#queues tr[data-queue="{QUEUE_A}"] button.action')
    paused_cell = f'#queues tr[data-queue="{QUEUE_A}"] td.paused-on'
    wait_until(lambda: {"w1", "w2"} <= set(_texts(browser, f"{paused_cell} span")), timeout=30,
               what=f"{QUEUE_A} shown paused on w1 and w2")
    client.submit(QUEUE_A, json.dumps({"sleep": 0}), job_id="job-held-1")
    wait_until(lambda: _row(browser, f'#queues tr[data-queue="{QUEUE_A}"] td:nth-child(2)')
               == "1", timeout=30, what="the job waiting, ready in the paused queue")
    assert "job-held-1" not in _runs(out)
    _click(browser, f'#queues tr[data-queue="{QUEUE_A}"] button.action')  # Resume
    wait_until(lambda: "Done" in _job_row(browser, "job-held-1"), timeout=30,
               what="the held job run after resuming")

    # Shut w2 down from the page (after a confirmation).
    _click(browser, '#workers tr[data-worker="w2"] button.action')
    browser.switch_to.alert.accept()
    assert workers["w2"].wait(60) == 0


def _screenshot(browser, tmp_path: Path) -> None:
    shot = tmp_path / "dashboard.png"
    browser.save_screenshot(str(shot))
    wanted = os.environ.get(SCREENSHOT_ENV)
    if wanted:
        shutil.copyfile(shot, wanted)


def _check_read_only(browser, url: str) -> None:
    browser.get(url)
    wait_until(lambda: "w1" in _texts(browser, "#workers tr[data-worker] td:first-child"),
               timeout=30, what="the read-only page listing w1")
    wait_until(lambda: _row(browser, "#jobs tbody"), timeout=30, what="recent jobs")
    assert "read-only" in browser.find_element(By.ID, "mode").text
    assert browser.find_elements(By.CSS_SELECTOR, "button.action") == []
    assert not browser.find_element(By.ID, "login").is_displayed()
    # The page's own origin, posting as its script would: refused.
    status = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/api/pause', {method: 'POST', headers: {'Content-Type': 'application/json'},"
        " body: JSON.stringify({queue: 'dash_a'})}).then((r) => done(r.status));")
    assert status == 403


def test_the_page_stays_responsive_with_50_workers_and_10000_jobs(browser):
    from test_dashboard_server import FakeActions, FakeBoard

    from rbit.dashboard.jobs import JobLog
    from rbit.dashboard.server import DashboardServer
    from rbit.dashboard.settings import DashboardSettings

    class Fleet(FakeBoard):
        def fleet(self):
            workers = [{"name": f"w{i:02d}", "host": "h", "version": "1", "uptime": 60,
                        "broker_connected": True,
                        "queues": [{"queue": f"q{i % 5}", "consuming": True, "paused": False}],
                        "running": [{"job_id": f"run-{i}", "queue": f"q{i % 5}",
                                     "since": 1.7e9}]} for i in range(50)]
            return {"workers": workers, "missing": [], "error": None, "time": 1.7e9,
                    "queues": [{"queue": f"q{i}", "ready": 10, "consumers": 10, "dead": 0,
                                "running": 10, "consuming_on": [], "paused_on": []}
                               for i in range(5)], "schedules": [], "dead": {}}

    jobs = JobLog(10_000)
    jobs.add_history([{"job_id": f"job-{i:05d}", "queue": "q1", "status": "Done",
                       "attempt": 1, "ended": 1.7e9 + i, "duration": 1.0, "usage": None,
                       "worker": "w01", "message": ""} for i in range(10_000)])
    server = DashboardServer(DashboardSettings(host="127.0.0.1", port=0), Fleet(jobs),
                             FakeActions())
    server.start()
    try:
        started = time.monotonic()
        browser.get("http://%s:%d/" % server.address)
        wait_until(lambda: len(_texts(browser, "#workers tr[data-worker]")) == 50
                   and len(_texts(browser, "#jobs tr[data-job]")) == 50, timeout=20,
                   what="50 workers and a page of jobs")
        assert "page 1 of 200 (10000 jobs)" in browser.find_element(By.ID, "page").text
        _click(browser, "#next")
        wait_until(lambda: "job-09949" in _texts(browser, "#jobs tr[data-job] td a"),
                   timeout=10, what="the second page")
        # Loaded, drawn and paged well within what a person waits for, on a busy machine.
        assert time.monotonic() - started < 15
    finally:
        server.close()
