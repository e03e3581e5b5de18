"""What is read from a command: the tail of a stream, and status lines."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from rbit.outcome import Output, Status
from rbit.schedule import nextrun

log = logging.getLogger(__name__)

TAIL_BYTES = 4096
_STATUS_LINE_MAX = 4096

SetStatus = Callable[[str, str], None]


class Tail:
    """The last ``limit`` bytes of a stream."""

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self._data = bytearray()
        self._limit = limit
        self._truncated = False

    def feed(self, chunk: bytes) -> None:
        self._data += chunk
        if len(self._data) > self._limit:
            del self._data[: -self._limit]
            self._truncated = True

    def text(self) -> str:
        text = self._data.decode("utf-8", "replace").strip()
        return "..." + text if self._truncated and text else text


#: The most stdout kept of a broadcast copy's command (its first bytes), for its caller.
OUTPUT_BYTES = 64 * 1024


class Head:
    """The first ``limit`` bytes of a stream (a broadcast copy's stdout).

    The rest is read and dropped, so that the command never blocks on a full pipe.
    """

    def __init__(self, limit: int = OUTPUT_BYTES) -> None:
        self._data = bytearray()
        self._limit = limit
        self.truncated = False

    def feed(self, chunk: bytes) -> None:
        room = self._limit - len(self._data)
        if len(chunk) > room:
            self.truncated = True
        if room > 0:
            self._data += chunk[:room]

    def output(self) -> Output:
        return Output(self._data.decode("utf-8", "replace"), self.truncated)


class StatusReader:
    """Turns lines from ``RBIT_STATUS_FD`` into ``set_status`` calls."""

    def __init__(self, job_id: str, set_status: SetStatus) -> None:
        self._job_id = job_id
        self._set_status = set_status
        self._buf = bytearray()
        self._skipping = False  # inside an overlong line, already reported

    def feed(self, chunk: bytes) -> None:
        if not chunk:  # end of stream: a last line without newline still counts
            self._line(bytes(self._buf))
            self._buf.clear()
            return
        self._buf += chunk
        while (end := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            self._line(line)
            self._skipping = False
        if len(self._buf) > _STATUS_LINE_MAX:
            self._line(bytes(self._buf[:_STATUS_LINE_MAX]))
            self._buf.clear()
            self._skipping = True

    def _line(self, line: bytes) -> None:
        words = line.decode("utf-8", "replace").split(None, 1)
        if self._skipping or not words:
            return
        if words[0].lower() == "next":  # next = job: "Next <seconds | ISO time>"
            self._next(words[1] if len(words) > 1 else "")
            return
        try:
            status = Status.parse(words[0])
        except ValueError:
            log.warning(
                "job %s: ignoring status line with unknown status %r", self._job_id, words[0]
            )
            return
        try:
            self._set_status(status.value, words[1].strip() if len(words) > 1 else "")
        except Exception:  # the pipe must keep being read, or the command would block
            log.exception("job %s: set_status(%s) failed", self._job_id, status.value)

    def _next(self, text: str) -> None:
        try:
            run = nextrun.parse_next_line(text, datetime.now(UTC))
        except ValueError:
            log.warning("job %s: ignoring Next line %r: expected seconds or an ISO-8601 "
                        "time", self._job_id, text[:80])
            return
        nextrun.report(self._job_id, run)
