"""The observability endpoint: a small HTTP server in a daemon thread.

Off unless ``[http] bind`` is set; it binds where the operator says (the loopback
address unless another is named on purpose). What it serves comes from injected
callables (:class:`Endpoints`), so the worker and ``rbit-credit`` share the code:

* ``GET /healthz``: 200 or 503, the reason as the body;
* ``GET /stats`` and ``/stats?verbose=1``: the status snapshot as JSON;
* ``GET /metrics``: the Prometheus text format;
* ``GET /history?queue=Q&depth=N``: a queue's last outcomes as JSON;
* ``POST /logconfig``: a :func:`logging.config.dictConfig` document as JSON.

With ``[http] token`` set every request must carry ``Authorization: Bearer <token>``;
a ``POST`` needs it always (without a configured token it is refused with 403). A
wrong or missing token gets 401 and changes nothing.
"""

from __future__ import annotations

import hmac
import json
import logging
import logging.config
import socket
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rbit.config import HttpSettings
from rbit.errors import RbitError

log = logging.getLogger(__name__)

#: The largest request body accepted (``POST /logconfig``), in bytes.
MAX_BODY = 64 * 1024
#: ``/history``'s depth when none is asked for, and the most it gives.
DEFAULT_DEPTH, MAX_DEPTH = 20, 1000
#: A client has this long (seconds) to send its request: a stalled one ties up a thread.
REQUEST_TIMEOUT = 10.0

Health = Callable[[], "tuple[bool, str]"]
Status = Callable[[bool], dict]
History = Callable[[str, int], "list[dict]"]


class HttpError(RbitError):
    """The endpoint cannot listen where it was told to."""


@dataclass(frozen=True)
class Endpoints:
    """What the server serves; a path whose callable is None answers 404.

    Attributes:
        healthy: ``() -> (ok, reason)``.
        metrics: ``() -> (body, content type)`` in the Prometheus text format.
        status: ``(verbose) -> dict`` (JSON-serialisable).
        history: ``(queue, depth) -> list of dicts``.
        logconfig: Applies a validated dictConfig document (default:
            :func:`apply_logconfig`).
    """

    healthy: Health
    metrics: Callable[[], tuple[bytes, str]]
    status: Status | None = None
    history: History | None = None
    logconfig: Callable[[dict], None] | None = None


def apply_logconfig(document: dict) -> None:
    """Apply a logging dictConfig document; existing loggers are kept.

    Raises:
        ValueError: It is not a dict with ``version: 1``, or logging refused it.
    """
    if not isinstance(document, dict) or document.get("version") != 1:
        raise ValueError("expected a JSON object with \"version\": 1 (logging dictConfig)")
    document = {"disable_existing_loggers": False, **document}
    try:
        logging.config.dictConfig(document)
    except (ValueError, TypeError, AttributeError, ImportError) as exc:
        raise ValueError(f"logging refused it: {exc}") from exc


class ServedServer:
    """An HTTP server bound at once and served from a daemon thread until :meth:`close`.

    Args:
        host: The address to bind.
        port: The port (0: one the system picks).
        handler: The request handler class.
        what: Names the setting in errors (``[http] bind``).
        name: Names the serving thread.
        announce: The log line at start, formatted with the host and port.

    Raises:
        HttpError: The address cannot be bound.
    """

    def __init__(self, host: str, port: int, handler: type, *, what: str, name: str,
                 announce: str) -> None:
        self._server = bind_server(host, port, handler, what)
        self._announce = announce
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.5}, name=name, daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the port chosen by the system for port 0)."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()
        log.info(self._announce, *self.address)

    def close(self) -> None:
        """Stop serving and release the port."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


class ObserveServer(ServedServer):
    """The worker's HTTP endpoint.

    Args:
        settings: Where to listen, and the token.
        endpoints: What to serve.
        name: Names the serving thread.

    Raises:
        HttpError: The address cannot be bound.
    """

    def __init__(self, settings: HttpSettings, endpoints: Endpoints, *,
                 name: str = "rbit-http") -> None:
        handler = type("Handler", (_Handler,), {"endpoints": endpoints,
                                                "token": settings.token})
        super().__init__(settings.host, settings.port, handler, what="[http] bind",
                         name=name, announce="HTTP endpoint on %s:%d")


class Server(ThreadingHTTPServer):
    """A threading HTTP server on IPv4 or IPv6 (by the host's form); daemon threads."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler: type) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)


def bind_server(host: str, port: int, handler: type, what: str) -> Server:
    """A :class:`Server` bound to ``host:port`` (``what`` names the setting in errors).

    Raises:
        HttpError: The address cannot be bound.
    """
    try:
        return Server((host, port), handler)
    except OSError as exc:
        raise HttpError(f"{what} {host}:{port}: {exc.strerror or exc}") from exc


def bearer_matches(header: str, token: str) -> bool:
    """Whether an ``Authorization`` header value carries ``Bearer <token>``."""
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        value.strip().encode("utf-8", "replace"), token.encode("utf-8"))


