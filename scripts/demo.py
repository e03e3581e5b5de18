"""Run rbit for real: a broker, a worker, two jobs, and their statuses as they happen.

Started by ``scripts/demo`` (which installs what is needed first). Steps:

1. Use the broker at ``RBIT_DEMO_AMQP_URL`` or on 127.0.0.1:5672; when neither answers,
   start a private RabbitMQ node with its data under ``.rbit-demo/node``.
2. Write ``.rbit-demo/rbit.ini`` with a ``python!`` runner and a ``shell!`` runner.
3. Start ``rbit .rbit-demo/rbit.ini --poll-time 5`` (its log: ``.rbit-demo/rbit.log``).
4. Watch the ``rbit.status`` exchange, publish a PyBit BuildRequest and a shell job the
   way PyBit does, and print every status until both jobs are finished.
5. Stop rbit with SIGTERM, stop the node if the demo started it.

Exit status 0 when both jobs end Done within the time limit, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pika
import pika.exceptions

from rbitext.examples import build_request_body

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / ".rbit-demo"
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
PYBIT_EXCHANGE = "pybit"
STATUS_EXCHANGE = "rbit.status"
JOB_TIMEOUT = 60.0
SETUP_TIMEOUT = 60.0
FINAL = {"Done", "Failed", "Cancelled"}

PDF_QUEUE = "cnx_any_latex_pdf"
SHELL_QUEUE = "cnx_any_shell_txt"
PDF_JOB_ID = "4242"  # the BuildRequest's job.id: rbit takes the job id from there
SHELL_JOB_ID = "demo-shell-1"  # given as the AMQP message_id

CONFIG = """\
# Written by scripts/demo.
[rbit]
name = rbit-demo
distribution = cnx
architecture = any
suites = latex, shell
format = pdf
polling_time = 5

[amqp]
url = {url}

[status]
sinks = log, amqp
exchange = {status_exchange}

[runner:{pdf_queue}]
runner = python!rbitext.examples:hello
name = demo

[runner:{shell_queue}]
# %ID and %BODY become whole arguments (the job id and the path of the body's file);
# a line written to $RBIT_STATUS_FD is reported as a status.
runner = shell!/bin/sh -c 'echo "Building job $1: $(wc -c < "$2") bytes of body" >/dev/fd/$RBIT_STATUS_FD' demo %ID %BODY
"""


def log(text: str) -> None:
    print("[demo] %s" % text, flush=True)


def reachable(url: str) -> bool:
    params = pika.URLParameters(url)
    params.connection_attempts = 1
    params.socket_timeout = 3
    try:
        pika.BlockingConnection(params).close()
    except pika.exceptions.AMQPError:
        return False
    return True


def start_private_node():
    sys.path.insert(0, str(ROOT))
    from tests.rabbit import RabbitNode

    node_dir = DEMO_DIR / "node"
    shutil.rmtree(node_dir, ignore_errors=True)
    node = RabbitNode(node_dir, name="rbit-demo-%d@localhost" % os.getpid())
    log("no broker on 127.0.0.1:5672; starting a private RabbitMQ node in %s" % node_dir)
    node.start()
    log("private node %s listening on 127.0.0.1:%d" % (node.nodename, node.port))
    return node


def start_worker(config: Path) -> subprocess.Popen:
    rbit = shutil.which("rbit", path=str(Path(sys.executable).parent)) or "rbit"
    out = open(DEMO_DIR / "rbit.log", "wb")  # noqa: SIM115 - handed to the child
    log("starting: %s %s --poll-time 5  (log: %s)" % (rbit, config, DEMO_DIR / "rbit.log"))
    try:
        return subprocess.Popen(
            [rbit, str(config), "--poll-time", "5"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    finally:
        out.close()


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        log("stopping rbit (SIGTERM)")
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            log("rbit did not stop in 40 s; killing it")
            proc.kill()
            proc.wait()
    log("rbit exited with status %s" % proc.returncode)


def worker_log_tail(lines: int = 30) -> str:
    path = DEMO_DIR / "rbit.log"
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Watcher:
    """One AMQP connection: waits for the worker's topology, publishes, reads statuses."""

    def __init__(self, url: str, worker: subprocess.Popen):
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.worker = worker
        self.channel = self.connection.channel()

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def _exists(self, kind: str, name: str) -> bool:
        try:
            if kind == "exchange":
                self.channel.exchange_declare(name, passive=True)
            else:
                self.channel.queue_declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            self.channel = self.connection.channel()  # a 404 closes the channel
            return False
        return True

    def wait_for_topology(self, deadline: float) -> None:
        """Wait until rbit has declared its exchanges and queues."""
        wanted = [
            ("exchange", STATUS_EXCHANGE),
            ("exchange", PYBIT_EXCHANGE),
            ("queue", PDF_QUEUE),
            ("queue", SHELL_QUEUE),
        ]
        while not all(self._exists(kind, name) for kind, name in wanted):
            if self.worker.poll() is not None:
                raise RuntimeError(
                    "rbit exited with %s before it was ready:\n%s"
                    % (self.worker.returncode, worker_log_tail())
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "rbit did not declare its queues within %.0f s:\n%s"
                    % (SETUP_TIMEOUT, worker_log_tail())
                )
            self.connection.sleep(0.5)  # keeps the connection serviced while waiting

    def subscribe(self) -> str:
        result = self.channel.queue_declare("", exclusive=True, auto_delete=True)
        queue = result.method.queue
        self.channel.queue_bind(queue, STATUS_EXCHANGE, routing_key="#")
        return queue

    def publish_jobs(self) -> None:
        self.channel.confirm_delivery()
        # PyBit's way: the direct exchange "pybit", the dotted route, a jsonpickle body.
        self._publish(
            "cnx.any.latex.pdf",
            build_request_body(int(PDF_JOB_ID), timestamp=int(time.time())),
            pika.BasicProperties(content_type="application/json", delivery_mode=2),
        )
        log("published PyBit BuildRequest job %s (route cnx.any.latex.pdf)" % PDF_JOB_ID)
        self._publish(
            "cnx.any.shell.txt",
            b"hello from the demo",
            pika.BasicProperties(
                message_id=SHELL_JOB_ID, content_type="text/plain", delivery_mode=2
            ),
        )
        log("published shell job %s (route cnx.any.shell.txt)" % SHELL_JOB_ID)

    def _publish(self, route: str, body: bytes, props: pika.BasicProperties) -> None:
        # mandatory: a job nobody's queue is bound for yet comes back instead of vanishing
        # (rbit binds right after declaring, so the first try can race it).
        for _ in range(20):
            try:
                self.channel.basic_publish(PYBIT_EXCHANGE, route, body, props, mandatory=True)
                return
            except pika.exceptions.UnroutableError:
                self.connection.sleep(0.5)
        raise RuntimeError("no queue is bound to route %s on exchange %s" % (route, PYBIT_EXCHANGE))

    def watch(self, queue: str, jobs: set[str], timeout: float) -> dict[str, dict]:
        """Print status events until every job in ``jobs`` is final; return the finals."""
        finals: dict[str, dict] = {}
        deadline = time.monotonic() + timeout
        for method, _props, body in self.channel.consume(
            queue, auto_ack=True, inactivity_timeout=1.0
        ):
            if method is not None:
                event = json.loads(body)
                print_event(method.routing_key, event)
                if event.get("job_id") in jobs and event.get("status") in FINAL:
                    finals[event["job_id"]] = event
            if set(finals) >= jobs or time.monotonic() > deadline:
                break
            if self.worker.poll() is not None:
                log("rbit exited with %s while jobs were open" % self.worker.returncode)
                break
        self.channel.cancel()
        return finals


