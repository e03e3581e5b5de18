"""Operating a running fleet: ``rbit ctl`` commands, status, job history, pause state.

* :mod:`rbit.control.commands` -- the fixed command set, as JSON documents validated
  field by field (nothing is evaluated, nothing unpickled), and the replies;
* :mod:`rbit.control.state` -- the state directory: job history and paused queues in
  SQLite, written by a thread of its own so that recording never blocks a job;
* :mod:`rbit.control.observer` -- what the job pools tell about each job: running jobs,
  counts since start, and the outcomes fed to the history;
* :mod:`rbit.control.handler` -- the worker side: authorizes and carries out a command,
  and builds the status snapshot;
* :mod:`rbit.control.client` -- ``rbit ctl CONFIG COMMAND``: asks the fleet and gathers
  the replies.

How it travels (the AMQP side is :mod:`rbit.amqp.control`): a command is published to
the direct exchange ``rbit.control`` with routing key ``all`` or ``worker:<name>``, with
``reply_to = amq.rabbitmq.reply-to`` (direct reply-to) and the sender's ``user_id``.
Each worker consumes one exclusive, auto-delete queue ``rbit.control.<name>`` bound with
both keys; a second worker of the same name finds that queue held and does not start.
Each worker also announces itself on the fanout exchange ``rbit.fleet``, whose queue
``rbit.fleet.seen`` keeps the announces for one day
(:data:`rbit.amqp.control.SEEN_TTL_MS`): ``ctl`` reads it without consuming it, to
name the workers seen lately that did not answer.

No pika is imported here: everything that talks AMQP is in :mod:`rbit.amqp`.
"""
