"""Starting a command: posix_spawn where it can, its pipes, its environment."""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping

from rbit.runners.shell.template import Slot, Values
from rbit.supervisor import close_fds

# Where the status pipe lands in commands started by Spawner: after stdin/out/err.
SPAWN_STATUS_FD = 3
# What subprocess resets too (restore_signals): Python ignores SIGPIPE and SIGXFSZ.
_DEFAULT_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ") if hasattr(signal, name)
)



class Spawner:
    """Starts commands with :func:`os.posix_spawnp`, at about half the CPU of Popen.

    Popen re-encodes the whole environment in Python and sets up its fork machinery
    for every command, which costs as much as the rest of a short job. posix_spawn
    does neither, but it has no ``close_fds``: the commands would inherit every
    inheritable descriptor of the worker. Python creates none (PEP 446); those the
    worker inherited from whoever started it are listed once, here, and closed in
    each command. Descriptors made inheritable later in the worker's life (by a C
    extension, say) are not seen. Without posix_spawn, ``/proc/self/fd`` or a
    ``setsid`` spawn attribute, the runner uses Popen.
    """

    def __init__(self, inherited: list[int]) -> None:
        self._closes = [(os.POSIX_SPAWN_CLOSE, fd) for fd in inherited]

    @classmethod
    def create(cls) -> Spawner | None:
        if not hasattr(os, "posix_spawnp"):
            return None
        try:
            names = os.listdir("/proc/self/fd")
        except OSError:
            return None
        return cls([fd for fd in map(int, names) if fd > 2 and _inheritable(fd)])

    def start(
        self, argv: list[str], env: dict[bytes, bytes], fds: tuple[int, ...]
    ) -> Spawned | None:
        """Starts ``argv`` with ``fds`` as its descriptors 0, 1, 2, 3...; None if unsupported.

        The descriptors must all be above those numbers, so no copy overwrites a
        source still to be copied.
        """
        dups = [(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(fds)]
        try:
            pid = os.posix_spawnp(
                argv[0],
                argv,
                env,
                file_actions=dups + self._closes,
                setsid=True,  # own process group: timeouts reach grandchildren
                setsigdef=_DEFAULT_SIGNALS,
            )
        except NotImplementedError:  # no POSIX_SPAWN_SETSID in this libc
            return None
        return Spawned(pid)


def _inheritable(fd: int) -> bool:
    try:
        return os.get_inheritable(fd)
    except OSError:  # the listing's own descriptor, closed by now
        return False


class Spawned:
    """A command started by :class:`Spawner`, with Popen's ``wait``/``returncode``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def wait(self) -> int:
        if self.returncode is None:
            try:
                _, status = os.waitpid(self.pid, 0)
            except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored): as Popen does
                self.returncode = 0
            else:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


class Pipes:
    """A command's stderr and status pipes, and its stdout pipe when that is read."""

    def __init__(self, *, stdout: bool) -> None:
        self._fds: list[int] = []
        try:
            self.status_r, self.status_w = self._pipe()
            self.stderr_r, self.stderr_w = self._pipe()
            self.stdout_r, self.stdout_w = self._pipe() if stdout else (None, None)
        except BaseException:
            close_fds(*self._fds)
            raise

    def close_write_ends(self) -> None:
        close_fds(*(fd for fd in (self.status_w, self.stderr_w, self.stdout_w) if fd is not None))

    def close_read_ends(self) -> None:
        close_fds(*(fd for fd in (self.status_r, self.stderr_r, self.stdout_r) if fd is not None))

    def close(self) -> None:
        self.close_write_ends()
        self.close_read_ends()

    def _pipe(self) -> tuple[int, int]:
        read_fd, write_fd = os.pipe()
        self._fds += (read_fd, write_fd)
        return read_fd, write_fd


_pidfd_supported = hasattr(os, "pidfd_open")


def child_env(base: Mapping[bytes, bytes], values: Values, status_fd: int) -> dict[bytes, bytes]:
    """The worker's environment and the job's RBIT_* variables, ready for exec."""
    env = dict(base)
    env[b"RBIT_JOB_ID"] = os.fsencode(values[Slot.ID])
    env[b"RBIT_QUEUE"] = os.fsencode(values[Slot.QUEUE])
    env[b"RBIT_BODY_FILE"] = os.fsencode(values[Slot.BODY])
    env[b"RBIT_ATTEMPT"] = os.fsencode(values[Slot.ATTEMPT])
    env[b"RBIT_STATUS_FD"] = b"%d" % status_fd
    return env
