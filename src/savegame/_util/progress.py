"""A minimal progress bar for long saves and loads, shown only on a terminal.

Nothing is printed unless stderr is a TTY and the operation has run for more than
:data:`SHOW_AFTER_SECONDS`, so scripts, CI logs and short saves stay quiet. ``SAVEGAME_PROGRESS=0``
turns it off, ``=1`` forces it on (for tests). Updates are throttled to ~10 per second.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from savegame._util.safetext import escape_controls

SHOW_AFTER_SECONDS = 2.0
_MIN_INTERVAL = 0.1


def _enabled(stream: TextIO) -> bool:
    flag = os.environ.get("SAVEGAME_PROGRESS")
    if flag is not None:
        return flag not in ("0", "", "false", "no")
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class ProgressBar:
    """Tracks bytes done out of ``total`` and draws ``label [####    ] 42% 1.2 GB/s`` on a terminal."""

    def __init__(
        self, label: str, total: int, *, stream: TextIO | None = None, show_after: float | None = None
    ) -> None:
        self.label = escape_controls(label)  # a path from anywhere: shown, never acted on by the terminal
        self.total = max(total, 1)
        self.done = 0
        self._stream = stream or sys.stderr
        self._enabled: bool | None = None  # asked on the first advance past show_after: most bars never get there
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False
        self._show_after = SHOW_AFTER_SECONDS if show_after is None else show_after

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self._enabled is False:
            return
        now = time.monotonic()
        if now - self._start < self._show_after or now - self._last_draw < _MIN_INTERVAL:
            return
        if self._enabled is None:
            self._enabled = _enabled(self._stream)
            if not self._enabled:
                return
        self._last_draw = now
        self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self.done / self.total, 1.0)
        width = 30
        bar = "#" * int(frac * width)
        rate = self.done / max(now - self._start, 1e-9) / 1e9
        self._stream.write(f"\r{self.label} [{bar:<{width}}] {frac:4.0%} {rate:.2f} GB/s")
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._draw(time.monotonic())
            self._stream.write("\n")
            self._stream.flush()
