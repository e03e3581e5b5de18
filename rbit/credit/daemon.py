"""Running the front door: pid file, double-fork daemon, foreground service loop.

The pid file holds the daemon's pid and a newline. It is written atomically (a
temporary file renamed into place, mode 0644) and removed by the daemon on exit, but
only while it still names that daemon. A pid file naming a dead process -- or a live
process that is not an rbit program (the pid was reused after a crash) -- is stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from rbit.credit.server import CreditServer, Limits, Publish, ServerError, broker_publisher
from rbit.credit.settings import CreditSettings
from rbit.errors import BrokerUnreachable, RbitError

log = logging.getLogger(__name__)

#: How long ``stop`` waits for the daemon to exit after SIGTERM.
STOP_TIMEOUT = 30.0
#: How long ``start`` waits for the daemon to report that it listens.
START_TIMEOUT = 60.0
#: Grace period for confirms of lines in flight when the daemon stops.
STOP_GRACE = 10.0

Ready = Callable[[], None]


class AlreadyRunning(RbitError):
    """A live daemon already holds the pid file."""


# ---------------------------------------------------------------------------------------
# Pid file


def read_pid(path: str) -> int | None:
    """The pid in ``path``, or ``None`` when there is no readable pid there."""
    try:
        with open(path, encoding="ascii") as stream:
            text = stream.read(32).strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, though not ours to signal
    return _proc_state(pid) != "Z"


def running_pid(path: str) -> int | None:
    """The pid of the live daemon named by the pid file, or ``None``."""
    pid = read_pid(path)
    if pid is None or not pid_alive(pid) or not _looks_like_rbit(pid):
        return None
    return pid


def write_pidfile(path: str, pid: int) -> None:
    """Write ``pid`` to ``path`` atomically, mode 0644, creating the directory (0755)."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=".credit-pid-", dir=directory)
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, f"{pid}\n".encode("ascii"))
        os.fsync(fd)
        os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def remove_pidfile(path: str, pid: int) -> None:
    """Remove ``path`` if it still names ``pid``."""
    if read_pid(path) == pid:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def holding_pidfile(path: str) -> Iterator[None]:
    """Claim the pid file for this process for the duration of the block.

    Raises:
        AlreadyRunning: A live daemon holds it.
    """
    other = running_pid(path)
    if other is not None and other != os.getpid():
        raise AlreadyRunning(f"already running (pid {other}, pid file {path})")
    write_pidfile(path, os.getpid())
    try:
        yield
    finally:
        remove_pidfile(path, os.getpid())


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stream:
            return stream.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None


def _looks_like_rbit(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            return b"rbit" in stream.read()
    except OSError:
        return True  # no /proc to ask: trust the pid file


# ---------------------------------------------------------------------------------------
# Stop


def stop_daemon(pidfile: str, timeout: float = STOP_TIMEOUT) -> bool | None:
    """Send SIGTERM to the daemon and wait until it is gone.

    Returns:
        ``None`` if it was not running (a stale pid file is removed), ``True`` once it
        exited, ``False`` if it was still alive after ``timeout`` seconds.
    """
    pid = running_pid(pidfile)
    if pid is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)
        return None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)  # polling: a non-child's exit cannot be waited for
    return True


# ---------------------------------------------------------------------------------------
# Daemonize


