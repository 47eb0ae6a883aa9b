"""kill -9 and power-loss harnesses: nothing committed is lost, nothing visible is torn.

``SAVEGAME_CRASH_TRIALS`` sets the number of kills (50 by default; ``make crashtest`` runs 500). Each
harness is also run against a deliberately broken protocol (``broken.py``) and must report the loss.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import figures
from .harness import ForkServer, run_trials
from .powerloss import replay, run_scenario

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

TRIALS = int(os.environ.get("SAVEGAME_CRASH_TRIALS", "50"))


@pytest.fixture(scope="module")
def server() -> Iterator[ForkServer]:
    """One fork server (torch imported and warmed up once) for the kill tests of this module."""
    with ForkServer() as running:
        yield running


@pytest.mark.timeout(max(600, 4 * TRIALS))
def test_sigkill_at_random_instants_loses_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], server: ForkServer
) -> None:
    report = run_trials(str(tmp_path), TRIALS, seed=int(os.environ.get("SAVEGAME_CRASH_SEED", "1")), server=server)
    with capsys.disabled():
        print("\n" + report.summary())
    figures.record("crash", "kill9", report.to_json())
    assert report.problems == [], "\n".join(report.problems[:20])
    assert report.kills == TRIALS
    assert report.newest_intact == TRIALS
    assert report.previous_intact == report.previous_checked
    # The harness must actually hit saves, or it proves nothing.
    assert report.kills_during_save >= TRIALS // 3, report.summary()
    assert report.saves_committed >= TRIALS // 2, report.summary()


def test_sigkill_harness_catches_a_protocol_that_publishes_early(tmp_path: Path, server: ForkServer) -> None:
    """With the folder made visible before its data is written, kills leave torn or lost checkpoints."""
    report = run_trials(str(tmp_path), 12, seed=7, broken="publish-early", server=server)
    figures.record("crash", "kill9_broken", {"trials": report.trials, "problems": len(report.problems),
                                             "trials_with_problems": report.trials_with_problems})  # fmt: skip
    assert report.problems, "the harness failed to notice a protocol that publishes before the data"
    assert any("does not verify" in p or "LOST" in p for p in report.problems), report.problems[:5]


def test_power_loss_after_any_call_loses_nothing(tmp_path: Path) -> None:
    recorder = run_scenario(str(tmp_path / "root"))
    report = replay(recorder, str(tmp_path))
    figures.record("powerloss", "real", {"crash_points": report.crash_points, "trees": report.trees_checked,
                                         "verified": report.checkpoints_verified,
                                         "problems": len(report.problems)})  # fmt: skip
    assert report.problems == [], "\n".join(report.problems[:20])
    assert report.crash_points > 50 and report.checkpoints_verified > 50


def test_power_loss_with_direct_io_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same replay with every data file past its first 8 KiB written direct through 4 KiB staging
    buffers (savegame.storage.local.direct): padded last blocks, truncates and all."""
    from savegame.storage.local import FileOps, direct

    monkeypatch.setattr(direct, "DIRECT_FROM_BYTES", 8 << 10)
    monkeypatch.setattr(direct, "STAGE_BYTES", 4 << 10)
    monkeypatch.setattr(FileOps, "direct_io", True)
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        monkeypatch.setattr(direct, "FILESYSTEMS", direct.FILESYSTEMS | {direct.filesystem_type(fd)})
    finally:
        os.close(fd)
    recorder = run_scenario(str(tmp_path / "root"))
    assert any(op[0] == "truncate" for op in recorder.log), "no file went direct: the test proves nothing"
    report = replay(recorder, str(tmp_path))
    assert report.problems == [], "\n".join(report.problems[:20])
    assert report.crash_points > 50 and report.checkpoints_verified > 50


@pytest.mark.parametrize("broken", ["no-fsync", "no-dirsync"])
def test_power_loss_replay_catches_missing_fsyncs(tmp_path: Path, broken: str) -> None:
    """Dropping file fsyncs tears committed checkpoints; dropping directory fsyncs loses them."""
    recorder = run_scenario(str(tmp_path / "root"), broken=broken)
    report = replay(recorder, str(tmp_path))
    figures.record("powerloss", broken, {"crash_points": report.crash_points, "problems": len(report.problems)})
    assert report.problems, f"the replay failed to notice a protocol without {broken[3:]}"
    expected = "does not verify" if broken == "no-fsync" else "LOST"
    assert any(expected in p for p in report.problems), report.problems[:5]
