"""Runners: what turns a job message into work (``python!`` and ``shell!``)."""
