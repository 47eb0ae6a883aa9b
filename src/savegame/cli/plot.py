"""``savegame plot``: a monitored metric over epochs or steps, with saved, best and deleted checkpoints.

What is plotted comes only from the manifests in the root (nothing else is recorded):

* **saved**: every committed checkpoint that has the metric;
* **best**: the best checkpoint by the metric (the one the Checkpointer recorded, or recomputed);
* **deleted**: retention deletes checkpoints together with their manifests, so their metric values are
  gone, except for checkpoints that were *the best at some point*: every Checkpointer manifest records
  the best so far (name, epoch, step, value), so earlier bests that were deleted later are known and
  plotted. Other deleted checkpoints are counted from the gaps in the save sequence numbers and
  mentioned in a note under the plot;
* **quarantined**: damaged checkpoints moved aside whose manifest is still readable.

Needs matplotlib (``pip install 'savegame[plot]'``); the figure is drawn off-screen (Agg), so no display
is needed. The output format follows the file name (``.png``, ``.svg``, ``.pdf``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from savegame._util.safetext import escape_controls
from savegame.cli.scan import Entry, scan_root
from savegame.errors import ConfigError
from savegame.export import write_atomic

__all__ = ["PlotSummary", "Point", "collect_history", "plot_history"]

Axis = Literal["auto", "epoch", "step", "sequence"]


@dataclass(frozen=True)
class Point:
    """One known value of the metric: where (epoch, step, sequence), what, and which checkpoint."""

    name: str
    value: float
    epoch: int | None
    step: int | None
    sequence: int | None
    kind: Literal["saved", "deleted", "quarantined"]
    is_best: bool = False

    def position(self, axis: str) -> int | None:
        """The point's x coordinate on ``axis``."""
        return self.epoch if axis == "epoch" else self.step if axis == "step" else self.sequence


@dataclass(frozen=True)
class PlotSummary:
    """What :func:`plot_history` drew."""

    path: str
    metric: str
    mode: str
    axis: str
    points: tuple[Point, ...]
    best: str | None
    deleted_unknown: int

    def count(self, kind: str) -> int:
        """How many points of ``kind`` (``saved``, ``deleted``, ``quarantined``) were plotted."""
        return sum(p.kind == kind for p in self.points)


def collect_history(root: str, *, metric: str | None = None, mode: str = "auto") -> tuple[list[Point], str, str, int]:
    """``(points, metric, mode, deleted without recorded values)`` for the root (see the module docstring)."""
    scan = scan_root(root, monitor=metric, mode=mode)
    everything: list[Entry] = scan.readable + [e for e in scan.quarantined if e.manifest is not None]
    if scan.monitor is None or scan.mode is None:
        available = sorted({m for e in everything for m in e.metrics})
        raise ConfigError(f"{root}: no monitored metric recorded; choose one with --metric "
                          f"(available: {', '.join(available) or 'none'})")  # fmt: skip
    metric, direction = scan.monitor, scan.mode
    points: list[Point] = []
    for e in everything:
        if metric in e.metrics:
            kind: Literal["saved", "quarantined"] = "quarantined" if e.quarantined else "saved"
            points.append(Point(e.name, e.metrics[metric], e.epoch, e.step, e.sequence, kind,
                                is_best=e.is_best))  # fmt: skip
    present = {e.name for e in everything} | {e.name for e in scan.quarantined}
    known: dict[str, Point] = {}
    for e in everything:
        best = e.recorded_best
        if best is not None and best.monitor == metric and best.name not in present and best.name not in known:
            known[best.name] = Point(best.name, best.value, best.epoch, best.step, None, "deleted")
    points += known.values()
    if not any(p.kind != "deleted" for p in points) and not known:
        available = sorted({m for e in everything for m in e.metrics})
        raise ConfigError(f"{root}: no checkpoint has the metric {metric!r} "
                          f"(available: {', '.join(available) or 'none'})")  # fmt: skip
    sequences = {e.sequence for e in everything if e.sequence is not None}
    missing = (max(sequences) - len(sequences)) if sequences else 0
    return points, metric, direction, max(0, missing - len(known))


def _choose_axis(points: list[Point], axis: Axis) -> str:
    if axis != "auto":
        return axis
    epochs = [p.epoch for p in points]
    if all(e is not None for e in epochs) and len(set(epochs)) == len(epochs):
        return "epoch"
    if all(p.step is not None for p in points):
        return "step"
    if all(e is not None for e in epochs):
        return "epoch"
    return "sequence"


def plot_history(
    root: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    metric: str | None = None,
    mode: str = "auto",
    axis: Axis = "auto",
    title: str | None = None,
) -> PlotSummary:
    """Draw ``metric`` (default: the run's monitored metric) over ``axis`` into ``output``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ConfigError("plot needs matplotlib: pip install 'savegame[plot]'") from None
    root = os.fspath(root)
    dest = os.path.abspath(os.fspath(output))
    if not os.path.isdir(os.path.dirname(dest)):
        raise ConfigError(f"{os.path.dirname(dest)}: no such directory")
    all_points, metric, direction, unknown = collect_history(root, metric=metric, mode=mode)
    chosen = _choose_axis(all_points, axis)
    points = [p for p in all_points if p.position(chosen) is not None]
    dropped = len(all_points) - len(points)
    if not points:
        raise ConfigError(f"{root}: no checkpoint with {metric!r} has a {chosen} number; try --x with another axis")

    def xy(kind: str | None = None) -> tuple[list[int], list[float]]:
        selected = sorted((p for p in points if kind is None or p.kind == kind), key=lambda p: p.position(chosen) or 0)
        return [p.position(chosen) or 0 for p in selected], [p.value for p in selected]

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs, ys = xy()
    ax.plot(xs, ys, "-", color="0.55", linewidth=1.3, zorder=1)
    styles = {"saved": ("o", "tab:blue"), "deleted": ("X", "tab:red"), "quarantined": ("^", "tab:orange")}
    labels = {"saved": "saved", "deleted": "deleted (known: an earlier best)", "quarantined": "quarantined"}
    for kind, (marker, colour) in styles.items():
        kx, ky = xy(kind)
        if kx:
            ax.scatter(kx, ky, marker=marker, s=45, color=colour, zorder=3, label=f"{labels[kind]} ({len(kx)})")
    best = next((p for p in points if p.is_best), None)
    if best is not None:
        ax.scatter([best.position(chosen) or 0], [best.value], marker="*", s=320, color="gold", edgecolors="black",
                   linewidths=0.8, zorder=4, label=f"best: {_plain(best.name)} ({best.value:.5g})")  # fmt: skip
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(chosen)
    ax.set_ylabel(_plain(metric))
    ax.set_title(title or _plain(f"{metric} ({direction}) in {root.rstrip('/').rpartition('/')[2] or root}"))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    notes = []
    if unknown:
        notes.append(f"{unknown} deleted checkpoint(s) not shown: their metric values were deleted with them")
    if dropped:
        notes.append(f"{dropped} point(s) without a {chosen} number not shown")
    if notes:
        fig.text(0.01, 0.01, "; ".join(notes), fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.04 if notes else 0, 1, 1))
    write_atomic(dest, lambda path: fig.savefig(path, format=_format_of(dest)))
    return PlotSummary(dest, metric, direction, chosen, tuple(points), best.name if best else None, unknown)


def _plain(text: str) -> str:
    """Untrusted text (metric and checkpoint names) for the figure: control characters escaped, and
    ``$`` escaped so that matplotlib does not parse it as mathtext (a stray ``$`` would fail the plot)."""
    return escape_controls(text).replace("$", r"\$")


def _format_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return ext or "png"
