"""A TCP proxy for fault tests that can hold back what a client sends.

A worker connected to RabbitMQ through :class:`Proxy` behaves as usual until the test
calls :meth:`Proxy.hold`: from then on the bytes the worker writes (acks above all) stay
in the proxy instead of reaching the broker, while the broker's bytes still reach the
worker. :meth:`Proxy.sever` then drops every connection and what was held, as a worker
killed before its acks left the machine would.

:meth:`Proxy.hold_from_broker` holds the other way: what the broker sends (confirms,
declare-oks, deliveries) stays in the proxy while the worker's bytes still reach the
broker -- a confirm lost on the way. :meth:`Proxy.release` then forwards what was held,
late but in order (a worker that stalled), or :meth:`Proxy.sever` drops it.
"""

from __future__ import annotations

import contextlib
import socket
import threading

# An AMQP method frame for basic.ack starts its payload with class 60, method 80.
BASIC_ACK = b"\x00\x3c\x00\x50"


class Proxy:
    """Forward 127.0.0.1:<port> to ``target``; see the module docstring.

    Args:
        target: ``(host, port)`` to forward to.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Condition()
        self._holding = False
        self._held = bytearray()
        self._holding_broker = False
        self._held_for: dict[socket.socket, bytearray] = {}  # client -> broker's bytes
        self._sockets: list[socket.socket] = []
        self._every: list[socket.socket] = []  # closed by close(), whatever happened
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def hold(self) -> None:
        """Keep what clients send from now on, instead of forwarding it."""
        with self._lock:
            self._holding = True

    def held(self) -> bytes:
        """What the clients sent since :meth:`hold`."""
        with self._lock:
            return bytes(self._held)

    def wait_held(self, needle: bytes, timeout: float) -> bool:
        """Wait until the held bytes contain ``needle``."""
        with self._lock:
            return self._lock.wait_for(lambda: needle in self._held, timeout)

    def hold_from_broker(self) -> None:
        """Keep what the broker sends from now on, instead of forwarding it."""
        with self._lock:
            self._holding_broker = True

    def release(self) -> None:
        """Forward what the broker sent while held, then forward as usual again."""
        with self._lock:
            for client, data in self._held_for.items():
                with contextlib.suppress(OSError):
                    client.sendall(data)
            self._held_for.clear()
            self._holding_broker = False

    def sever(self) -> None:
        """Close every connection, dropping held bytes; forward again for new ones."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
            self._holding = self._holding_broker = False
            self._held.clear()
            self._held_for.clear()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.sever()
        with self._lock:
            every, self._every = self._every, []
        for sock in every:
            sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
                self._every += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    if from_client and self._holding:
                        self._held += data
                        self._lock.notify_all()
                        continue
                    if not from_client and self._holding_broker:
                        self._held_for.setdefault(sink, bytearray()).extend(data)
                        continue
                    # Under the lock, so that nothing overtakes what release() forwards.
                    sink.sendall(data)
        except OSError:
            pass
        # One side went away: the other sees the connection end (held bytes never go).
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
