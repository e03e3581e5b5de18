"""The dashboard's HTTP server: one page, its JSON API, and a stream of live statuses.

Built on :mod:`rbit.observe.http` (binding, bounded bodies, replies). Routes:

* ``GET /``, ``/static/app.js``, ``/static/app.css``: the page (package data);
* ``GET /api/session``: whether a token is required, whether this client may act,
  its anti-CSRF token, the refresh interval;
* ``GET /api/fleet``: workers, missing workers, queues, schedules, dead letters;
* ``GET /api/jobs?queue=&status=&page=&per_page=``: recent jobs, paginated;
* ``GET /api/job?id=``: one job's statuses in order;
* ``GET /api/events``: statuses as server-sent events;
* ``POST /api/login`` (``{"token"}``) and ``/api/logout``: the session cookie;
* ``POST /api/pause|resume`` (``{"queue"}``), ``/api/shutdown`` (``{"worker"}``),
  ``/api/replay`` (``{"queue"}``), ``/api/purge`` (``{"queue", "confirm": queue}``).

Access: without ``[dashboard] token`` everything may be read and every ``POST`` is
refused (403): the page is read-only. With a token, every ``/api/`` request needs it,
as ``Authorization: Bearer <token>`` or as the session cookie set by the login form
(``HttpOnly; SameSite=Strict``); a ``POST`` with the cookie must also carry the
session's anti-CSRF token in ``X-CSRF-Token``, and any ``POST`` whose ``Origin`` (or
``Sec-Fetch-Site``) says it comes from another site is refused.
"""

from __future__ import annotations

import hmac
import importlib.resources
import json
import logging
import queue
import secrets
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from rbit.dashboard.settings import DashboardSettings
from rbit.observe.http import BaseHandler, ServedServer, bearer_matches

log = logging.getLogger(__name__)

COOKIE = "rbit_dashboard"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 1_000
#: Seconds between keep-alive comments on an idle event stream.
STREAM_PING = 15.0
_STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
           "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
           "/static/app.css": ("app.css", "text/css; charset=utf-8")}
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; form-action 'self'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def load_static() -> dict[str, tuple[bytes, str]]:
    """The page's files, read once from the package: path -> (bytes, content type)."""
    root = importlib.resources.files("rbit.dashboard") / "static"
    return {path: ((root / name).read_bytes(), kind) for path, (name, kind) in _STATIC.items()}


