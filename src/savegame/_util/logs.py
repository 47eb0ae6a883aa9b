"""savegame's loggers: every message they emit has its control characters escaped.

Log lines quote paths, checkpoint names and metric names, which come from files anyone could have
written (a folder renamed to ``evil\\x1b]0;pwned\\x07``): printed raw by a handler on a terminal they would
retitle it or clear the screen. :func:`get_logger` returns the named logger with a filter that formats
each record's message once and escapes it (:func:`savegame._util.safetext.escape_controls`, newlines
kept), so whatever handler the application installs prints what is in the file, not what it does.
:func:`warn` does the same for warnings (Python's warning display prints their text raw).
"""

from __future__ import annotations

import logging
import warnings

from savegame._util.safetext import escape_controls

__all__ = ["get_logger", "warn"]


class _EscapeControls(logging.Filter):
    """Replaces a record's message by its formatted, escaped text (the arguments are consumed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = escape_controls(message, keep_newlines=True)
        if safe is not message or record.args:
            record.msg, record.args = safe, ()
        return True


_FILTER = _EscapeControls()


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` (a ``savegame`` logger) with the escaping filter attached once."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger


def warn(message: str, category: type[Warning] = UserWarning, *, stacklevel: int = 1) -> None:
    """``warnings.warn(message, category, stacklevel=stacklevel)`` with the message's control characters
    escaped (newlines kept): every warning savegame gives goes through here, since its text quotes names
    from files and Python's warning display writes it to the terminal as it is."""
    warnings.warn(escape_controls(str(message), keep_newlines=True), category, stacklevel=stacklevel + 1)
