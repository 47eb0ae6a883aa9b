"""A reader polling "the newest committed checkpoint" while a writer process saves, deletes and
overwrites: it never sees a partial checkpoint, never goes back in time, and never gets wrong data.
Against the deliberately broken protocol (``crash/broken.py``) the same reader sees the damage."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import savegame
from crash import figures
from savegame.storage.local import LocalStorage

WORKER = str(Path(__file__).parent / "crash" / "worker.py")
SAVES = int(os.environ.get("SAVEGAME_POLL_SAVES", "150"))

pytestmark = pytest.mark.subprocess


@dataclass
class PollReport:
    polls: int = 0
    loads: int = 0
    distinct: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)  # a checkpoint listed as committed failed to load
    wrong: list[str] = field(default_factory=list)  # it loaded, with content it never had
    backwards: int = 0

    def summary(self) -> str:
        return (
            f"{self.polls} polls, {self.loads} loads of {len(self.distinct)} distinct checkpoints, "
            f"{len(self.errors)} errors, {len(self.wrong)} wrong contents, {self.backwards} steps back"
        )


def _check_content(state: dict[str, object], name: str) -> str | None:
    step = state["step"]
    a = state["a"]
    c = state["b"]["c"]  # type: ignore[index]
    assert isinstance(a, np.ndarray) and isinstance(c, np.ndarray)
    if name.startswith("ckpt-") and int(name[5:]) != step:
        return f"{name} holds step {step}"
    if not (a == step).all() or not (c == 2 * step).all():
        return f"{name}: arrays of mixed saves (step {step})"
    return None


def poll(
    root: Path,
    writer: subprocess.Popen[str],
    name: str | None = None,
    *,
    verify: bool = True,
    stop_on_wrong: bool = False,
) -> PollReport:
    """Load the newest committed checkpoint (or ``name``) over and over until the writer exits."""
    report = PollReport()
    storage = LocalStorage(root)
    newest_step = -1
    while True:
        done = writer.poll() is not None
        names = storage.committed()
        report.polls += 1
        target = name if name is not None else (names[-1] if names else None)
        if target is not None and target in names:
            try:
                state = savegame.load(root / target, verify=verify)
            except savegame.CheckpointError as exc:
                report.errors.append(f"{target}: {type(exc).__name__}: {exc}")
            else:
                report.loads += 1
                report.distinct.add(f"{target}@{state['step']}")
                problem = _check_content(state, target)
                if problem:
                    report.wrong.append(problem)
                    if stop_on_wrong:
                        writer.kill()
                        return report
                if int(state["step"]) < newest_step:
                    report.backwards += 1
                newest_step = max(newest_step, int(state["step"]))
        if done:
            return report


def _writer(root: Path, mode: str, count: int = SAVES) -> subprocess.Popen[str]:
    env = dict(os.environ, SAVEGAME_BROKEN_PAUSE="0.002")
    return subprocess.Popen(
        [sys.executable, WORKER, "write-loop", str(root), str(count), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(writer: subprocess.Popen[str]) -> None:
    out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0 and "done" in out, err


def test_reader_never_sees_a_partial_checkpoint(tmp_path: Path) -> None:
    writer = _writer(tmp_path, "named")
    report = poll(tmp_path, writer)
    _finish(writer)
    figures.record(
        "concurrency",
        "reader_named",
        {
            "saves": SAVES,
            "polls": report.polls,
            "loads": report.loads,
            "distinct": len(report.distinct),
            "errors": len(report.errors),
            "wrong": len(report.wrong),
        },
    )
    print(report.summary())
    assert report.errors == [] and report.wrong == [] and report.backwards == 0, report.summary()
    assert len(report.distinct) >= min(20, SAVES // 10), f"the reader barely overlapped the writer: {report.summary()}"
    assert LocalStorage(tmp_path).committed()[-1] == f"ckpt-{SAVES - 1:06d}"


def test_reader_of_an_overwritten_name_never_gets_wrong_data(tmp_path: Path) -> None:
    """``last`` is swapped atomically under the reader: a load may fail (the files it opened belong to
    the other version; the hashes say so) but never returns a mix of two saves."""
    writer = _writer(tmp_path, "overwrite")
    time.sleep(0.05)
    report = poll(tmp_path, writer, name="last")
    _finish(writer)
    figures.record(
        "concurrency",
        "reader_overwrite",
        {
            "saves": SAVES,
            "polls": report.polls,
            "loads": report.loads,
            "errors": len(report.errors),
            "wrong": len(report.wrong),
        },
    )
    print(report.summary())
    assert report.wrong == [] and report.backwards == 0, report.summary()
    assert all("HashMismatch" in e or "Truncated" in e or "NotACheckpoint" in e for e in report.errors), report.errors[
        :3
    ]
    assert report.loads > 0


def test_the_reader_poll_catches_a_protocol_that_publishes_early(tmp_path: Path) -> None:
    writer = _writer(tmp_path, "publish-early", count=30)
    report = poll(tmp_path, writer)
    _finish(writer)
    figures.record("concurrency", "reader_broken", {"saves": 30, "errors": len(report.errors)})
    assert report.errors, f"the reader failed to notice torn checkpoints: {report.summary()}"


def test_unverified_reader_of_an_overwritten_name_never_gets_mixed_data(tmp_path: Path) -> None:
    writer = _writer(tmp_path, "overwrite", count=1500)
    report = poll(tmp_path, writer, name="last", verify=False, stop_on_wrong=True)
    writer.communicate(timeout=300)
    assert report.wrong == [], report.wrong[:3]
