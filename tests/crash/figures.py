"""Figures for docs/reliability.md: tests append what they measured when ``SAVEGAME_FIGURES`` is set.

Each call appends one JSON line ``{"section": ..., "key": ..., "value": ...}`` to the file named by the
environment variable (``tests/crash/report.py`` sets it, runs the suites and renders the document).
Without the variable nothing is written, so a normal ``make test`` leaves no files behind.
"""

from __future__ import annotations

import json
import os
from typing import Any

ENV = "SAVEGAME_FIGURES"


def record(section: str, key: str, value: Any) -> None:
    """Append one measured figure (a number, string, or small JSON-able dict)."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"section": section, "key": key, "value": value}, sort_keys=True) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def add(section: str, key: str, amount: int) -> None:
    """Record a count that the report sums over all lines with the same section and key."""
    record(section, key, {"add": amount})
