"""A three-node RabbitMQ cluster on loopback, for the cluster tests (and for trying it).

Each node is a :class:`rabbit.RabbitNode` (Debian's ``rabbitmq-server``, run as the
current user) with its own node name, AMQP and distribution ports and data directory;
the nodes share one Erlang cookie, the second and third join the first
(``stop_app``, ``join_cluster``, ``start_app``), and :meth:`Cluster.start` returns once
``cluster_status`` shows every node running. :meth:`Cluster.stop` stops the nodes and
removes their directories. epmd, the Erlang port mapper every node on the machine
shares, is left running, as the single-node fixture leaves it.

Two cores carry the three nodes and the test workers: the nodes run with one
scheduler each and without busy-waiting (:data:`ERL_ARGS`), which keeps an idle
cluster near 0 % CPU.

Run ``python -m tests.cluster start|stop|status --dir DIR`` (or ``scripts/cluster``)
to keep a cluster up between commands; ``start`` prints the ``[amqp] url`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

try:
    from rabbit import _CTL_DIST_OFFSET, RabbitNode, RabbitUnavailable, free_port
except ImportError:  # run as python -m tests.cluster
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from rabbit import _CTL_DIST_OFFSET, RabbitNode, RabbitUnavailable, free_port

#: Erlang flags of every node: no busy-waiting schedulers, one scheduler (two cores).
ERL_ARGS = "+sbwt none +sbwtdcpu none +sbwtdio none +S 1:1"
SIZE = 3
FORM_TIMEOUT = 120.0


class ClusterNode(RabbitNode):
    """A :class:`RabbitNode` with the cluster's cookie and the quiet Erlang flags."""

    def __init__(self, base_dir: Path, cookie: str, **kwargs: object) -> None:
        super().__init__(base_dir, **kwargs)  # type: ignore[arg-type]
        self.cookie = cookie

    def env(self) -> dict[str, str]:
        env = super().env()
        env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = ERL_ARGS
        return env

    def _prepare_dirs(self) -> None:
        cookie = self.base_dir / "home" / ".erlang.cookie"
        if not cookie.exists():
            cookie.parent.mkdir(parents=True, exist_ok=True)
            cookie.write_text(self.cookie)
            cookie.chmod(0o400)  # Erlang refuses a cookie others can read
        super()._prepare_dirs()

    def running_nodes(self) -> list[str]:
        """The nodes this one sees running (``cluster_status``), or [] when it cannot say."""
        result = self._run_ctl(["cluster_status", "--formatter", "json"], check=False,
                               timeout=30)
        if result.returncode != 0:
            return []
        try:
            return list(json.loads(result.stdout).get("running_nodes", []))
        except ValueError:
            return []

    def signal_vm(self, pid: int, sig: int, timeout: float = 60.0) -> None:
        """Send ``sig`` to the VM (pid from :meth:`vm_pid`) and wait until it is gone.

        SIGTERM is a clean shutdown (as ``rabbitmqctl stop`` or systemd does it: the
        node closes its client connections and leaves the cluster), SIGKILL a crash.
        The pid is asked for beforehand because ``rabbitmqctl`` takes seconds on a
        loaded machine: the signal itself then lands at once.
        """
        os.kill(pid, sig)
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def start_fresh(self, tries: int = 3) -> None:
        """First start; on a port taken meanwhile (free ports are only free when
        picked: other nodes and rabbitmqctl runs share the machine), try new ones."""
        for attempt in range(tries):
            try:
                self.start()
                return
            except RabbitUnavailable as exc:
                if "already_used" not in str(exc) and "eaddrinuse" not in str(exc) \
                        or attempt == tries - 1:
                    raise
            self.port = free_port()
            self.dist_port = free_port(upper=65535 - _CTL_DIST_OFFSET - 20)

    def start_again(self, tries: int = 3) -> None:
        """Start the node again with its data: it rejoins the cluster by itself.

        Its AMQP port stays (the clients' URLs name it); a distribution port taken
        meanwhile is replaced.
        """
        for attempt in range(tries):
            try:
                self.start()
                return
            except RabbitUnavailable as exc:
                if "dist_port_already_used" not in str(exc) or attempt == tries - 1:
                    raise
            self.dist_port = free_port(upper=65535 - _CTL_DIST_OFFSET - 20)


