"""Connecting: where to, when to try again, and the channels of a connection.

:func:`parameters` turns :class:`~rbit.config.AmqpSettings` into pika's connection
parameters for one host of the list (TLS included). :class:`HostRotation` decides
which host comes next and how long to wait first: the next host of the list at once,
then, after a whole round failed, with exponential backoff and jitter. With several
hosts, once one of them accepted a connection whose set-up then failed, the pause
stays at most :data:`ANSWERED_MAX_DELAY`. A first round
that fails entirely ends the broker's start (the worker exits "broker unreachable");
once connected, it reconnects until stopped.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pika
from pika import spec

from rbit import backoff
from rbit.config import AmqpSettings

if TYPE_CHECKING:
    from rbit.amqp.broker import Broker

log = logging.getLogger(__name__)

_RESOURCE_LOCKED = 405  # AMQP reply code: an exclusive queue held by another connection
#: With several hosts, the longest pause once a broker of the list has answered since
#: the last complete connection (seconds). In a cluster, what fails after a node loss
#: is the set-up through another node (a queue electing its leader), which heals in
#: seconds: backing off to ``reconnect_max_delay`` would idle the worker far longer.
ANSWERED_MAX_DELAY = 3.0


def parameters(amqp: AmqpSettings, index: int, name: str,
               heartbeat: int) -> pika.ConnectionParameters:
    """The pika connection parameters for host number ``index`` of ``amqp.hosts``.

    Args:
        amqp: The ``[amqp]`` settings.
        index: Which host of the list.
        name: Connection name shown in the RabbitMQ management UI.
        heartbeat: Heartbeat interval in seconds (0: none).
    """
    address = amqp.hosts[index]
    ssl_options = None
    if amqp.tls:
        context = ssl.create_default_context(cafile=amqp.tls_ca_file)
        if amqp.tls_cert_file:
            context.load_cert_chain(amqp.tls_cert_file, amqp.tls_key_file)
        if not amqp.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        ssl_options = pika.SSLOptions(context, server_hostname=address.host)
    return pika.ConnectionParameters(
        host=address.host,
        port=address.port,
        virtual_host=amqp.virtual_host,
        credentials=pika.PlainCredentials(amqp.user, amqp.password),
        heartbeat=heartbeat,
        ssl_options=ssl_options,
        connection_attempts=1,
        socket_timeout=amqp.connect_timeout,
        stack_timeout=amqp.connect_timeout * 2,
        client_properties={"connection_name": name},
    )


class HostRotation:
    """The host to connect to next, and the pause before it.

    Args:
        amqp: The hosts (tried in order) and the reconnect delays.
        rng: Random source in [0, 1) for the jitter.
    """

    def __init__(self, amqp: AmqpSettings, rng: Callable[[], float]) -> None:
        self._amqp = amqp
        self._rng = rng
        self.index = 0
        self._failures = 0
        self._answered = False  # a broker accepted a connection since the last connected()
        self.ever_connected = False

    @property
    def address(self) -> str:
        host = self._amqp.hosts[self.index]
        return f"{host.host}:{host.port}"

    def connected(self) -> None:
        """A connection is up: the next failure starts a new round, without delay."""
        self.ever_connected = True
        self._failures = 0
        self._answered = False

    def opened(self) -> None:
        """The current host accepted the connection (its set-up may still fail)."""
        self._answered = True

    def failed(self) -> float | None:
        """The current host failed: move to the next one.

        Returns:
            The pause before connecting to it in seconds, or None when a first round
            of attempts failed before any connection (the start has failed).
        """
        hosts = len(self._amqp.hosts)
        self._failures += 1
        self.index = (self.index + 1) % hosts
        if not self.ever_connected and self._failures >= hosts:
            return None
        # Try the next host at once; back off only after a whole round failed.
        if self.index != 0 and hosts != 1:
            return 0.0
        rounds = (self._failures - 1) // hosts
        cap = self._amqp.reconnect_max_delay
        if self._answered and hosts > 1:
            cap = min(cap, ANSWERED_MAX_DELAY)
        return backoff.delay(rounds + 1, self._amqp.reconnect_delay, cap,
                             spread=(0.5, 1.5), rng=self._rng)


class Connector:
    """Opens the broker's connection and its channels, and reconnects.

    On open: the publish channel (in confirm mode), the lease channel, the topology,
    then the consume channel, after which the broker starts consuming. Each
    connection is a new *generation* of the broker: a delivery carries the generation
    it came from, and settling one of an older generation is a no-op, because its
    delivery tag means nothing on the new channel (the broker has already put that
    message back in its queue). So a job that was running while the connection
    dropped is finished by its runner, its ack is dropped as stale, and the broker
    delivers it again: it may run twice (at-least-once), never zero times.

    Args:
        broker: The hub whose connection-scoped state this fills.
        amqp: Hosts, credentials and reconnect delays.
        name: Connection name shown in the RabbitMQ management UI.
        heartbeat: Heartbeat interval in seconds (0: none).
        rng: Random source for the reconnect jitter.
        connection_class: pika's connection adapter to use.
        pika_loop: The loop given to that adapter.
    """

    def __init__(self, broker: Broker, amqp: AmqpSettings, *, name: str, heartbeat: int,
                 rng: Callable[[], float], connection_class: Any, pika_loop: Any) -> None:
        self._broker = broker
        self._amqp = amqp
        self._name = name
        self._heartbeat = heartbeat
        self._hosts = HostRotation(amqp, rng)
        self._connection_class = connection_class
        self._pika_loop = pika_loop

    def connect(self) -> None:
        broker = self._broker
        if broker.stopping:
            broker.ioloop.stop()
            return
        params = parameters(self._amqp, self._hosts.index, self._name, self._heartbeat)
        log.debug("connecting to %s:%s", params.host, params.port)
        broker.connection = self._connection_class(
            parameters=params,
            on_open_callback=self._on_open,
            on_open_error_callback=self._on_open_error,
            on_close_callback=lambda _connection, reason: broker.on_closed(reason),
            custom_ioloop=self._pika_loop,
        )

    def close(self) -> None:
        conn = self._broker.connection
        if conn is not None and not (conn.is_closing or conn.is_closed):
            conn.close()

    def _on_open_error(self, _connection, error) -> None:
        address = self._hosts.address
        log.warning("cannot connect to %s: %s", address, error or type(error).__name__)
        self._broker.connection = None
        self.schedule_reconnect(f"{address}: {error}")

    def schedule_reconnect(self, reason: str) -> None:
        broker = self._broker
        delay = self._hosts.failed()
        if delay is None:
            broker.fail_start(reason)
        elif broker.stopping:
            broker.ioloop.stop()
        else:
            log.info("reconnecting in %.1f s", delay)
            broker.ioloop.call_later(delay, self.connect)

    def _on_open(self, connection) -> None:
        self._hosts.opened()
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        connection.channel(on_open_callback=self._on_publish_channel)

    def _on_blocked(self, *_args) -> None:
        log.warning("broker blocked this connection (resource alarm); "
                    "publishing pauses until it clears")
        self._broker.blocked = True  # fail_fast publishes are refused meanwhile

    def _on_unblocked(self, *_args) -> None:
        log.warning("broker unblocked this connection; publishing resumes")
        self._broker.blocked = False

    def _on_publish_channel(self, channel) -> None:
        broker = self._broker
        broker.publish_channel = channel
        channel.add_on_close_callback(self.on_channel_closed)
        channel.add_on_return_callback(broker.publisher.on_return)  # mandatory publishes
        channel.confirm_delivery(
            broker.publisher.on_confirm,
            callback=lambda _f: broker.connection.channel(
                on_open_callback=self._on_lease_channel))

    def _on_lease_channel(self, channel) -> None:
        broker = self._broker
        broker.lease_channel = channel
        channel.add_on_close_callback(self.on_channel_closed)
        channel.add_callback(broker.leases.on_empty, [spec.Basic.GetEmpty], one_shot=False)
        broker.declarer.declare_all(
            lambda: broker.connection.channel(on_open_callback=self._on_consume_channel))

    def _on_consume_channel(self, channel) -> None:
        broker = self._broker
        broker.consume_channel = channel
        channel.add_on_close_callback(self.on_channel_closed)
        channel.add_on_cancel_callback(broker.consumers.on_cancelled)
        channel.add_callback(broker.poller.on_get_empty, [spec.Basic.GetEmpty], one_shot=False)
        self._hosts.connected()
        broker.generation += 1
        log.info("connected to %s (vhost %s)", self._hosts.address, self._amqp.virtual_host)
        broker.on_connected()

    def on_channel_closed(self, channel, reason) -> None:
        broker = self._broker
        locked = getattr(reason, "reply_code", None) == _RESOURCE_LOCKED
        if locked and not self._hosts.ever_connected:
            # An exclusive queue (the worker's command queue) is another connection's:
            # another worker of the same name runs. Retrying would not change that.
            broker.locked = str(reason)
            broker.fail_start(f"resource locked: {reason}")
            return
        if not broker.stopping and not broker.poller.closing:
            log.warning("channel %s closed: %s", channel.channel_number, reason)
        self.close()
