"""A private RabbitMQ node for the test suite (and the demo).

The node runs from Debian's ``rabbitmq-server`` package as the current user, with its
own node name, ports on 127.0.0.1, data and log directories and Erlang cookie, so it
never touches a system-wide broker on 5672. Everything is driven with ``rabbitmqctl``.

Run ``python -m tests.rabbit serve --dir DIR`` to keep a node up until SIGINT/SIGTERM;
it prints its AMQP URL on the first line of stdout once the broker accepts work.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rbit.config import AmqpSettings

# Long-job tests rely on a short delivery-ack timeout (the broker's default is 30 min).
CONSUMER_TIMEOUT_MS = 10_000
STARTUP_TIMEOUT = 90.0
CTL_TIMEOUT = 60.0
# A watermark this low puts the node in a memory alarm at once: publishers get blocked.
ALARM_WATERMARK = "0.000001"
NORMAL_WATERMARK = "0.4"

# The /usr/sbin wrappers re-exec as the "rabbitmq" user when run as root, which would lose
# our HOME (cookie) and our directories; the scripts in the lib dir run as whoever calls.
_LIB_BIN = Path("/usr/lib/rabbitmq/bin")
_CTL_DIST_OFFSET = 10_000  # rabbitmqctl's own distribution ports start here above ours


class RabbitUnavailable(RuntimeError):
    """No rabbitmq-server binary, or the node did not come up."""


def find_binary(name: str) -> str | None:
    """Return the path of a RabbitMQ script (``rabbitmq-server``, ``rabbitmqctl``).

    Prefers Debian's lib dir (no user switching) and falls back to ``PATH``.
    """
    candidate = _LIB_BIN / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def free_port(upper: int = 65535) -> int:
    """Return a TCP port on 127.0.0.1 that is free now and below ``upper``."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < upper:
            return port
    raise RabbitUnavailable("no free port below %d" % upper)


def _conf_text(port: int) -> str:
    return "\n".join(
        [
            "listeners.tcp.1 = 127.0.0.1:%d" % port,
            "loopback_users = none",
            "consumer_timeout = %d" % CONSUMER_TIMEOUT_MS,
            "log.console = false",
            "log.file.level = info",
            # Tests fill queues on a small disk now and then; do not let that block them.
            "disk_free_limit.absolute = 1MB",
            "",
        ]
    )


