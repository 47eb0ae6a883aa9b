"""``savegame stats ROOT``: how much training time the saves cost and how much work is at risk.

From the timings each checkpoint's manifest records (:mod:`savegame.run.timing`), per run:

* **training time**: the wall-clock time the run's Checkpointers were open, up to the run's newest
  commit, summed over the run's sessions (a resumed session continues the time recorded by the
  checkpoint it resumed from; downtime between a crash and the resume is not counted);
* **stall time**: the seconds saves blocked training, summed over all the run's saves (also those
  whose checkpoints retention deleted since: each checkpoint records the sum so far);
* **stall share**: stall time / training time.

And for the root: the **work at risk**, the time since the newest durable checkpoint was committed
(what a crash now would lose). Checkpoints written before savegame recorded timings show ``-``.
Nothing is written.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

from savegame.cli.common import EXIT_OK, Context, human_seconds, iso_time, print_json, shown
from savegame.cli.scan import Entry, scan_root
from savegame.run.timing import RecordedTiming

__all__ = ["RunStats", "cmd_stats", "run_stats"]


@dataclass(frozen=True)
class RunStats:
    """One run's numbers (None where its checkpoints recorded no timing)."""

    run: str | None
    checkpoints: int
    newest: str
    saves: int | None
    training_seconds: float | None
    stall_seconds: float | None

    @property
    def stall_share(self) -> float | None:
        """Stall time as a fraction of training time."""
        if self.training_seconds is None or self.stall_seconds is None or self.training_seconds <= 0:
            return None
        return self.stall_seconds / self.training_seconds

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "checkpoints": self.checkpoints, "newest": self.newest, "saves": self.saves,
                "training_seconds": _rounded(self.training_seconds), "stall_seconds": _rounded(self.stall_seconds),
                "stall_share": _rounded(self.stall_share)}  # fmt: skip


def _rounded(value: float | None) -> float | None:
    return round(value, 6) if value is not None else None


def run_stats(entries: list[Entry]) -> list[RunStats]:
    """The numbers of each run among ``entries`` (readable checkpoints, oldest first), in the order of
    their newest checkpoints."""
    runs: dict[str | None, list[Entry]] = {}
    for entry in entries:
        runs.setdefault(entry.run, []).append(entry)
    stats = []
    for run, members in sorted(runs.items(), key=lambda kv: kv[1][-1].order()):
        timed: RecordedTiming | None = next((t for t in (e.timing for e in reversed(members)) if t is not None), None)
        stats.append(RunStats(
            run=run, checkpoints=len(members), newest=members[-1].name,
            saves=timed.saves + 1 if timed is not None else None,
            training_seconds=timed.run_training if timed is not None else None,
            stall_seconds=timed.run_stalled if timed is not None else None,
        ))  # fmt: skip
    return stats


def _share(value: float | None) -> str:
    return f"{value * 100:.2f} %" if value is not None else "-"


def cmd_stats(args: argparse.Namespace, ctx: Context) -> int:
    """``savegame stats ROOT``."""
    scan = scan_root(args.root)
    readable = scan.readable
    stats = run_stats(readable)
    now = time.time()
    newest = max(readable, key=lambda e: e.timestamp) if readable else None
    at_risk = max(0.0, now - newest.timestamp) if newest is not None else None
    if args.json:
        print_json({
            "root": scan.root, "runs": [s.to_json() for s in stats],
            "newest": None if newest is None else {"name": newest.name, "run": newest.run,
                                                   "committed": newest.created},
            "work_at_risk_seconds": _rounded(at_risk),
        }, ctx.out)  # fmt: skip
        return EXIT_OK
    if newest is None:
        ctx.print(f"no checkpoints in {shown(scan.root)}")
        return EXIT_OK
    for s in stats:
        name = shown(s.run) if s.run is not None else "- (no run id)"
        kept = f"{s.checkpoints} checkpoint{'s' if s.checkpoints != 1 else ''} kept"
        if s.training_seconds is None:
            ctx.print(f"run {name}: {kept}, newest {shown(s.newest)}; no save timings recorded "
                      "(written before savegame recorded them)")  # fmt: skip
            continue
        ctx.print(f"run {name}: {s.saves} saves ({kept}), newest {shown(s.newest)}")
        ctx.print(f"  training time {human_seconds(s.training_seconds)}, blocked in saves "
                  f"{human_seconds(s.stall_seconds)}: {_share(s.stall_share)} of training time")  # fmt: skip
    assert newest.created is not None
    ctx.print(f"work at risk: {human_seconds(at_risk)} since the newest durable checkpoint {shown(newest.name)} "
              f"(committed {iso_time(newest.created)})")  # fmt: skip
    ctx.print("training time: wall-clock time the run's Checkpointers were open, up to its newest commit, "
              "summed over restarts (see 'savegame stats --help')")  # fmt: skip
    return EXIT_OK
