"""The worker's logging setup: where ``rbit CONFIG`` writes its log, and how cheaply.

Used by the command line only (library modules just create loggers). Without logging
sections in the config file, the log goes to stderr (stdout at DEBUG with ``--debug``)
through a :class:`BatchingStreamHandler` and a :class:`LineFormatter`: the lines are
those of ``logging.basicConfig`` with the same format, but a busy worker's status
lines (one per job) cost a fraction of what a plain ``StreamHandler`` costs, which
writes and flushes every record as it comes. With ``[loggers]``, ``[handlers]`` and
``[formatters]`` sections, the operator's configuration is used as it is.

The status lines (one per job) may skip logging's machinery: :func:`emit_default`
writes a line straight into the handler's buffer when what logging would do with the
record is exactly what :func:`configure` set up by default, checked on every call: the
logger and its ancestors without filters or handlers of their own and propagating, the
root logger with our one :class:`BatchingStreamHandler` (no filters, its level letting
the record through) formatting with a :class:`LineFormatter` of :data:`FORMAT`, and the
standard record factory and logger class. The line is the formatter's own, byte for
byte (:meth:`LineFormatter.line` shares the date code of ``format``); it goes into the
same buffer, under the same lock, so lines keep their order whichever way each came,
and a WARNING, a full buffer, ``flush`` and ``close`` write it as they write the rest.
Levels decide as they do in logging (the caller asks ``isEnabledFor``, which follows
``setLevel``, ``rbit ctl loglevel`` and ``logging.disable``; the handler's level is
compared here). Anything else -- an operator's logging sections, ``dictConfig`` at run
time (``POST /logconfig``), ``--debug``, a filter, another formatter or handler, a record
factory, a logger class -- fails the check, and the record takes logging's normal path.
The check reads the current state each time rather than keeping a verdict: logging has
no change counter, and its handler and filter lists may be changed in place.
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


def emit_default(logger: logging.Logger, level: int, msg: str, args: tuple,
                 created: float, msecs: float) -> bool:
    """Write the line of a record straight to the default handler's buffer, if it is the path.

    The record would be ``logger``'s at ``level``, with ``msg % args`` as its message,
    no exception, and the time fields ``created`` and ``msecs``. The caller has checked
    ``logger.isEnabledFor(level)``.

    Returns:
        Whether the line was written; False when logging's configuration is not the
        default one (see the module's docstring), and the record must take logging's
        normal path.
    """
    handler = _default_handler(logger, level)
    if handler is None:
        return False
    line = handler.formatter.line(created, msecs, logging.getLevelName(level), logger.name,
                                  msg % args)
    with handler.lock:
        handler._last = None  # a failed write reports a record made of the line
        handler._buffer(line, level)
    return True


def _default_handler(logger: logging.Logger, level: int) -> BatchingStreamHandler | None:
    """The handler of :func:`configure`'s default setup, if it is all a record meets."""
    if (logger.__class__ is not logging.Logger or logger.disabled
            or logging.getLogRecordFactory() is not logging.LogRecord):
        return None
    node = logger
    while node.parent is not None:  # callHandlers' walk, to the root
        if node.filters or node.handlers or not node.propagate:
            return None
        node = node.parent
    handlers = node.handlers
    if node.filters or len(handlers) != 1:
        return None
    handler = handlers[0]
    if handler.__class__ is not BatchingStreamHandler or handler.filters or level < handler.level:
        return None
    formatter = handler.formatter
    if formatter.__class__ is not LineFormatter or not formatter.plain:
        return None
    return handler


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
        # The format of the default configuration: a line may be made without a record
        # (Formatter reads its format once, into its style, as here).
        self.plain = type(self._style) is logging.PercentStyle and self._fmt == FORMAT

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
        return self._asctime(record.created, record.msecs)

    def line(self, created: float, msecs: float, levelname: str, name: str,
             message: str) -> str:
        """The line :meth:`format` makes of a record with these fields and no exception.

        Only for a formatter whose :attr:`plain` is true (the format is :data:`FORMAT`).
        """
        if self.datefmt:
            asctime = time.strftime(self.datefmt, self.converter(created))
        else:
            asctime = self._asctime(created, msecs)
        return "%s %s %s: %s" % (asctime, levelname, name, message)  # FORMAT's layout

    def _asctime(self, created: float, msecs: float) -> str:
        second = int(created)
        cached = self._cached
        if cached[0] != second:  # one tuple swapped at once: safe across threads
            cached = (second, time.strftime(self.default_time_format, self.converter(second)))
            self._cached = cached
        if self.default_msec_format:
            return self.default_msec_format % (cached[1], msecs)
        return cached[1]


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
        self._last = record
        self._buffer(line, record.levelno)

    def _buffer(self, line: str, levelno: int) -> None:
        """Keep ``line``, or write it at once with the others (with the lock held)."""
        lines = self._lines
        lines.append(line)
        if levelno >= logging.WARNING or len(lines) >= self._max_lines or self._closed:
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
            # The last line may have come without a record (emit_default): report
            # the failure with one made of the text.
            self.handleError(self._last or logging.makeLogRecord(
                {"msg": text.rstrip(self.terminator).rpartition(self.terminator)[2]}))

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