class RabbitNode:
    """One private RabbitMQ node.

    Args:
        base_dir: Directory for data, logs, config and the fake HOME (created).
        name: Erlang node name; default ``rbit-test-<pid>@localhost``.
        port: AMQP port on 127.0.0.1; default a free one.
        watch_pid: The node halts itself once this process is gone (default: the
            current process; 0 = never), so a killed test run leaves no broker behind.
    """

    def __init__(
        self,
        base_dir: Path,
        name: str | None = None,
        port: int | None = None,
        watch_pid: int | None = None,
    ):
        self.base_dir = Path(base_dir).resolve()
        self.watch_pid = os.getpid() if watch_pid is None else watch_pid
        self.nodename = name or "rbit-test-%d@localhost" % os.getpid()
        self.port = port or free_port()
        # rabbitmqctl picks its own ports at dist_port + 10000; keep them in range.
        self.dist_port = free_port(upper=65535 - _CTL_DIST_OFFSET - 20)
        self.host = "127.0.0.1"
        self._server = find_binary("rabbitmq-server")
        self._ctl = find_binary("rabbitmqctl")
        self._proc: subprocess.Popen[bytes] | None = None
        self._vhost_counter = 0
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Start the node and wait until it has fully booted.

        Raises:
            RabbitUnavailable: no binary, or the node did not boot within ``timeout``.
        """
        if not self._server or not self._ctl:
            raise RabbitUnavailable(
                "rabbitmq-server is not installed (looked in %s and on PATH); "
                "install Debian's rabbitmq-server package" % _LIB_BIN
            )
        self._prepare_dirs()
        out = open(self.base_dir / "server.out", "ab")  # noqa: SIM115 - owned by the child
        try:
            self._proc = subprocess.Popen(
                [self._server],
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,  # where Erlang and Mnesia write crash dumps
                start_new_session=True,  # so stop() can signal the whole group
            )
        finally:
            out.close()
        self._await_startup(timeout)
        if self.watch_pid:
            self._start_watchdog(self.watch_pid)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the node: ``rabbitmqctl stop``, then SIGKILL if it lingers."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            self._run_ctl(["stop"], timeout=timeout, check=False)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.wait(timeout=10)

    def __enter__(self) -> RabbitNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        """The environment the server and rabbitmqctl run with."""
        env = dict(os.environ)
        env.update(
            HOME=str(self.base_dir / "home"),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS=self.host,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.base_dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base_dir / "log"),
            RABBITMQ_CONFIG_FILE=str(self.base_dir / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base_dir / "enabled_plugins"),
            # An empty file: ignore /etc/rabbitmq/rabbitmq-env.conf of the machine.
            RABBITMQ_CONF_ENV_FILE=str(self.base_dir / "rabbitmq-env.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.base_dir / "advanced.config"),
            ERL_CRASH_DUMP=str(self.base_dir / "erl_crash.dump"),
        )
        return env

    def _prepare_dirs(self) -> None:
        for sub in ("home", "mnesia", "log"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        cookie = self.base_dir / "home" / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(16))
            cookie.chmod(0o400)  # Erlang refuses a cookie others can read
        (self.base_dir / "rabbitmq.conf").write_text(_conf_text(self.port))
        # The broker checks consumer_timeout on each channel tick (60 s by default):
        # tick every second so the short test timeout fires when it is due.
        (self.base_dir / "advanced.config").write_text(
            "[{rabbit, [{channel_tick_interval, 1000}]}].\n")
        (self.base_dir / "enabled_plugins").write_text("[].\n")
        (self.base_dir / "rabbitmq-env.conf").write_text("")

    def _await_startup(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RabbitUnavailable(
                    "rabbitmq-server exited with %s\n%s" % (self._proc.returncode, self.log_tail())
                )
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop(timeout=10)
                raise RabbitUnavailable(
                    "node %s did not boot within %.0f s\n%s"
                    % (self.nodename, timeout, self.log_tail())
                )
            wait = max(1, min(int(left), 15))
            result = self._run_ctl(
                ["await_startup", "--timeout", str(wait)], timeout=wait + 15, check=False
            )
            if result.returncode == 0:
                return
            time.sleep(0.5)  # the node is not even reachable yet; ctl failed fast

    def _start_watchdog(self, pid: int) -> None:
        # Runs inside the node: a test run killed by SIGKILL or a timeout cannot stop its
        # node, so the node checks every second that its owner still exists.
        code = (
            'P = "/proc/%d", '
            "W = fun Loop() -> timer:sleep(1000), "
            "case filelib:is_dir(P) of true -> Loop(); false -> erlang:halt(0) end end, "
            "spawn(W), ok." % pid
        )
        self.ctl("eval", code)

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's stdout and log files, for error messages."""
        parts = []
        for path in [self.base_dir / "server.out", *sorted((self.base_dir / "log").glob("*.log"))]:
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append("==> %s <==\n%s" % (path, "\n".join(text)))
        return "\n".join(parts)

    # -- rabbitmqctl ---------------------------------------------------------------------

    def _run_ctl(
        self, args: list[str], timeout: float = CTL_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        assert self._ctl is not None
        try:
            result = subprocess.run(
                [self._ctl, "-n", self.nodename, *args],
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            if check:
                raise RabbitUnavailable("rabbitmqctl %s timed out" % " ".join(args)) from exc
            return subprocess.CompletedProcess(args, 124, "", "timed out")
        if check and result.returncode != 0:
            raise RabbitUnavailable(
                "rabbitmqctl %s failed (%d): %s%s"
                % (" ".join(args), result.returncode, result.stdout, result.stderr)
            )
        return result

    def ctl(self, *args: str) -> str:
        """Run ``rabbitmqctl -n <node> ARGS...`` against this node; return its stdout.

        Raises:
            RabbitUnavailable: the command failed or timed out.
        """
        return self._run_ctl(list(args)).stdout

    def stop_app(self) -> None:
        """Stop the RabbitMQ application (the Erlang node stays up): a broker outage."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        """Start the RabbitMQ application again after :meth:`stop_app`."""
        self.ctl("start_app")
        self.ctl("await_startup")

    def vm_pid(self) -> int:
        """The OS pid of the node's Erlang VM (``beam.smp``)."""
        return int(self.ctl("eval", "os:getpid().").strip().strip('"'))

    def kill_vm(self, timeout: float = 30.0) -> None:
        """SIGKILL the node's Erlang VM: a broker that dies without a word.

        Call :meth:`restart` to bring it back with its data (durable queues, persistent
        messages).
        """
        pid = self.vm_pid()
        os.kill(pid, signal.SIGKILL)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(self._proc)
                self._proc.wait(timeout=10)
        self._proc = None

    def restart(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Start the node again after :meth:`kill_vm` (same name, port and data)."""
        self.start(timeout)

    def freeze(self) -> int:
        """SIGSTOP the node's VM: a broker that hangs with its sockets open.

        Returns the pid for :meth:`thaw`. While frozen, :meth:`ctl` hangs: thaw first.
        """
        pid = self.vm_pid()
        os.kill(pid, signal.SIGSTOP)
        return pid

    def thaw(self, pid: int) -> None:
        """SIGCONT the VM :meth:`freeze` stopped (harmless when it runs)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    def close_connections(self, vhost: str, why: str = "closed by a test") -> None:
        """Close every client connection of ``vhost`` from the broker's side."""
        self.ctl("close_all_connections", "-p", vhost, why)

    def set_memory_alarm(self, on: bool) -> None:
        """Raise (``on=True``) or clear a memory alarm; publishers are blocked meanwhile."""
        self.ctl("set_vm_memory_high_watermark", ALARM_WATERMARK if on else NORMAL_WATERMARK)

    # -- vhosts and queues ---------------------------------------------------------------

    def new_vhost(self) -> str:
        """Create a fresh vhost with full permissions for ``guest``; return its name."""
        with self._lock:
            self._vhost_counter += 1
            name = "rbit-test-%d-%s" % (self._vhost_counter, secrets.token_hex(3))
        # One eval instead of two rabbitmqctl runs: each run costs ~0.4 s of CLI start-up.
        code = (
            'ok = rabbit_vhost:add(<<"%s">>, <<"rbit-tests">>), '
            'ok = rabbit_auth_backend_internal:set_permissions(<<"guest">>, <<"%s">>, '
            '<<".*">>, <<".*">>, <<".*">>, <<"rbit-tests">>), ok.' % (name, name)
        )
        if self._run_ctl(["eval", code], check=False).returncode != 0:
            self.ctl("add_vhost", name)
            self.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return name

    def delete_vhost(self, name: str) -> None:
        """Delete a vhost and everything in it."""
        self.ctl("delete_vhost", name)

    def reset(self, vhost: str | None = None) -> None:
        """Undo what a test may have left: start the app if stopped, clear a memory
        alarm, and delete ``vhost`` if given. One rabbitmqctl run when all goes well."""
        code = (
            "case rabbit:is_running() of false -> ok = rabbit:start(); true -> ok end, "
            "ok = vm_memory_monitor:set_vm_memory_high_watermark(%s), " % NORMAL_WATERMARK
        )
        if vhost is not None:
            code += 'ok = rabbit_vhost:delete(<<"%s">>, <<"rbit-tests">>), ' % vhost
        if self._run_ctl(["eval", code + "ok."], check=False).returncode == 0:
            return
        if self.ctl("eval", "rabbit:is_running().").strip() != "true":
            self.start_app()
        self.set_memory_alarm(False)
        if vhost is not None and vhost in self.ctl("list_vhosts", "-q").split():
            self.delete_vhost(vhost)

    def list_queues(self, vhost: str = "/", blank: int | None = 0) -> dict[str, tuple[int, int]]:
        """Queues of ``vhost`` as ``{name: (messages_ready, messages_unacknowledged)}``.

        A count rabbitmqctl leaves blank (a queue too busy to answer in time, or down)
        reads as ``blank``.
        """
        out = self.ctl(
            "list_queues",
            "-p",
            vhost,
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        )
        queues = {}
        for line in out.splitlines():
            fields = line.rsplit("\t", 2)
            if len(fields) == 3:
                queues[fields[0]] = (_int(fields[1], blank), _int(fields[2], blank))
        return queues

    # -- addresses -----------------------------------------------------------------------

    def url(self, vhost: str = "/") -> str:
        """The ``amqp://`` URL of this node for ``vhost`` (user guest)."""
        return "amqp://guest:guest@%s:%d/%s" % (
            self.host,
            self.port,
            urllib.parse.quote(vhost, safe=""),
        )

    def amqp_settings(self, vhost: str = "/", **overrides: object) -> AmqpSettings:
        """:class:`rbit.config.AmqpSettings` pointing at this node (``overrides`` win)."""
        from rbit.config import AmqpSettings, HostAddress

        fields: dict[str, object] = {
            "hosts": (HostAddress(self.host, self.port),),
            "user": "guest",
            "password": "guest",
            "virtual_host": vhost,
        }
        fields.update(overrides)
        return AmqpSettings(**fields)  # type: ignore[arg-type]


class ExternalBroker:
    """A broker given by ``RBIT_TEST_AMQP_URL``: AMQP only, no ``rabbitmqctl``.

    Tests that need node control (outages, alarms, queue listings) fail with a
    clear message against it; :meth:`new_vhost` hands out the URL's own vhost.
    """

    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url)
        self.host = parts.hostname or "localhost"
        self.port = parts.port or 5672
        self.user = urllib.parse.unquote(parts.username or "guest")
        self.password = urllib.parse.unquote(parts.password or "guest")
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        self.vhost = urllib.parse.unquote(path) if path else "/"
        self.nodename = "external"

    def url(self, vhost: str = "/") -> str:
        return "amqp://%s:%s@%s:%d/%s" % (
            urllib.parse.quote(self.user, safe=""),
            urllib.parse.quote(self.password, safe=""),
            self.host,
            self.port,
            urllib.parse.quote(vhost, safe=""),
        )

    def amqp_settings(self, vhost: str = "/", **overrides: object) -> AmqpSettings:
        from rbit.config import AmqpSettings, HostAddress

        fields: dict[str, object] = {
            "hosts": (HostAddress(self.host, self.port),),
            "user": self.user,
            "password": self.password,
            "virtual_host": vhost,
        }
        fields.update(overrides)
        return AmqpSettings(**fields)  # type: ignore[arg-type]

    def new_vhost(self) -> str:
        return self.vhost

    def delete_vhost(self, name: str) -> None:
        """Nothing to do: the shared vhost is not ours to delete."""

    def reset(self, vhost: str | None = None) -> None:
        """Nothing to do: an external broker is not ours to repair."""

    def _unsupported(self, *args: object, **kwargs: object) -> None:
        raise RabbitUnavailable(
            "this test needs a private RabbitMQ node (rabbitmqctl); "
            "RBIT_TEST_AMQP_URL only gives AMQP access"
        )

    ctl = stop_app = start_app = set_memory_alarm = list_queues = _unsupported  # type: ignore
    kill_vm = restart = freeze = thaw = close_connections = vm_pid = _unsupported  # type: ignore


def _int(text: str, blank: int | None = 0) -> int | None:
    try:
        return int(text)
    except ValueError:
        return blank  # e.g. "" for a queue that is down


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def serve(argv: list[str] | None = None) -> int:
    """``python -m tests.rabbit serve``: run a node until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m tests.rabbit")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--dir", required=True, help="data, logs and config go here")
    parser.add_argument("--port", type=int, default=None, help="AMQP port (default: free)")
    parser.add_argument("--name", default=None, help="Erlang node name")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node = RabbitNode(Path(args.dir), name=args.name, port=args.port)
    try:
        node.start()
    except RabbitUnavailable as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 1
    try:
        print(node.url(), flush=True)
        while not stop.wait(1.0) and node.running:
            pass
    finally:
        node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(serve())
