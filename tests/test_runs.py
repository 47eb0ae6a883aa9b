"""Issue 15 item 7: several training runs in one directory.

``restart="off"`` in a used directory used to keep the earlier run's best (``ckpt.best`` was run 1's) and
its ``keep_last`` deleted run 1's checkpoints. Each manifest now records the run that wrote it; a fresh
run tracks its own best, retention never deletes another run's checkpoints, manifests without a run id
(older savegame) belong to no current run, and ``savegame ls`` shows the runs apart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from savegame import read_manifest
from savegame.errors import CheckpointNotFoundError
from savegame.run.checkpointer import Checkpointer

SRC = str(Path(__file__).resolve().parents[1] / "src")


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC, "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "savegame.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


def run_of(root: Path, name: str) -> Any:
    progress = json.loads((root / name / "manifest.json").read_text())["progress"]
    return progress.get("run")


def train(root: Path, losses: list[float], **options: Any) -> tuple[Checkpointer, torch.nn.Module]:
    """One run: a real model trained one step per epoch, a checkpoint per epoch with ``val_loss``."""
    torch.manual_seed(len(losses))
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(root, monitor="val_loss", **options)
    with ckpt:
        for epoch, loss in enumerate(losses, start=1):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            ckpt.step({"model": model, "optimizer": opt}, epoch=epoch, step=epoch, metrics={"val_loss": loss})
    return ckpt, model


def test_a_fresh_run_has_its_own_best_and_never_deletes_the_earlier_run(tmp_path: Path) -> None:
    root = tmp_path / "run"
    first, _ = train(root, [0.3, 0.1, 0.2, 0.25], keep_last=2)
    run1 = names(root)
    assert run1 == ["epoch=002-step=000002", "epoch=003-step=000003", "epoch=004-step=000004"]
    assert first.best is not None and first.best.name == "epoch=002-step=000002"

    second, model = train(root, [0.9, 0.7, 0.8, 0.85], keep_last=2, restart="off")
    assert second.run_id != first.run_id
    # run 2's best is its own (0.7, its epoch 2), although run 1 had better values
    best = second.best
    assert best is not None and best.name == "epoch=002-step=000002-v1" and best.run == second.run_id
    assert second.best_value == 0.7
    # run 1's checkpoints are all still there; run 2 kept its 2 newest and its best
    assert set(run1) <= set(names(root))
    run2 = sorted(set(names(root)) - set(run1))
    assert run2 == ["epoch=002-step=000002-v1", "epoch=003-step=000003-v1", "epoch=004-step=000004-v1"]
    assert {run_of(root, n) for n in run1} == {first.run_id}
    assert {run_of(root, n) for n in run2} == {second.run_id}
    # restoring run 2's best gives run 2's weights
    fresh = torch.nn.Linear(4, 2)
    with Checkpointer(root, monitor="val_loss", restart="off") as third:
        assert third.best is None  # a third fresh run has no best yet
        with pytest.raises(CheckpointNotFoundError, match="restart='off' started a new run"):
            third.restore({"model": fresh}, which="best")
    with Checkpointer(root, monitor="val_loss") as resumed:  # restart="auto": continues run 2
        assert resumed.run_id == second.run_id
        assert resumed.best is not None and resumed.best.name == "epoch=002-step=000002-v1"
        restored = resumed.restore({"model": fresh})
        assert restored is not None and restored.name == "epoch=004-step=000004-v1"
    assert torch.equal(fresh.weight, model.weight)


def test_a_resumed_run_keeps_its_run_id_and_its_retention(tmp_path: Path) -> None:
    root = tmp_path / "run"
    first, _ = train(root, [0.5, 0.4], keep_last=1)
    with Checkpointer(root, monitor="val_loss", keep_last=1) as ckpt:
        assert ckpt.run_id == first.run_id
        assert ckpt.restore({"model": torch.nn.Linear(4, 2)}, strict=False) is not None
        ckpt.step({"model": torch.nn.Linear(4, 2)}, epoch=3, step=3, metrics={"val_loss": 0.45})
    # one run: retention went on deleting its older checkpoints (the best, epoch 2, is kept)
    assert names(root) == ["epoch=002-step=000002", "epoch=003-step=000003"]
    assert {run_of(root, n) for n in names(root)} == {first.run_id}


def strip_run_ids(root: Path, resign: Callable[..., dict[str, Any]]) -> None:
    """Make the checkpoints look written by a savegame without run ids (re-signed manifests)."""
    for name in names(root):
        resign(root / name, lambda body: body["progress"].pop("run"))
        assert "run" not in (read_manifest(str(root / name)).progress or {})


def test_checkpoints_without_a_run_id_stay_readable_and_are_never_deleted_by_a_new_run(
    tmp_path: Path, resign: Callable[..., dict[str, Any]]
) -> None:
    root = tmp_path / "run"
    train(root, [0.3, 0.2, 0.4])
    strip_run_ids(root, resign)
    legacy = names(root)
    with Checkpointer(root, monitor="val_loss") as reader:  # readable, and the run they form has its best
        assert [r.run for r in reader.list()] == [None, None, None]
        assert reader.best is not None and reader.best.name == "epoch=002-step=000002"
        assert reader.restore({"model": torch.nn.Linear(4, 2)}, strict=False) is not None
    # a run resumed from them (restart="auto") and a fresh one both leave them alone
    train(root, [0.35, 0.36, 0.37], keep_last=1)
    train(root, [0.5, 0.6, 0.7], keep_last=1, restart="off")
    assert set(legacy) <= set(names(root))
    listing = json.loads(cli("ls", root, "--json").stdout)
    runs = [c["run"] for c in listing["checkpoints"]]
    assert runs[:3] == [None, None, None] and len(set(runs)) == 3


def test_ls_shows_the_runs_apart(tmp_path: Path) -> None:
    root = tmp_path / "run"
    first, _ = train(root, [0.3, 0.2])
    one_run = cli("ls", root)
    assert one_run.returncode == 0 and "run" not in one_run.stdout.splitlines()[0].split()
    second, _ = train(root, [0.6, 0.5], restart="off")
    table = cli("ls", root)
    assert table.returncode == 0, table.stderr
    header, *rows, summary = table.stdout.strip().splitlines()
    assert header.split()[-1] == "run"
    assert [r.split()[-1] for r in rows] == [first.run_id] * 2 + [second.run_id] * 2
    assert "2 runs" in summary
    # the best shown is the newest run's (as the Checkpointer continuing it reports)
    assert "best by val_loss (min): epoch=002-step=000002-v1" in summary
    listing = json.loads(cli("ls", root, "--json").stdout)
    assert [c["run"] for c in listing["checkpoints"]] == [first.run_id] * 2 + [second.run_id] * 2
    assert listing["best"] == "epoch=002-step=000002-v1"


def test_cli_prune_applies_to_each_run_separately(tmp_path: Path) -> None:
    root = tmp_path / "run"
    train(root, [0.3, 0.2, 0.4, 0.5])
    train(root, [0.9, 0.8, 0.7, 0.75], restart="off")
    dry = cli("prune", root, "--keep-last", "1", "--dry-run").stdout.splitlines()
    assert any(line.startswith("keep") and "epoch=002-step=000002 " in line and "[best of its run]" in line
               for line in dry), dry  # fmt: skip
    assert any("epoch=004-step=000004 " in line and "[newest of its run]" in line for line in dry), dry
    result = cli("prune", root, "--keep-last", "1", "--json")
    assert result.returncode == 0, result.stderr
    # each run keeps its newest and its best; nothing else of either run survives
    assert names(root) == ["epoch=002-step=000002", "epoch=003-step=000003-v1", "epoch=004-step=000004",
                           "epoch=004-step=000004-v1"]  # fmt: skip
