"""Everything that talks AMQP: the one package that imports pika.

* :mod:`rbit.amqp.records` -- the records that cross this boundary (a delivery, a
  publish, a consumer spec, the held-copy headers); it imports no pika, and neither
  does this file, so the rest of rbit can name them without loading pika;
* :mod:`rbit.amqp.broker` -- :class:`~rbit.amqp.broker.Broker`, the worker's
  connection: its public API and the hand-over between threads;
* :mod:`rbit.amqp.connection` -- connection parameters, host rotation, reconnecting,
  the channels of a connection and its generation;
* :mod:`rbit.amqp.declare` -- declaring the topology;
* :mod:`rbit.amqp.consuming` -- consumers and the delivery callback;
* :mod:`rbit.amqp.acks` -- batched acks, nacks;
* :mod:`rbit.amqp.confirms` -- publishing with publisher confirms;
* :mod:`rbit.amqp.leases` -- renewing the lease of long jobs (holding queues);
* :mod:`rbit.amqp.polling` -- ``mode = poll``'s ``basic_get`` passes;
* :mod:`rbit.amqp.loops` -- pika's I/O loop and asyncio's, adapted to the broker;
* :mod:`rbit.amqp.inbound` -- whole deliveries taken off the wire in one step;
* :mod:`rbit.amqp.frames` -- content headers pika cannot decode, copies fitted to a
  frame;
* :mod:`rbit.amqp.control` -- the worker's control queue and fleet announces;
* :mod:`rbit.amqp.fleet` -- ``rbit ctl``'s session: ask the workers, gather replies;
* :mod:`rbit.amqp.admin` -- a blocking session for command-line verbs.

pika errors do not leave this package: they become :class:`rbit.errors.BrokerError`
(or a subclass), a failed publish confirm, or a reconnect.
"""
