"""``savegame ls`` shows how long each save blocked training and how long it took to become durable;
``savegame stats ROOT`` prints the stall time as a share of training time and the work at risk
(issue 18, part 2), from the timings each checkpoint's manifest records (``progress["timing"]``).

Real Checkpointer runs (sync and background saves, retention, a restart with downtime in between), the
real command line (``savegame.cli.main``), numbers compared with what the Checkpointer returned and
with wall-clock bounds measured here; checkpoints without timings (written before they were recorded)
show ``-``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame
from savegame import Checkpointer, cli
from savegame.cli.common import human_seconds
from savegame.run.timing import recorded_timing


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 8))
    return {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)}


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli.main(list(argv)) == 0
    out = capsys.readouterr().out
    return out


def _timing(path: str) -> Any:
    manifest = savegame.read_manifest(path)
    timing = recorded_timing(manifest.progress, manifest.created.timestamp())
    assert timing is not None
    return timing


def test_ls_shows_blocked_and_durable_per_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = _state()
    # a checkpoint written before timings were recorded: Checkpointer progress without "timing"
    savegame.save(tmp_path / "old", state, progress={"checkpointer": 1, "sequence": 0, "epoch": 0, "step": 0})
    with Checkpointer(tmp_path) as ckpt:
        sync = ckpt.save(state, epoch=1, step=10)
    with Checkpointer(tmp_path, background=True, quiet=True) as ckpt:
        background = ckpt.save(state, epoch=2, step=20)
    sync_t, bg_t = _timing(sync.path), _timing(background.path)
    assert sync_t.blocking is None and sync_t.blocked == sync_t.durable > 0  # sync: blocked until durable
    assert sync_t.durable <= sync.seconds  # the recorded durable time ends at the manifest, inside the call
    assert bg_t.blocking is not None and 0 < bg_t.blocking <= background.seconds
    assert bg_t.durable > bg_t.blocking  # the write happened after training went on

    header, *rows, _summary = _cli(capsys, "ls", str(tmp_path)).rstrip().splitlines()

    def cell(row: str, column: str) -> str:  # the columns are right-aligned: a cell ends where its header does
        end = header.index(f" {column}") + 1 + len(column)
        return row[:end].rsplit(None, 1)[-1]

    by_row = {row.split()[0]: row for row in rows}
    assert cell(by_row["old"], "blocked") == cell(by_row["old"], "durable") == "-"
    for result, timing in ((sync, sync_t), (background, bg_t)):
        assert cell(by_row[result.name], "blocked") == human_seconds(timing.blocked)
        assert cell(by_row[result.name], "durable") == human_seconds(timing.durable)

    listing = json.loads(_cli(capsys, "ls", str(tmp_path), "--json"))
    by_name = {e["name"]: e for e in listing["checkpoints"]}
    assert by_name["old"]["blocking_seconds"] is None and by_name["old"]["durable_seconds"] is None
    assert by_name[background.name]["blocking_seconds"] == pytest.approx(bg_t.blocking, abs=1e-6)
    assert by_name[background.name]["durable_seconds"] == pytest.approx(bg_t.durable, abs=1e-6)


@pytest.mark.slow
def test_stats_counts_every_save_of_the_run_across_retention_and_restarts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = _state()
    work, downtime = 0.3, 1.5
    opened = time.perf_counter()
    seconds = []
    with Checkpointer(tmp_path, keep_last=1) as ckpt:  # retention deletes the older checkpoints...
        for epoch in (1, 2, 3):
            time.sleep(work)  # "training"
            saved = ckpt.save(state, epoch=epoch, step=10 * epoch)
            seconds.append(saved.seconds)
    session_end_timing = _timing(saved.path)
    time.sleep(downtime)  # the job is down: not training time
    with Checkpointer(tmp_path, keep_last=1, background=True, quiet=True) as ckpt:
        assert ckpt.restore(_state()) is not None
        time.sleep(work)
        last = ckpt.save(state, epoch=4, step=40)
        seconds.append(last.seconds)
    committed = time.perf_counter()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [last.name]

    before = time.time()
    stats = json.loads(_cli(capsys, "stats", str(tmp_path), "--json"))
    after = time.time()
    (run,) = stats["runs"]
    assert run["run"] == savegame.read_manifest(last.path).progress["run"]
    assert (run["saves"], run["checkpoints"], run["newest"]) == (4, 1, last.name)
    # ...but their stall still counts: each checkpoint records the run's sum so far, the exact blocking
    # time of each earlier save of its session; the newest save of a session counts up to its manifest
    third, fourth = session_end_timing, _timing(last.path)
    assert third.blocking is None and third.durable <= seconds[2]
    assert fourth.stalled == pytest.approx(seconds[0] + seconds[1] + third.durable, rel=1e-9)
    assert run["stall_seconds"] == pytest.approx(fourth.stalled + fourth.blocking, abs=2e-6)
    assert fourth.blocking == pytest.approx(seconds[3], abs=0.01)
    # training time: the Checkpointers' open time up to the newest commit, without the downtime
    assert 4 * work < run["training_seconds"] < committed - opened - downtime + 0.2
    assert run["stall_share"] == pytest.approx(run["stall_seconds"] / run["training_seconds"], rel=1e-4)
    created = savegame.read_manifest(last.path).created.timestamp()
    assert before - created - 1e-3 <= stats["work_at_risk_seconds"] <= after - created + 1e-3
    assert stats["newest"]["name"] == last.name

    text = _cli(capsys, "stats", str(tmp_path))
    assert f"run {run['run']}: 4 saves (1 checkpoint kept), newest {last.name}" in text
    assert f"{run['stall_share'] * 100:.2f} % of training time" in text
    assert f"blocked in saves {human_seconds(run['stall_seconds'])}" in text
    assert f"since the newest durable checkpoint {last.name}" in text


def test_stats_of_old_checkpoints_and_of_an_empty_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert _cli(capsys, "stats", str(tmp_path / "empty")).strip() == f"no checkpoints in {tmp_path / 'empty'}"
    empty = json.loads(_cli(capsys, "stats", str(tmp_path / "empty"), "--json"))
    assert empty["runs"] == [] and empty["newest"] is None and empty["work_at_risk_seconds"] is None

    root = tmp_path / "old"
    savegame.save(root / "epoch=001", _state(), progress={"checkpointer": 1, "sequence": 1, "epoch": 1, "step": 5})
    text = _cli(capsys, "stats", str(root))
    assert "no save timings recorded" in text and "since the newest durable checkpoint epoch=001" in text
    (run,) = json.loads(_cli(capsys, "stats", str(root), "--json"))["runs"]
    assert run["run"] is None and run["saves"] is None and run["stall_share"] is None
    assert run["training_seconds"] is None and run["checkpoints"] == 1
