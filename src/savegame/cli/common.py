"""Shared pieces of the ``savegame`` command line: errors, output style, formatting and path resolution.

Nothing here writes to a checkpoint directory. The read-only scan of a checkpoint root lives in
:mod:`savegame.cli.scan`; the subcommands in the other modules of :mod:`savegame.cli`; the parser and
dispatch in :mod:`savegame.cli.app`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

from savegame._util.safetext import escape_controls
from savegame.format.tree import MAX_DEPTH
from savegame.storage.base import MANIFEST

__all__ = [
    "CLIError",
    "Cell",
    "ColorChoice",
    "Style",
    "UsageError",
    "display_path",
    "format_metric",
    "format_value",
    "human_age",
    "human_size",
    "is_checkpoint_dir",
    "json_text",
    "jsonable",
    "local_path",
    "parse_duration",
    "render_table",
    "shown",
    "style_for",
    "terminal_text",
]

ColorChoice = Literal["auto", "always", "never"]

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2


class CLIError(Exception):
    """An error the command line reports as one line; ``code`` is the exit status (1 by default)."""

    code = EXIT_PROBLEM


class UsageError(CLIError):
    """Bad options or arguments: a path that does not exist or is of the wrong kind (exit status 2)."""

    code = EXIT_USAGE


# --------------------------------------------------------------------------------------------------
# Colour


_CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "blue": "34", "magenta": "35",
          "cyan": "36"}  # fmt: skip


@dataclass(frozen=True)
class Style:
    """ANSI colours, or plain text when ``color`` is False."""

    color: bool = False

    def paint(self, text: str, *styles: str) -> str:
        """``text`` wrapped in the ANSI codes of ``styles`` (``"bold"``, ``"red"``...) when colour is on."""
        if not self.color or not styles or not text:
            return text
        codes = ";".join(_CODES[s] for s in styles)
        return f"\033[{codes}m{text}\033[0m"

    def status(self, status: str) -> str:
        """A checkpoint status coloured by meaning (ok green, corrupt red, ...)."""
        colour = {"ok": ("green",), "corrupt": ("red", "bold"), "unverified": ("dim",), "quarantined": ("magenta",)}
        return self.paint(status, *colour.get(status.strip(), ()))


_OUR_CODE = "(?:" + "|".join(sorted({"0", *_CODES.values()}, key=len, reverse=True)) + ")"
_OUR_SGR = re.compile(rf"\x1b\[{_OUR_CODE}(?:;{_OUR_CODE})*m")
"""The colour sequences :meth:`Style.paint` writes (and no other escape sequence)."""


def terminal_text(text: str, *, color: bool) -> str:
    """A line (or lines) about to be printed, with every control character escaped (see
    :mod:`savegame._util.safetext`) except newlines and, when ``color`` is on, the colour codes of
    :class:`Style`. Every line the command line prints passes through here: the net under the
    escaping of each untrusted field (:func:`shown`)."""
    if not color:
        return escape_controls(text, keep_newlines=True)
    out: list[str] = []
    pos = 0
    for match in _OUR_SGR.finditer(text):
        out.append(escape_controls(text[pos : match.start()], keep_newlines=True))
        out.append(match.group())
        pos = match.end()
    out.append(escape_controls(text[pos:], keep_newlines=True))
    return "".join(out)


def shown(value: object) -> str:
    """One untrusted field (a name, key, path, metric, version, error message) as text for one line:
    control characters, newlines included, shown as escapes."""
    return escape_controls(value if isinstance(value, str) else str(value))


def style_for(stream: TextIO, choice: ColorChoice) -> Style:
    """Colour only on a terminal, never with ``NO_COLOR`` set (https://no-color.org) or ``TERM=dumb``."""
    if choice == "always":
        return Style(True)
    if choice == "never" or os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return Style(False)
    isatty = getattr(stream, "isatty", None)
    return Style(bool(isatty and isatty()))


# --------------------------------------------------------------------------------------------------
# Formatting


def human_size(n: int) -> str:
    """Bytes in binary units: ``968 B``, ``12.8 KiB``, ``3.0 GiB``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    return f"{n} B"  # pragma: no cover


def human_age(seconds: float) -> str:
    """A short age: ``12s``, ``5m``, ``3h``, ``4d``, ``6w`` (negative ages, from clock skew, show as ``0s``)."""
    s = max(0.0, seconds)
    for unit, size in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size * (2 if unit == "w" else 1):
            return f"{int(s // size)}{unit}"
    return f"{int(s)}s"


def human_seconds(seconds: float | None) -> str:
    """A duration for a table: ``0.012s``, ``3.41s``, ``12.3s``, ``5m 02s``, ``3h 04m`` (``-`` when unknown)."""
    if seconds is None:
        return "-"
    s = max(0.0, seconds)
    if s < 1:
        return f"{s:.3f}s"
    if s < 10:
        return f"{s:.2f}s"
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m {int(s % 60):02d}s"
    return f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m"


def format_metric(value: float | None) -> str:
    """A metric value in at most 5 significant digits (``-`` when absent)."""
    if value is None:
        return "-"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.5g}"


def format_value(value: object, limit: int = 100) -> str:
    """A short, single-line rendering of a plain value from a checkpoint."""
    if isinstance(value, float):
        text = repr(value)
    elif isinstance(value, bytes):
        text = f"<{len(value)} bytes>"
    elif isinstance(value, (list, tuple)) and len(value) > 8:
        head = ", ".join(format_value(v, 20) for v in value[:6])
        text = f"[{head}, ... ({len(value)} items)]"
    else:
        text = repr(value)
    text = escape_controls(text.replace("\n", " "))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_duration(text: str) -> float:
    """``"90s"``, ``"15m"``, ``"12h"``, ``"7d"``, ``"2w"`` or a plain number of seconds -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not match:
        raise UsageError(f"invalid duration {text!r} (expected e.g. 30s, 15m, 12h, 7d, 2w)")
    factor = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[match.group(2)]
    return float(match.group(1)) * factor


Cell = str | tuple[str, Callable[[str], str]]
"""A table cell: plain text, or text plus a function that colours it (applied after padding)."""


def render_table(header: Sequence[str], rows: Sequence[Sequence[Cell]], *, right: Sequence[int] = (),
                 style: Style = Style()) -> str:  # fmt: skip
    """Columns padded to their widest cell; ``right``: indexes of right-aligned columns. Header and cell
    texts are shown with their control characters escaped (:func:`shown`)."""
    header = [shown(h) for h in header]
    texts = [[shown(c if isinstance(c, str) else c[0]) for c in row] for row in rows]
    widths = [len(h) for h in header]
    for row_texts in texts:
        for i, text in enumerate(row_texts):
            widths[i] = max(widths[i], len(text))
    lines = ["  ".join(style.paint(h.ljust(w), "bold") for h, w in zip(header, widths)).rstrip()]
    for row, text_row in zip(rows, texts):
        cells = []
        for i, (cell, text) in enumerate(zip(row, text_row)):
            padded = text.rjust(widths[i]) if i in right else text.ljust(widths[i])
            cells.append(cell[1](padded) if not isinstance(cell, str) else padded)
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def jsonable(value: Any, depth: int = 0) -> Any:
    """Plain data -> JSON-safe data: non-finite floats become null, tuples lists, bytes base64 strings,
    dict keys strings, anything else its ``str``."""
    if depth > MAX_DEPTH:
        return None
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, depth + 1) for v in value]
    if isinstance(value, bytes):
        return "base64:" + base64.b64encode(value).decode("ascii")
    if isinstance(value, _dt.datetime):
        return value.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        try:
            return jsonable(item(), depth + 1)
        except (TypeError, ValueError):
            pass
    return str(value)