def daemonize(
    work: Callable[[Ready], int], *, logfile: str | None, wait: float = START_TIMEOUT
) -> int:  # noqa: RET503 - the daemon's branch never returns (os._exit)
    """Run ``work(ready)`` in a detached daemon (double fork, new session, cwd ``/``).

    The calling process waits until the daemon calls ``ready()`` (it listens) and returns
    0, or returns the daemon's exit code if it ended first, or 1 after ``wait`` seconds.
    Only the calling process returns; the daemon exits when ``work`` returns.

    Args:
        work: The daemon's body; returns its exit code.
        logfile: Where the daemon's stdout and stderr go (``/dev/null`` if ``None``).
        wait: Seconds to wait for ``ready()``.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if not child:
        os.close(read_fd)
        _detach(work, write_fd, logfile)
    os.close(write_fd)
    os.waitpid(child, 0)  # the first child exits as soon as it forked again
    return _await_ready(read_fd, wait)


def _detach(work: Callable[[Ready], int], write_fd: int, logfile: str | None) -> NoReturn:
    os.setsid()  # no controlling terminal: a closed shell sends us no SIGHUP
    if os.fork():
        os._exit(0)  # the session leader leaves; its child can never regain a terminal
    _daemon_body(work, write_fd, logfile)


def _await_ready(read_fd: int, wait: float) -> int:
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        readable, _, _ = select.select([pipe], [], [], wait)
        if not readable:
            print("rbit-credit: the daemon did not report ready in time", file=sys.stderr)
            return 1
        word = pipe.read(4)
    if word == b"ok":
        return 0
    code = int(word) if word.isdigit() else 1
    print("rbit-credit: the daemon failed to start (see its log)", file=sys.stderr)
    return code or 1


def _daemon_body(work: Callable[[Ready], int], write_fd: int, logfile: str | None) -> NoReturn:
    code = 1
    told = False

    def ready() -> None:
        nonlocal told
        os.write(write_fd, b"ok")
        told = True

    try:
        os.chdir("/")
        os.umask(0o022)
        _redirect_stdio(logfile)
        code = work(ready)
    except BaseException:  # noqa: BLE001 - the daemon must report, whatever happened
        log.exception("the credit daemon failed")
    finally:
        if not told:
            with contextlib.suppress(OSError):
                os.write(write_fd, str(code or 1).encode("ascii"))
        with contextlib.suppress(OSError):
            os.close(write_fd)
        logging.shutdown()
        os._exit(code)


def _redirect_stdio(logfile: str | None) -> None:
    with open(os.devnull, "rb") as null_in:
        os.dup2(null_in.fileno(), 0)
    target = logfile or os.devnull
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


# ---------------------------------------------------------------------------------------
# The service


def serve(settings: CreditSettings, publish: Publish, ready: Ready | None = None) -> None:
    """Serve the front door until SIGTERM or SIGINT, then stop gracefully.

    Raises:
        ServerError: The socket cannot be bound.
    """
    asyncio.run(_serve(settings, publish, ready))


async def _serve(settings: CreditSettings, publish: Publish, ready: Ready | None,
                 broker: Any = None) -> None:
    server = CreditServer(
        publish,
        unix_path=settings.unix_path,
        host=settings.host,
        port=settings.port,
        limits=_limits(settings),
    )
    await server.start()
    observer = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        observer = _observe(settings, server, broker)
        if ready is not None:
            ready()
        await stop.wait()
        log.info("stopping the credit front door")
    finally:
        if observer is not None:
            observer.close()
        await server.stop(STOP_GRACE)


def _observe(settings: CreditSettings, server: CreditServer, broker: Any) -> Any:
    """The ``[http]`` endpoint (/healthz, /metrics), when configured; else None."""
    if settings.http is None:
        return None
    from rbit.observe.credit import CreditMetrics
    from rbit.observe.http import Endpoints, HttpError, ObserveServer

    def connected() -> bool:
        return broker is None or (broker.connected and not broker.stopping)

    def healthy() -> tuple[bool, str]:
        if not connected():
            return False, "not connected to the broker"
        return True, f"serving; {server.stats.outstanding} confirms outstanding"

    metrics = CreditMetrics(server.stats, connected)
    try:
        observer = ObserveServer(settings.http, Endpoints(healthy=healthy,
                                                          metrics=metrics.exposition),
                                 name="rbit-credit-http")
    except HttpError as exc:
        raise ServerError(str(exc)) from exc
    observer.start()
    return observer


def _limits(settings: CreditSettings) -> Limits:
    most = settings.max_connections
    spare = _descriptors_for_clients()
    if spare is not None and spare < most:
        # Past the descriptor limit accept() fails and nobody gets a reply at all.
        log.warning("max_connections = %d exceeds what the open-files limit allows; "
                    "serving at most %d clients at once", most, spare)
        most = max(1, spare)
    return Limits(idle_timeout=settings.idle_timeout, reply_timeout=settings.reply_timeout,
                  line_timeout=settings.line_timeout, max_connections=most)


def _descriptors_for_clients() -> int | None:
    """Descriptors left for clients under RLIMIT_NOFILE, keeping some for the rest."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft - 64


def run_daemon(settings: CreditSettings, ready: Ready | None = None) -> None:
    """Connect to RabbitMQ, hold the pid file and serve until told to stop.

    Raises:
        AlreadyRunning: Another daemon holds the pid file.
        BrokerUnreachable: RabbitMQ could not be reached at start.
        ServerError: The socket cannot be bound.
    """
    with holding_pidfile(settings.pidfile):
        asyncio.run(_serve_with_broker(settings, ready))
    log.info("credit front door stopped")


async def _serve_with_broker(settings: CreditSettings, ready: Ready | None) -> None:
    # The AMQP connection runs on the server's own event loop: a line's publish and
    # its confirm never cross threads, which keeps replies fast under load.
    broker = await connect_broker_async(settings)
    try:
        await _serve(settings, broker_publisher(broker, settings.credit_queue,
                                                 settings.credit_queue_arguments), ready, broker)
    finally:
        await broker.stop_async(STOP_GRACE)


async def connect_broker_async(settings: CreditSettings):  # -> rbit.amqp.broker.Broker
    """:func:`connect_broker` on the running asyncio loop (no I/O thread)."""
    broker = _broker(settings, asyncio.get_running_loop())
    broker.start()
    if not await broker.wait_ready_async(_connect_wait(settings)):
        reason = broker.start_error or "timed out"
        await broker.stop_async(1.0)
        raise BrokerUnreachable(f"cannot reach RabbitMQ: {reason}")
    return broker


def _connect_wait(settings: CreditSettings) -> float:
    return settings.amqp.connect_timeout * max(1, len(settings.amqp.hosts)) + 5


def _broker(settings: CreditSettings, loop: asyncio.AbstractEventLoop | None = None):
    from types import MappingProxyType

    from rbit.amqp.broker import Broker  # imported late: pika is only needed when publishing
    from rbit.topology import QueueDecl, Topology

    queue = QueueDecl(settings.credit_queue,
                      arguments=MappingProxyType(dict(settings.credit_queue_arguments)))
    return Broker(settings.amqp, Topology(queues=(queue,)), name="rbit-credit", loop=loop)


def connect_broker(settings: CreditSettings):  # -> rbit.amqp.broker.Broker
    """Start a :class:`rbit.amqp.broker.Broker` that declares the credit queue.

    Raises:
        BrokerUnreachable: No configured host answered within the connect timeout.
    """
    broker = _broker(settings)
    broker.start()
    if not broker.wait_ready(_connect_wait(settings)):
        reason = broker.start_error or "timed out"
        broker.stop(1.0)
        raise BrokerUnreachable(f"cannot reach RabbitMQ: {reason}")
    return broker


__all__ = [
    "AlreadyRunning", "ServerError", "daemonize", "holding_pidfile", "pid_alive",
    "read_pid", "remove_pidfile", "run_daemon", "running_pid", "serve", "stop_daemon",
    "write_pidfile",
]
