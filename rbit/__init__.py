"""rbit: a job runner for RabbitMQ.

Runners import what they need from here::

    from rbit import Blocked, Reject, Status
"""

from rbit.errors import Blocked, RbitError, Reject
from rbit.outcome import Status

__version__ = "0.1.0"

__all__ = ["Blocked", "RbitError", "Reject", "Status", "__version__"]
