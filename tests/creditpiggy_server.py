"""A small but real CreditPiggy bulk API server for tests.

It listens on 127.0.0.1 (port 0 unless told), answers ``POST .../batch/bulk`` the way
the CreditPiggy server does, and keeps an in-memory ledger:

* Authorization ``alg,key,digest`` (the whole header lower-cased, as the server does):
  400 when the header is missing or has not three parts, 401 for an unknown key,
  400 for an unknown algorithm (sha-256, sha-512, sha-1 are known), 401 when the digest
  of body + secret differs. Error replies are ``{"result": "error", "message": ...}``.
* A bulk is applied in the server's order (alloc, counters, meta, discard, claim); an
  item that fails adds ``{"message", "code": 500}`` to ``errors`` in the 200 reply,
  with the server's wording (claiming or discarding a slot that does not exist names
  the slot; a second alloc of a slot "already exists"). A claim deletes its slot.
* :attr:`applied` counts, per item (command and canonical JSON args), how many times an
  accepted request carried it, so tests can check exactly-once delivery.
* :meth:`stop` and :meth:`start` again re-open the same port; :meth:`fail_next` makes
  the next requests answer an HTTP error; :meth:`hold_next` holds the next request,
  unapplied and then dropped, or applied with its reply withheld until released.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_HASHES = {"sha-256": hashlib.sha256, "sha-512": hashlib.sha512, "sha-1": hashlib.sha1}


class ApiError(Exception):
    def __init__(self, message: str, code: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass
class Slot:
    credits: int | None = None
    min: int | None = None
    max: int | None = None
    counters: collections.Counter = field(default_factory=collections.Counter)
    meta: dict[str, Any] = field(default_factory=dict)
    discarded: str | None = None


@dataclass(frozen=True)
class Request:
    at: float
    status: int
    authorization: str
    body: bytes


class Ledger:
    """What the server has recorded, applied with CreditPiggy's rules."""

    def __init__(self, project: str = "test-project") -> None:
        self.project = project
        self.slots: dict[str, Slot] = {}
        self.claims: list[tuple[str, str, int]] = []  # slot, machine, credits

    def apply(self, bulk: dict[str, Any]) -> list[ApiError]:
        errors: list[ApiError] = []
        for command in ("alloc", "counters", "meta", "discard", "claim"):
            for args in bulk.pop(command, None) or []:
                try:
                    getattr(self, command)(args)
                except ApiError as exc:
                    errors.append(exc)
        if bulk:
            errors.append(ApiError(f"Unknown command '{next(iter(bulk))}' in bulk set"))
        return errors

    def _existing(self, args: dict[str, Any], doing: str) -> Slot:
        if "slot" not in args:
            raise ApiError("Missing 'slot' argument")
        slot = self.slots.get(args["slot"])
        if slot is None:
            raise ApiError(
                f"{doing} non-existing slot: '{args['slot']}' for project: '{self.project}'"
            )
        return slot

    def alloc(self, args: dict[str, Any]) -> None:
        if "slot" not in args:
            raise ApiError("Missing 'slot' argument")
        if args["slot"] in self.slots:
            raise ApiError("An slot with this key already exists!")
        slot = Slot()
        if "credits" in args:
            slot.credits = int(args["credits"])
        else:
            slot.min = int(args["min"]) if "min" in args else None
            slot.max = int(args["max"]) if "max" in args else None
        self.slots[args["slot"]] = slot

    def counters(self, args: dict[str, Any]) -> None:
        slot = self._existing(args, "Updating counters in a")
        for name, value in args.items():
            if name != "slot":
                slot.counters[name] += int(value)

    def meta(self, args: dict[str, Any]) -> None:
        # The real server accepts META for any slot and stores nothing; keep it visible.
        slot = self.slots.get(args.get("slot", ""))
        if slot is not None:
            slot.meta.update({k: v for k, v in args.items() if k != "slot"})

    def discard(self, args: dict[str, Any]) -> None:
        slot = self._existing(args, "Discarding")
        slot.discarded = str(args.get("reason", "unspecified"))

    def claim(self, args: dict[str, Any]) -> None:
        if "slot" not in args:
            raise ApiError("Missing 'slot' argument")
        if "machine" not in args:
            raise ApiError("Missing 'machine' argument")
        slot = self._existing(args, "Claiming")
        credits = slot.credits if slot.credits is not None else int(args.get("credits", 1))
        if slot.min is not None:
            credits = max(credits, slot.min)
        if slot.max is not None:
            credits = min(credits, slot.max)
        self.claims.append((args["slot"], args["machine"], credits))
        del self.slots[args["slot"]]


