"""Schedules: jobs that nobody publishes, fired by rbit itself.

A ``[schedule:NAME]`` section (:mod:`rbit.schedule.settings`) says where its fires go,
what they carry and what triggers them. The time triggers (``every``, ``cron``,
``next = job``; :mod:`rbit.schedule.triggers`) fire once across the fleet: every worker
carrying the schedule consumes its state queue with a single active consumer, and the
consumer RabbitMQ makes active is the leader (:mod:`rbit.schedule.leader`,
:mod:`rbit.schedule.scheduler`). A fire is an ordinary job message
(:mod:`rbit.schedule.fire`) whose id is ``NAME@<fire time>``.

A job fired by a ``next = job`` schedule names its next run with :class:`RunNext`
(:mod:`rbit.schedule.nextrun`).
"""

from rbit.schedule.nextrun import RunNext

__all__ = ["RunNext"]