class Cluster:
    """Three clustered :class:`ClusterNode` s under ``base_dir``.

    Args:
        base_dir: One sub-directory per node is created there.
        watch_pid: Each node halts itself once this process is gone (0: never, for
            a cluster that outlives the command starting it).
        prefix: Node names are ``<prefix>-<n>@localhost``.
        ports: AMQP ports (default: free ones).
    """

    def __init__(self, base_dir: Path, *, watch_pid: int | None = None,
                 prefix: str | None = None, ports: list[int] | None = None,
                 cookie: str | None = None) -> None:
        self.base_dir = Path(base_dir).resolve()
        prefix = prefix or f"rbit-cluster-{os.getpid()}"
        cookie = cookie or secrets.token_hex(16)
        ports = ports or [free_port() for _ in range(SIZE)]
        self.nodes = [
            ClusterNode(self.base_dir / f"node{n}", cookie, name=f"{prefix}-{n}@localhost",
                        port=ports[n - 1], watch_pid=watch_pid)
            for n in range(1, SIZE + 1)
        ]
        # A port released by free_port() may be handed out again at once: no two alike.
        while len({p for node in self.nodes for p in (node.port, node.dist_port)}) < 2 * SIZE:
            for node in self.nodes[1:]:
                node.dist_port = free_port(upper=65535 - _CTL_DIST_OFFSET - 20)
                if ports is None:
                    node.port = free_port()

    @property
    def host(self) -> str:
        return self.nodes[0].host

    def start(self, timeout: float = FORM_TIMEOUT) -> None:
        """Start the nodes, join them into one cluster, wait until all run.

        Raises:
            RabbitUnavailable: A node did not boot or the cluster did not form.
        """
        first = self.nodes[0]
        errors: list[Exception] = []

        def boot(node: ClusterNode) -> None:
            try:
                node.start_fresh()
            except RabbitUnavailable as exc:
                errors.append(exc)

        # In parallel: each boot is mostly waiting (about 20 s on two busy cores).
        threads = [threading.Thread(target=boot, args=(node,)) for node in self.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        for node in self.nodes[1:]:
            if first.nodename in node.running_nodes():
                continue  # joined already (a restart of a kept cluster)
            node.ctl("stop_app")
            node.ctl("join_cluster", first.nodename)
            node.ctl("start_app")
            node.ctl("await_startup")
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = FORM_TIMEOUT) -> None:
        """Wait until every node sees all :data:`SIZE` nodes running."""
        names = {node.nodename for node in self.nodes}
        deadline = time.monotonic() + timeout
        while True:
            seen = [set(node.running_nodes()) for node in self.nodes if node.running]
            if len(seen) == SIZE and all(s == names for s in seen):
                return
            if time.monotonic() > deadline:
                raise RabbitUnavailable(f"the cluster did not form within {timeout:.0f} s: "
                                        f"running nodes seen: {seen}")
            time.sleep(0.5)  # polling interval of a bounded wait

    def stop(self, remove: bool = True) -> None:
        """Stop every node (the joiners first); remove the directories when asked."""
        for node in reversed(self.nodes):
            if node.running:
                node.stop()
            else:  # started by another process (scripts/cluster): ask the node itself
                node._run_ctl(["stop"], check=False, timeout=60)
        if remove:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def url(self, vhost: str = "/", order: list[int] | None = None) -> str:
        """The ``[amqp] url`` value naming every node (in ``order``, indexes from 0)."""
        order = order if order is not None else list(range(SIZE))
        return ", ".join(self.nodes[i].url(vhost) for i in order)

    def node_named(self, nodename: str) -> ClusterNode:
        return next(node for node in self.nodes if node.nodename == nodename)

    def any_running(self) -> ClusterNode:
        return next(node for node in self.nodes if node.running)

    def new_vhost(self) -> str:
        return self.any_running().new_vhost()

    def queue_leader(self, vhost: str, queue: str) -> str:
        """The node name of quorum queue ``queue``'s leader."""
        out = self.any_running().ctl("list_queues", "-p", vhost, "-q", "--no-table-headers",
                                     "name", "leader")
        for line in out.splitlines():
            fields = line.split("\t")
            if fields[0] == queue and len(fields) == 2 and "@" in fields[1]:
                return fields[1]
        raise RabbitUnavailable(f"no quorum queue {queue} with a leader in vhost {vhost}")

    def queue_members(self, vhost: str, queue: str) -> tuple[str, str, str]:
        """``(leader, members, online)`` of quorum queue ``queue``, as rabbitmqctl says."""
        out = self.any_running().ctl("list_queues", "-p", vhost, "-q", "--no-table-headers",
                                     "name", "leader", "members", "online")
        for line in out.splitlines():
            fields = line.split("\t")
            if fields[0] == queue and len(fields) == 4:
                return fields[1], fields[2], fields[3]
        return "", "", ""

    def fully_replicated(self, vhost: str, queue: str) -> bool:
        """Whether every node holds an online replica of quorum queue ``queue``."""
        _leader, _members, online = self.queue_members(vhost, queue)
        return all(node.nodename in online for node in self.nodes)

    def describe(self) -> dict[str, object]:
        return {"dir": str(self.base_dir), "url": self.url(),
                "nodes": [{"name": n.nodename, "port": n.port, "dist_port": n.dist_port}
                          for n in self.nodes]}