def print_event(routing_key: str, event: dict) -> None:
    print(
        "  status %-10s job=%-14s queue=%-18s worker=%s  %s  [%s]"
        % (
            event.get("status"),
            event.get("job_id"),
            event.get("queue"),
            event.get("worker"),
            event.get("message", ""),
            routing_key,
        ),
        flush=True,
    )


def run_demo(url: str) -> int:
    config = DEMO_DIR / "rbit.ini"
    config.write_text(
        CONFIG.format(
            url=url, status_exchange=STATUS_EXCHANGE, pdf_queue=PDF_QUEUE, shell_queue=SHELL_QUEUE
        )
    )
    log("wrote %s" % config)
    worker = start_worker(config)
    watcher = None
    try:
        watcher = Watcher(url, worker)
        watcher.wait_for_topology(time.monotonic() + SETUP_TIMEOUT)
        queue = watcher.subscribe()
        watcher.publish_jobs()
        jobs = {PDF_JOB_ID, SHELL_JOB_ID}
        finals = watcher.watch(queue, jobs, JOB_TIMEOUT)
    except (RuntimeError, pika.exceptions.AMQPError) as exc:
        log("error: %s" % (exc or type(exc).__name__))
        return 1
    finally:
        if watcher is not None:
            watcher.close()
        stop_worker(worker)
    return report(jobs, finals)


def report(jobs: set[str], finals: dict[str, dict]) -> int:
    ok = True
    for job in sorted(jobs):
        event = finals.get(job)
        if event is None:
            log("job %s: no final status within %.0f s" % (job, JOB_TIMEOUT))
            ok = False
        else:
            log("job %s: %s %s" % (job, event["status"], event.get("message", "")))
            ok = ok and event["status"] == "Done"
    log("demo %s" % ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1


def main() -> int:
    DEMO_DIR.mkdir(exist_ok=True)
    url = os.environ.get("RBIT_DEMO_AMQP_URL")
    node = None
    if url:
        if not reachable(url):
            log("error: no broker answers at RBIT_DEMO_AMQP_URL")
            return 1
    elif reachable(DEFAULT_URL):
        url = DEFAULT_URL
        log("using the broker on 127.0.0.1:5672")
    else:
        node = start_private_node()
        url = node.url()
    try:
        return run_demo(url)
    finally:
        if node is not None:
            log("stopping the private RabbitMQ node")
            node.stop()


if __name__ == "__main__":
    sys.exit(main())
