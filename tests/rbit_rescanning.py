"""``python -m rbit_rescanning CONFIG``: rbit, looking at its trusted keys on every lookup.

A worker looks at its trusted-keys directory again at most once per
``keys.RESCAN_INTERVAL``; that bound is tested with an injected clock (test_signing.py).
A real worker process started through this module rescans on every lookup instead, so a
test of revocation without a restart waits for no span of time.
"""

import sys

from rbit.cli import main
from rbit.security import keys

keys.RESCAN_INTERVAL = 0.0
sys.exit(main())
