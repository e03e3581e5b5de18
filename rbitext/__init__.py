"""Runners bundled with rbit.

* :mod:`rbitext.examples` -- small ``python!`` runners showing the runner API
  (``hello``, ``noop``, ``fail``, ``block``).

Point a runner section at one with ``runner = python!rbitext.examples:hello``.
"""
