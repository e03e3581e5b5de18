"""Not importable on purpose: a runner module that calls ``sys.exit`` while imported."""

import sys

sys.exit(3)