class Sessions:
    """Login sessions: random ids, each with its anti-CSRF token, expiring.

    Args:
        clock: Monotonic time (injected by tests).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def open(self) -> tuple[str, str]:
        """A new session: (session id, anti-CSRF token)."""
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[sid] = (csrf, self._clock() + SESSION_SECONDS)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return sid, csrf

    def csrf(self, sid: str) -> str | None:
        """The anti-CSRF token of a live session (None: no such session, or expired)."""
        with self._lock:
            found = self._sessions.get(sid)
            if found is None:
                return None
            if found[1] < self._clock():
                del self._sessions[sid]
                return None
            return found[0]

    def close(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)


class DashboardServer(ServedServer):
    """Serves the dashboard from a daemon thread until :meth:`close`.

    Args:
        settings: Where to listen, the token, the refresh interval.
        board: What is shown: ``fleet()``, ``jobs(queue, status, page, per_page)``,
            ``job(job_id)``, ``workers_for(queue, paused)``, ``poke()`` and ``hub``
            (:class:`rbit.dashboard.live.Hub`).
        actions: Carries out the actions (:class:`rbit.dashboard.actions.Actions`);
            ignored without a token.

    Raises:
        HttpError: The address cannot be bound.
    """

    def __init__(self, settings: DashboardSettings, board: Any, actions: Any) -> None:
        handler = type("Handler", (_Handler,), {
            "board": board, "actions": actions if settings.token else None,
            "token": settings.token, "refresh": settings.refresh, "sessions": Sessions(),
            "static": load_static()})
        super().__init__(settings.host, settings.port, handler, what="[dashboard] bind",
                         name="rbit-dashboard-http", announce="dashboard on http://%s:%d/")
        self._board = board

    def close(self) -> None:
        """Stop serving, end the event streams, release the port."""
        self._board.hub.close()
        super().close()


class _Handler(BaseHandler):
    board: Any
    actions: Any
    token: str | None
    refresh: float
    sessions: Sessions
    static: dict[str, tuple[bytes, str]]

    # ------------------------------------------------------------------- GET

    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        if url.path in self.static:
            body, kind = self.static[url.path]
            self._send(200, body, content_type=kind, extra=_SECURITY_HEADERS)
            return
        if url.path == "/api/session":
            self._guarded(self._session, query)
            return
        route = {"/api/fleet": self._fleet, "/api/jobs": self._jobs, "/api/job": self._job,
                 "/api/events": self._events}.get(url.path)
        if route is None:
            self._send(404, "no such path\n")
        elif self._reader_ok():
            self._guarded(route, query)

    def _session(self, _query: dict) -> None:
        csrf = self._cookie_csrf()
        may_act = self.token is not None and (csrf is not None or self._bearer())
        self._json(200, {"auth_required": self.token is not None,
                         "authenticated": bool(may_act), "actions": bool(may_act),
                         "csrf": csrf, "refresh": self.refresh})

    def _fleet(self, _query: dict) -> None:
        self._json(200, self.board.fleet())

    def _jobs(self, query: dict) -> None:
        try:
            page, per_page = int(query.get("page", "1")), int(query.get("per_page", "50"))
        except ValueError:
            self._send(400, "page and per_page must be whole numbers\n")
            return
        self._json(200, self.board.jobs(query.get("queue", ""), query.get("status", ""),
                                        page, per_page))

    def _job(self, query: dict) -> None:
        job_id = query.get("id", "")
        if not job_id:
            self._send(400, "give ?id=JOB\n")
            return
        self._json(200, self.board.job(job_id[:200]))

    def _events(self, _query: dict) -> None:
        inbox = self.board.hub.subscribe()
        if inbox is None:
            self._send(503, "too many open streams\n")
            return
        try:
            self.send_response(200)
            for name, value in (("Content-Type", "text/event-stream"),
                                ("Cache-Control", "no-store"), ("X-Accel-Buffering", "no")):
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(b"retry: 3000\n\n")
            self.wfile.flush()
            self._stream(inbox)
        except OSError:  # the page went away
            pass
        finally:
            self.board.hub.unsubscribe(inbox)
            self.close_connection = True

    def _stream(self, inbox: queue.Queue) -> None:
        while True:
            try:
                event = inbox.get(timeout=STREAM_PING)
            except queue.Empty:
                self.wfile.write(b": ping\n\n")
            else:
                if event is None:
                    return
                # json.dumps escapes line breaks: one event is one data line.
                self.wfile.write(b"data: " + json.dumps(event).encode("utf-8") + b"\n\n")
            self.wfile.flush()

    # ------------------------------------------------------------------ POST

    def do_POST(self) -> None:  # noqa: N802
        path = urllib.parse.urlsplit(self.path).path
        if not self._same_site():
            self._send(403, "refused: a request from another site\n")
            return
        if self.token is None:
            self._send(403, "refused: the dashboard is read-only (no [dashboard] token)\n")
            return
        if path == "/api/login":
            self._guarded(self._login, {})
            return
        if path == "/api/logout":
            self._logout()
            return
        route = {"/api/pause": self._pause, "/api/resume": self._pause,
                 "/api/shutdown": self._shutdown, "/api/replay": self._dead,
                 "/api/purge": self._dead}.get(path)
        if route is None:
            self._send(404, "no such path\n")
        elif self._actor_ok():
            self._guarded(route, {"action": path.rsplit("/", 1)[1]})

    def _login(self, _query: dict) -> None:
        document = self._read_json()
        if document is None:
            return
        given = document.get("token") if isinstance(document, dict) else None
        if not isinstance(given, str) or not hmac.compare_digest(
                given.encode("utf-8", "replace"), self.token.encode("utf-8")):
            log.warning("dashboard login refused from %s", self.address_string())
            self._send(401, "wrong token\n")
            return
        sid, csrf = self.sessions.open()
        cookie = (f"{COOKIE}={sid}; HttpOnly; SameSite=Strict; Path=/; "
                  f"Max-Age={SESSION_SECONDS}")
        body = json.dumps({"csrf": csrf}).encode("utf-8")
        self._send(200, body, content_type="application/json", extra={"Set-Cookie": cookie})

    def _logout(self) -> None:
        sid = self._cookie()
        if sid is not None:
            self.sessions.close(sid)
        self._send(204, b"", extra={"Set-Cookie": f"{COOKIE}=; HttpOnly; SameSite=Strict; "
                                                  "Path=/; Max-Age=0"})

    def _pause(self, query: dict) -> None:
        document = self._document("queue")
        if document is None:
            return
        resume = query["action"] == "resume"
        workers = self.board.workers_for(document["queue"], paused=resume)
        act = self.actions.resume if resume else self.actions.pause
        self._act(lambda: act(document["queue"], workers))

    def _shutdown(self, _query: dict) -> None:
        document = self._document("worker")
        if document is not None:
            self._act(lambda: self.actions.shutdown(document["worker"]))

    def _dead(self, query: dict) -> None:
        document = self._document("queue")
        if document is None:
            return
        if query["action"] == "purge" and document.get("confirm") != document["queue"]:
            self._send(400, "purging needs \"confirm\": the queue's name\n")
            return
        act = self.actions.purge if query["action"] == "purge" else self.actions.replay
        self._act(lambda: act(document["queue"]))

    def _document(self, key: str) -> dict[str, Any] | None:
        document = self._read_json()
        if document is None:
            return None
        if not isinstance(document, dict) or not isinstance(document.get(key), str) \
                or not 0 < len(document[key]) <= 255:
            self._send(400, f"expected a JSON object with \"{key}\"\n")
            return None
        return document

    def _act(self, action: Callable[[], dict[str, Any]]) -> None:
        from rbit.errors import RbitError

        log.info("dashboard action %s from %s", self.path[:100], self.address_string())
        try:
            result = action()
        except RbitError as exc:  # unknown queue, broker down, a signed job unsignable
            self._json(409, {"ok": False, "error": str(exc)[:1000]})
            return
        self.board.poke()
        self._json(200, result)

    # ---------------------------------------------------------------- access

    def _bearer(self) -> bool:
        return self.token is not None and bearer_matches(
            self.headers.get("Authorization", ""), self.token)

    def _cookie(self) -> str | None:
        for part in self.headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE and value:
                return value
        return None

    def _cookie_csrf(self) -> str | None:
        sid = self._cookie()
        return None if sid is None or self.token is None else self.sessions.csrf(sid)

    def _reader_ok(self) -> bool:
        if self.token is None or self._bearer() or self._cookie_csrf() is not None:
            return True
        self._send(401, "log in first (or send Authorization: Bearer <token>)\n",
                   extra={"WWW-Authenticate": 'Bearer realm="rbit dashboard"'})
        return False

    def _actor_ok(self) -> bool:
        if self._bearer():
            return True  # a browser never adds this header by itself: no CSRF possible
        csrf = self._cookie_csrf()
        if csrf is None:
            self._send(401, "log in first (or send Authorization: Bearer <token>)\n")
            return False
        given = self.headers.get("X-CSRF-Token", "")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), csrf.encode("utf-8")):
            self._send(403, "refused: missing or wrong anti-CSRF token\n")
            return False
        return True

    def _same_site(self) -> bool:
        """False for a request a browser says comes from another site."""
        origin = self.headers.get("Origin")
        if origin is not None:
            host = self.headers.get("Host", "")
            return origin in (f"http://{host}", f"https://{host}")
        return self.headers.get("Sec-Fetch-Site", "same-origin") in ("same-origin", "none")
