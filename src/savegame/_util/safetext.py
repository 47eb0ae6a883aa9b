"""Text from checkpoints made safe to show on a terminal: control characters become visible escapes.

Names of checkpoint folders, items, keys and metrics, library versions and metadata all come from files
that anyone could have written. Printed raw, an ``ESC [2J`` in a metric name clears the screen, an
``ESC ] 0;...`` retitles the terminal, a ``\\x9b`` (the one-byte CSI) moves the cursor, and a bidi override
(U+202E) makes a name read backwards. :func:`escape_controls` turns every such character into the escape
``repr`` would show (``\\x1b``, ``\\x9b``, ``\\u202e``), so what is on the screen is what is in the file.

It is the one place that does this: the command line passes every line it prints through it (see
:class:`savegame.cli.common.Context`), and :class:`savegame.CheckpointError` messages are escaped by it
(so a traceback quoting a hostile path is safe as well). Backslashes are left alone: escaping is about
what a terminal does, and Windows paths stay readable.
"""

from __future__ import annotations

__all__ = ["escape_controls"]

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every character a terminal could act on shown as an escape (``\\x1b``, ``\\u202e``).

    Escaped: everything :meth:`str.isprintable` rejects except the plain space -- C0 controls, DEL, C1
    controls (``\\x80``-``\\x9f``, including the one-byte CSI ``\\x9b``), format characters such as the bidi
    overrides and isolates, line and paragraph separators, lone surrogates (which would also make
    printing fail), private-use and unassigned code points. ``keep_newlines``: leave ``\\n`` as is (for
    multi-line output; a single name or value should not be able to start a line of its own).
    """
    if text.isprintable():
        return text
    if keep_newlines and "\n" in text and all(line.isprintable() for line in text.split("\n")):
        return text
    return "".join(
        ch if ch.isprintable() or (keep_newlines and ch == "\n") else _escape_char(ch) for ch in text
    )

