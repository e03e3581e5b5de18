"""Linux inotify through libc (ctypes): the three calls a directory watch needs.

No binding is used: the well-known one (``inotify_simple``) is itself a thin ctypes
wrapper of these same calls, and a dependency for some thirty lines is not worth it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

_HEADER = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)
_READ_SIZE = 64 * 1024


@dataclass(frozen=True)
class Event:
    """One inotify event: the watch, what happened, and the file name (bytes)."""

    wd: int
    mask: int
    name: bytes


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    return libc


class Inotify:
    """An inotify descriptor (non-blocking, close-on-exec).

    Raises:
        OSError: inotify is not available, or the per-user limit is reached.
    """

    def __init__(self) -> None:
        self._libc = _libc()
        self.fd = self._check(self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))

    def add_watch(self, path: str, mask: int) -> int:
        """Watch ``path`` for ``mask``; returns the watch descriptor."""
        return self._check(self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask))

    def read(self) -> Iterator[Event]:
        """The events ready now (none when nothing is: the descriptor is non-blocking)."""
        try:
            data = os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            return
        offset = 0
        while offset + _HEADER.size <= len(data):
            wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
            offset += _HEADER.size
            name = data[offset:offset + length].rstrip(b"\0")
            offset += length
            yield Event(wd, mask, name)

    def close(self) -> None:
        os.close(self.fd)

    @staticmethod
    def _check(result: int) -> int:
        if result < 0:
            code = ctypes.get_errno() or errno.EINVAL
            raise OSError(code, os.strerror(code))
        return result
