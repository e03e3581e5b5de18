"""Text that came from the network, made safe to log and to print.

Job ids, reasons and header values are chosen by whoever published the message. In a
log line a newline in one would forge a line of its own; on a terminal an escape
sequence would be obeyed. :func:`escape` bounds such text and shows every control
character (and backslash) as a Python-style escape, so one value is one line and
reads the same everywhere.
"""

from __future__ import annotations

#: The longest text :func:`escape` returns by default, before the ellipsis.
MAX_SHOWN = 500

_TABLE = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_TABLE.update({ord("\\"): "\\\\", ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
# Characters that reorder or hide text on a terminal (bidi controls, line separators).
_TABLE.update({code: f"\\u{code:04x}" for code in (
    0x2028, 0x2029, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))})


def escape(value: object, limit: int = MAX_SHOWN) -> str:
    """``value`` as one printable line of at most about ``limit`` characters.

    Bytes are decoded as UTF-8 (invalid bytes replaced); any other non-string is
    shown with ``str``. Text past ``limit`` is cut and ``...`` appended.

    Args:
        value: What came from the network.
        limit: The longest part of it shown.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value[: limit * 4]).decode("utf-8", "replace")
    elif isinstance(value, str):
        text = value
    else:
        try:
            text = str(value)
        except Exception as exc:  # a value whose str fails (e.g. nested too deep)
            text = f"<{type(value).__name__}: {type(exc).__name__}>"
    cut = len(text) > limit
    shown = text[:limit].translate(_TABLE)
    return shown + "..." if cut else shown
