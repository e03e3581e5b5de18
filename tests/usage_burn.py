"""A program and python! runners that burn CPU, for the usage metering tests.

``python usage_burn.py burn SECONDS`` spins until it used SECONDS of CPU time.
``python usage_burn.py grandchild SECONDS`` starts ``burn`` as its own child and waits
for it (so the burning happens in a grandchild of whoever started this).
``python usage_burn.py fail`` exits with status 1.
"""

from __future__ import annotations

import subprocess
import sys
import time


def burn(seconds: float, clock=time.process_time) -> None:
    """Spin until ``clock`` (CPU time) advanced by ``seconds``."""
    end = clock() + seconds
    while clock() < end:
        pass


def burn_in_child(message, set_status, settings) -> None:
    """python! runner (child process): burns the CPU seconds its body names."""
    burn(float(message.body))


def burn_in_thread(message, set_status, settings) -> None:
    """python! runner (worker thread): burns the CPU seconds its body names."""
    burn(float(message.body), time.thread_time)


def main(argv: list[str]) -> int:
    if argv[0] == "burn":
        burn(float(argv[1]))
        return 0
    if argv[0] == "grandchild":
        return subprocess.call([sys.executable, __file__, "burn", argv[1]])
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