def json_text(value: Any) -> str:
    """Indented JSON of :func:`jsonable` ``value``."""
    return json.dumps(jsonable(value), indent=2, allow_nan=False)


def print_json(value: Any, stream: TextIO | None = None) -> None:
    """Print :func:`json_text` of ``value`` to ``stream`` (stdout)."""
    print(json_text(value), file=stream or sys.stdout)


def iso_time(when: _dt.datetime) -> str:
    """``2026-11-22 08:07:36 UTC``."""
    return when.astimezone(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


# --------------------------------------------------------------------------------------------------
# Paths


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def local_path(arg: str) -> str:
    """The absolute local path of a command-line location (``file://`` accepted; ``~`` expanded).

    Remote URLs (``s3://...``) raise :class:`UsageError`: callers that can read remote roots check
    :func:`savegame.storage.is_url` first; outputs (export, plot) are local files.
    """
    if arg.startswith("file://"):
        arg = arg[len("file://") :]
    elif _URL.match(arg):
        raise UsageError(f"{arg}: a local path is needed here (remote URLs work for reading checkpoints)")
    if not arg:
        raise UsageError("empty path")
    return os.path.abspath(os.path.expanduser(arg))


def display_path(path: str) -> str:
    """A path for people: relative to the current directory when it is inside it (URLs unchanged),
    control characters escaped (:func:`shown`)."""
    if _URL.match(path) or not os.path.isabs(path):
        return shown(path)
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return shown(path)
    return shown(path if relative.startswith("..") else relative)


def is_checkpoint_dir(path: str) -> bool:
    """Whether ``path`` is a checkpoint directory (has a ``manifest.json``)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


@dataclass
class Context:
    """Where a subcommand writes: ``out`` (results) and ``err`` (notes, progress), each with its style.

    Every line goes through :func:`terminal_text`: a control character in it is printed as an escape,
    whatever field it came from."""

    out: TextIO
    err: TextIO
    style: Style
    err_style: Style
    debug: bool = False
    _warned: set[str] = field(default_factory=set)

    def print(self, text: str = "") -> None:
        """A line of results on ``out``."""
        print(terminal_text(text, color=self.style.color), file=self.out)

    def note(self, text: str) -> None:
        """A one-line note on ``err`` (``savegame: note``), after what is already on ``out``."""
        self.out.flush()
        print(terminal_text(f"savegame: {text}", color=self.err_style.color), file=self.err)

    def warn(self, text: str) -> None:
        """A one-line warning on ``err`` (each distinct text once: the library both logs and warns)."""
        if text in self._warned:
            return
        self._warned.add(text)
        self.out.flush()
        line = f"savegame: {self.err_style.paint('warning', 'yellow')}: {shown(text)}"
        print(terminal_text(line, color=self.err_style.color), file=self.err)

    def progress(self, label: str, total: int) -> Any:
        """A progress bar on ``err``, drawn only on a terminal (or with ``SAVEGAME_PROGRESS=1``)."""
        from savegame._util.progress import ProgressBar

        return ProgressBar(label, total, stream=self.err, show_after=0.25)
