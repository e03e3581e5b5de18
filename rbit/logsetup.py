"""The worker's logging setup: where ``rbit CONFIG`` writes its log, and how cheaply.

Used by the command line only (library modules just create loggers). Without logging
sections in the config file, the log goes to stderr (stdout at DEBUG with ``--debug``)
through a :class:`BatchingStreamHandler` and a :class:`LineFormatter`: the lines are
those of ``logging.basicConfig`` with the same format, but a busy worker's status
lines (one per job) cost a fraction of what a plain ``StreamHandler`` costs, which
writes and flushes every record as it comes. With ``[loggers]``, ``[handlers]`` and
``[formatters]`` sections, the operator's configuration is used as it is.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import IO, Any

from rbit.config import Settings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEBUG_FORMAT = "%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"
#: How long a line may wait in the buffer before it is written, seconds.
WRITE_DELAY = 0.05
#: A buffer this long is written at once, without waiting for the delay.
MAX_LINES = 1000


def configure(settings: Settings | None, debug: bool) -> None:
    """Set up the process's logging for the worker.

    Args:
        settings: The configuration, whose file may have logging sections to apply;
            ``None`` when it could not be read.
        debug: ``--debug``: everything at DEBUG to stdout (overrides the file's sections).
    """
    if debug:
        _install(sys.stdout, logging.DEBUG, DEBUG_FORMAT)
    elif settings is not None and settings.logging_sections:
        from logging import config  # only for files with logging sections: 12 ms of start-up

        config.fileConfig(settings.file, disable_existing_loggers=False)
    else:
        _install(sys.stderr, logging.INFO, FORMAT)
        # rbit logs every connection failure and loss itself, in one line; pika's own
        # account of the same event is several ERROR lines with tracebacks.
        logging.getLogger("pika").setLevel(logging.CRITICAL)


def _install(stream: IO[str], level: int, fmt: str) -> None:
    # A record gathers its thread's and process's names only when the format shows
    # them: a few microseconds less per line (the logging HOWTO's "Optimization").
    logging.logThreads = "%(thread" in fmt
    logging.logProcesses = logging.logMultiprocessing = "%(process" in fmt
    handler = BatchingStreamHandler(stream)
    handler.setFormatter(LineFormatter(fmt))
    logging.basicConfig(level=level, force=True, handlers=[handler])


class LineFormatter(logging.Formatter):
    """A :class:`logging.Formatter` that formats each second's date and time once.

    Lines come out as the base class writes them (``%(asctime)s`` as
    ``2024-05-01 12:00:00,123`` in local time, ``datefmt`` and the converter honoured);
    the date of the current second is just not formatted again for every line.
    """

    _cached: tuple[int, str] = (-1, "")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._uses_time = self.usesTime()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        # The base class's steps for a plain line, without asking again for each line
        # whether the format has a time.
        record.message = record.getMessage()
        if self._uses_time:
            record.asctime = self.formatTime(record, self.datefmt)
        return self.formatMessage(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached = self._cached
        if cached[0] != second:  # one tuple swapped at once: safe across threads
            cached = (second, time.strftime(self.default_time_format, self.converter(second)))
            self._cached = cached
        return self.default_msec_format % (cached[1], record.msecs)


class BatchingStreamHandler(logging.StreamHandler):
    """A :class:`logging.StreamHandler` that writes lines in batches.

    A record is formatted at once, on the thread that logged it, and its line kept in
    a buffer. A thread of the handler's own writes what gathered, in one write and one
    flush, at most :data:`WRITE_DELAY` seconds after the first line of a batch. Lines
    keep the order in which they were logged. Nothing is left behind on a normal exit:
    :meth:`flush` and :meth:`close` write the buffer (``logging.shutdown`` calls both at
    exit), and a record at WARNING or above is written at once with the lines before
    it, so errors reach the log even if the process is then killed.

    Args:
        stream: Where to write (default ``sys.stderr``).
        delay: Seconds a line may wait in the buffer.
        max_lines: A buffer this long is written at once.
    """

    def __init__(self, stream: IO[str] | None = None, *, delay: float = WRITE_DELAY,
                 max_lines: int = MAX_LINES) -> None:
        super().__init__(stream)
        self._lines: list[str] = []
        self._last: logging.LogRecord | None = None  # for handleError on a failed write
        self._delay = delay
        self._max_lines = max(1, max_lines)
        self._closed = False
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        """Buffer the record's line (called with the handler's lock held)."""
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise
            self.handleError(record)
            return
        lines = self._lines
        lines.append(line)
        self._last = record
        if record.levelno >= logging.WARNING or len(lines) >= self._max_lines or self._closed:
            self._write()
        elif len(lines) == 1:  # a new batch: have it written after the delay
            if self._thread is None:
                self._start_thread()
            self._wake.set()

    def flush(self) -> None:
        """Write the buffered lines now."""
        self.acquire()
        try:
            self._write()
        finally:
            self.release()

    def close(self) -> None:
        """Write the buffered lines; later records are written one by one."""
        self.acquire()
        try:
            self._closed = True
            self._write()
        finally:
            self.release()
        self._wake.set()
        super().close()

    def _write(self) -> None:
        """Write and flush the buffer (with the handler's lock held)."""
        if not self._lines:
            return
        text = self.terminator.join(self._lines) + self.terminator
        self._lines = []
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise
            if self._last is not None:
                self.handleError(self._last)

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rbit-log-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wake = self._wake
        while True:
            wake.wait()
            if self._closed:
                return
            time.sleep(self._delay)  # let the batch gather: the delay bounds its lateness
            # Cleared before the write: a line buffered after it sets the event again.
            wake.clear()
            self.flush()