# -------------------------------------------------------------------------- command line


def quorum_worker_config(tmp_path: Path, cluster: Cluster, vhost: str, name: str,
                         first: int, sections: dict[str, dict]) -> Path:
    """The config of a quorum worker ``name`` whose ``url`` lists the nodes from node
    ``first`` on (each worker of a test a different order), plus ``sections`` (its
    runners and schedules). Written to ``tmp_path/<name>.ini``."""
    order = [(first + i) % SIZE for i in range(SIZE)]
    sections = {
        "rbit": {"name": name, "polling_time": 5, "shutdown_grace": 5, "queue_type": "quorum",
                 "state_dir": tmp_path / f"state-{name}"},
        # reconnect_max_delay stays at its default (30 s): the tests' bounds hold anyway.
        "amqp": {"url": cluster.url(vhost, order), "connect_timeout": 2, "heartbeat": 5},
        **sections,
    }
    text = "".join(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) + "\n"
                   for section, keys in sections.items())
    path = tmp_path / f"{name}.ini"
    path.write_text(text)
    return path


def _state(base: Path) -> dict:
    path = base / "cluster.json"
    if not path.exists():
        raise SystemExit(f"no cluster in {base} (start one first)")
    return json.loads(path.read_text())


def _from_state(base: Path) -> Cluster:
    state = _state(base)
    cluster = Cluster(base, watch_pid=0, prefix=state["prefix"], ports=state["ports"],
                      cookie="unused")  # the cookie file is on disk already
    for node, saved in zip(cluster.nodes, state["nodes"], strict=True):
        node.dist_port = saved["dist_port"]
    return cluster


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.cluster start|stop|status --dir DIR``."""
    parser = argparse.ArgumentParser(prog="scripts/cluster")
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--dir", required=True, help="node directories go here")
    args = parser.parse_args(argv)
    base = Path(args.dir).resolve()
    if args.command == "start":
        if (base / "cluster.json").exists():
            print(f"a cluster is already described in {base}; stop it first", file=sys.stderr)
            return 1
        prefix = f"rbit-cluster-{secrets.token_hex(3)}"
        cluster = Cluster(base, watch_pid=0, prefix=prefix)
        try:
            cluster.start()
        except RabbitUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            cluster.stop()
            return 1
        state = {**cluster.describe(), "prefix": prefix,
                 "ports": [n.port for n in cluster.nodes]}
        (base / "cluster.json").write_text(json.dumps(state, indent=2))
        print(f"url = {cluster.url()}")
        return 0
    cluster = _from_state(base)
    if args.command == "stop":
        cluster.stop()
        return 0
    for node in cluster.nodes:
        running = node.running_nodes()
        print(f"{node.nodename} port {node.port}: "
              f"{'sees ' + ', '.join(running) if running else 'not running'}")
    return 0 if all(len(n.running_nodes()) == SIZE for n in cluster.nodes) else 3


if __name__ == "__main__":
    sys.exit(main())