class FakeCreditPiggy:
    """The server. Use as a context manager or call :meth:`start` / :meth:`stop`.

    Args:
        keys: Project key -> secret.
        clock: Time source stamped on every :class:`Request`.
    """

    def __init__(self, keys: dict[str, str] | None = None, *, clock=time.monotonic) -> None:
        self.keys = {k.lower(): v for k, v in (keys or {"testkey": "testsecret"}).items()}
        self.clock = clock
        self.ledger = Ledger()
        self.requests: list[Request] = []
        self.applied: collections.Counter = collections.Counter()
        self.port = 0
        self._failures: list[int] = []
        self.held = threading.Event()  # set when a held request has arrived
        self._hold: threading.Event | None = None
        self._hold_applies = False
        self._cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The ``api_url`` to configure (the bulk endpoint is ``{url}/batch/bulk``)."""
        return f"http://127.0.0.1:{self.port}/api/json"

    def start(self) -> FakeCreditPiggy:
        handler = type("Handler", (_Handler,), {"app": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-creditpiggy", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeCreditPiggy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail_next(self, status: int, count: int = 1) -> None:
        """Answer the next ``count`` bulk requests with HTTP ``status`` (after auth)."""
        with self._cond:
            self._failures.extend([status] * count)

    def hold_next(self, *, apply: bool = False) -> threading.Event:
        """Hold the next bulk request until the returned event is set.

        By default the request is held unapplied: :attr:`held` is set when it arrives;
        once released, it is dropped without a reply and without touching the ledger
        (as if the connection broke before the server committed anything).

        With ``apply=True`` the request is applied to the ledger first, :attr:`held` is
        set, and the reply goes out only once released: the server has committed the
        batch while its client still waits (the window a client-side crash must not
        turn into a second application).
        """
        self.held.clear()
        self._hold_applies = apply
        self._hold = threading.Event()
        return self._hold

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until at least ``count`` requests were answered."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.requests) >= count, timeout)

    def accepted_items(self) -> list[tuple[str, dict[str, Any]]]:
        """Every item of every accepted request, in arrival order."""
        items = []
        for request in self.requests:
            if request.status == 200:
                bulk = json.loads(request.body)
                items += [(command, args) for command, group in bulk.items() for args in group]
        return items

    def times_applied(self, command: str, args: dict[str, Any]) -> int:
        return self.applied[(command, json.dumps(args, sort_keys=True))]

    # -- request handling (called from handler threads) --------------------------------

    def handle(self, authorization: str | None, body: bytes) -> tuple[int, dict[str, Any]]:
        with self._cond:
            try:
                self._authorize(authorization, body)
                status, reply = self._bulk(body)
            except ApiError as exc:
                status, reply = exc.code, {"result": "error", "message": exc.message}
            self.requests.append(Request(self.clock(), status, authorization or "", body))
            self._cond.notify_all()
            return status, reply

    def _authorize(self, authorization: str | None, body: bytes) -> None:
        if authorization is None:
            raise ApiError("Missing Authorization header", 400)
        parts = authorization.lower().split(",")
        if len(parts) != 3:
            raise ApiError("Your authentication token is malformed", 400)
        algorithm, key, digest = parts
        if key not in self.keys:
            raise ApiError("You are not authorized to use this resource", 401)
        if algorithm not in _HASHES:
            raise ApiError("Unknown hashing algorithm used", 400)
        if _HASHES[algorithm](body + self.keys[key].encode()).hexdigest() != digest:
            raise ApiError("You are not authorized to use this resource", 401)

    def _bulk(self, body: bytes) -> tuple[int, dict[str, Any]]:
        if self._failures:
            return self._failures.pop(0), {"result": "error", "message": "injected failure"}
        try:
            bulk = json.loads(body)
        except ValueError:
            raise ApiError("Could not parse JSON request", 400) from None
        for command, group in bulk.items():
            for args in group:
                self.applied[(command, json.dumps(args, sort_keys=True))] += 1
        errors = self.ledger.apply(bulk)
        reply: dict[str, Any] = {"result": "ok"}
        if errors:
            reply["errors"] = [{"message": e.message, "code": e.code} for e in errors]
        return 200, reply


class _Handler(BaseHTTPRequestHandler):
    app: FakeCreditPiggy

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        hold, self.app._hold = self.app._hold, None
        if hold is not None and not self.app._hold_applies:
            self.app.held.set()
            hold.wait(60.0)
            self.close_connection = True
            return
        if not self.path.rstrip("/").endswith("/batch/bulk"):
            self._reply(404, {"result": "error", "message": "not found"})
            return
        status, reply = self.app.handle(self.headers.get("Authorization"), body)
        if hold is not None:  # applied; the reply waits for the test
            self.app.held.set()
            hold.wait(60.0)
            with contextlib.suppress(OSError):  # the client may be dead by now
                self._reply(status, reply)
            return
        self._reply(status, reply)

    def _reply(self, status: int, doc: dict[str, Any]) -> None:
        payload = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass
