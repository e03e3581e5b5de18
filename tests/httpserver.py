"""A real threaded HTTP server on 127.0.0.1 for tests that talk HTTP.

It records every request and answers with configurable responses::

    with HttpServer() as server:
        server.set_response("/batch/bulk", 200, {"result": "ok"})
        ...  # code under test POSTs to server.url + "/batch/bulk"
        (request,) = server.wait_for(1, timeout=10)
        assert request.json()["alloc"] == [...]

``stop()`` closes the port (clients get "connection refused") and ``start()`` opens the
same port again, for "server down for a while, then back" tests. Connections are not
kept alive, so a stopped server really is unreachable.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Body = bytes | str | dict | list | None


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it."""

    method: str
    path: str  # with the query string, as sent
    headers: dict[str, str]
    body: bytes
    time: float = field(default_factory=time.monotonic)

    def header(self, name: str, default: str | None = None) -> str | None:
        """A header's value, by case-insensitive name."""
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return default

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)


@dataclass(frozen=True)
class Response:
    """What the server answers. A dict or list body is sent as JSON."""

    status: int = 200
    body: Body = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (slow-server tests)

    def encoded(self) -> tuple[bytes, dict[str, str]]:
        headers = dict(self.headers)
        if isinstance(self.body, (dict, list)):
            headers.setdefault("Content-Type", "application/json")
            return json.dumps(self.body).encode(), headers
        if isinstance(self.body, str):
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")
            return self.body.encode(), headers
        return self.body or b"", headers


Handler = Callable[[RecordedRequest], Response | tuple | None]


class HttpServer:
    """A recording HTTP server on ``host``, port ``port`` (0 = any free port).

    Responses are chosen per request: a handler set with :meth:`set_handler` first (when
    it returns ``None`` the lookup goes on), then an exact ``(method, path)`` or ``path``
    set with :meth:`set_response` (path without query string), then the default
    (200, empty body).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host = host
        self.port = port
        self._cond = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._responses: dict[tuple[str | None, str], Response] = {}
        self._default = Response()
        self._handler: Handler | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.errors: list[BaseException] = []  # exceptions raised by handlers

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> HttpServer:
        """Start serving (on the same port as before, after a :meth:`stop`)."""
        if self._httpd is not None:
            return self
        httpd = ThreadingHTTPServer((self.host, self.port), _make_handler(self))
        httpd.daemon_threads = True
        self.port = httpd.server_address[1]  # fixed from now on, for restarts
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="test-http-%d" % self.port,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket; the port refuses connections."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def __enter__(self) -> HttpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:43125`` (no trailing slash)."""
        return "http://%s:%d" % (self.host, self.port)

    def url_for(self, path: str) -> str:
        return self.url + (path if path.startswith("/") else "/" + path)

    # -- responses -----------------------------------------------------------------------

    def set_response(
        self,
        path: str,
        status: int = 200,
        body: Body = b"",
        headers: dict[str, str] | None = None,
        *,
        method: str | None = None,
        delay: float = 0.0,
    ) -> None:
        """Answer requests to ``path`` (any method, or only ``method``) like this."""
        response = Response(status, body, dict(headers or {}), delay)
        with self._cond:
            self._responses[(method.upper() if method else None, path)] = response

    def set_default(self, status: int = 200, body: Body = b"", **kwargs: Any) -> None:
        """The answer for paths with no response of their own."""
        with self._cond:
            self._default = Response(status, body, **kwargs)

    def set_handler(self, handler: Handler | None) -> None:
        """Compute answers with ``handler(request)``.

        It returns a :class:`Response`, a ``(status, body)`` tuple, or ``None`` to fall
        back to the configured responses. It runs in the server's request threads.
        """
        with self._cond:
            self._handler = handler

    def _respond(self, request: RecordedRequest) -> Response:
        with self._cond:
            handler = self._handler
            bare = request.path.split("?", 1)[0]
            static = (
                self._responses.get((request.method, bare))
                or self._responses.get((None, bare))
                or self._default
            )
        if handler is not None:
            result = handler(request)
            if isinstance(result, tuple):
                return Response(*result)
            if result is not None:
                return result
        return static

    # -- recorded requests ---------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of the requests received so far, oldest first."""
        with self._cond:
            return list(self._requests)

    def clear(self) -> None:
        """Forget the requests received so far."""
        with self._cond:
            self._requests.clear()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[RecordedRequest]:
        """Wait until at least ``n`` requests arrived; return them all.

        Raises:
            AssertionError: fewer than ``n`` requests within ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._requests) >= n, timeout):
                raise AssertionError(
                    "expected %d HTTP request(s) within %.1f s, got %d"
                    % (n, timeout, len(self._requests))
                )
            return list(self._requests)

    def _record(self, request: RecordedRequest) -> None:
        with self._cond:
            self._requests.append(request)
            self._cond.notify_all()


def _make_handler(server: HttpServer) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one request per connection, so stop() leaves no live connection.
        protocol_version = "HTTP/1.0"

        def _handle(self) -> None:
            request = RecordedRequest(
                method=self.command,
                path=self.path,
                headers=dict(self.headers.items()),
                body=self._read_body(),
            )
            server._record(request)
            try:
                response = server._respond(request)
            except Exception as exc:  # noqa: BLE001 - reported to the test, answered 500
                server.errors.append(exc)
                response = Response(500, "handler error: %r" % exc)
            if response.delay:
                time.sleep(response.delay)  # a deliberately slow server
            self._send(response)

        def _read_body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                return self._read_chunked()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _read_chunked(self) -> bytes:
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()  # the blank line after the last chunk
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()

        def _send(self, response: Response) -> None:
            body, headers = response.encoded()
            self.send_response(response.status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # keep test output clean; requests are recorded instead

    return _Handler