class BaseHandler(BaseHTTPRequestHandler):
    """Request handling shared by rbit's HTTP servers: bounded bodies, JSON, replies.

    A client has :data:`REQUEST_TIMEOUT` seconds to send its request; a body is read
    only with a ``Content-Length`` of at most :data:`MAX_BODY` bytes; only the request
    line is logged (a token travels in a header or a cookie).
    """

    timeout = REQUEST_TIMEOUT
    server_version = "rbit"

    def _guarded(self, route: Callable[[dict], None], query: dict) -> None:
        try:
            route(query)
        except Exception:  # a broken callable must not take the endpoint down
            log.exception("HTTP %s %s failed", self.command, self.path[:200])
            self._send(500, "internal error\n")

    def _read_body(self) -> bytes | None:
        """The request body (None: refused, the reply is sent)."""
        length_text = self.headers.get("Content-Length", "")
        if not length_text.isdigit():
            self._send(411, "a Content-Length is required\n")
            return None
        if int(length_text) > MAX_BODY:
            self._send(413, f"the body is larger than {MAX_BODY} bytes\n")
            return None
        return self.rfile.read(int(length_text))

    def _read_json(self) -> Any:
        raw = self._read_body()
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            self._send(400, f"not JSON: {exc}\n")
            return None

    def _json(self, code: int, value: Any) -> None:
        self._send(code, json.dumps(value, default=str).encode("utf-8") + b"\n",
                   content_type="application/json")

    def _send(self, code: int, body: str | bytes, *, content_type: str = "text/plain; "
              "charset=utf-8", extra: dict[str, str] | None = None) -> None:
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(code)
        if code != 204:
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if data and self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        # The request line only (never a header: the token travels in one).
        log.debug("HTTP %s %s", self.address_string(), format % args)


class _Handler(BaseHandler):
    endpoints: Endpoints
    token: str | None

    # ------------------------------------------------------------------- methods

    def do_GET(self) -> None:  # noqa: N802 -- http.server's naming
        if not self._authorized(post=False):
            return
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        route = {"/healthz": self._healthz, "/stats": self._stats, "/metrics": self._metrics,
                 "/history": self._history}.get(url.path)
        if route is None:
            self._send(404, "no such path\n")
        else:
            self._guarded(route, query)

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorized(post=True):
            return
        if urllib.parse.urlsplit(self.path).path != "/logconfig":
            self._send(404, "no such path\n")
            return
        self._guarded(self._logconfig, {})

    # -------------------------------------------------------------------- access

    def _authorized(self, *, post: bool) -> bool:
        if self.token is None:
            if post:
                self._send(403, "refused: set [http] token to allow changes\n")
                return False
            return True
        if bearer_matches(self.headers.get("Authorization", ""), self.token):
            return True
        self._send(401, "a valid bearer token is required\n",
                   extra={"WWW-Authenticate": 'Bearer realm="rbit"'})
        return False

    # -------------------------------------------------------------------- routes

    def _healthz(self, _query: dict) -> None:
        ok, reason = self.endpoints.healthy()
        self._send(200 if ok else 503, f"{reason}\n")

    def _stats(self, query: dict) -> None:
        if self.endpoints.status is None:
            self._send(404, "no stats here\n")
            return
        verbose = query.get("verbose", ["0"])[-1].lower() in ("1", "true", "yes", "on")
        self._json(200, self.endpoints.status(verbose))

    def _metrics(self, _query: dict) -> None:
        body, content_type = self.endpoints.metrics()
        self._send(200, body, content_type=content_type)

    def _history(self, query: dict) -> None:
        if self.endpoints.history is None:
            self._send(404, "history not enabled\n")
            return
        queue = query.get("queue", [""])[-1]
        depth_text = query.get("depth", [str(DEFAULT_DEPTH)])[-1]
        if not queue:
            self._send(400, "give ?queue=NAME\n")
            return
        if not depth_text.isdigit() or not 1 <= int(depth_text) <= MAX_DEPTH:
            self._send(400, f"depth must be a whole number from 1 to {MAX_DEPTH}\n")
            return
        self._json(200, self.endpoints.history(queue, int(depth_text)))

    def _logconfig(self, _query: dict) -> None:
        document = self._read_json()
        if document is None:
            return
        apply = self.endpoints.logconfig or apply_logconfig
        try:
            apply(document)
        except ValueError as exc:
            self._send(400, f"{exc}\n")
            return
        log.info("logging reconfigured through the HTTP endpoint")
        self._send(204, b"")
