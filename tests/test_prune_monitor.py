"""Issue 15 item 3: pruning by a misspelt monitor must not delete the real best.

``savegame prune --keep-best 1 --monitor val_los`` (a typo) used to rank nothing, keep only the newest and
delete the others, best included, with exit 0. A monitor no checkpoint recorded is now an error
(ConfigError listing the recorded metrics; exit 2 on the command line) that deletes nothing, and
retention never deletes the best the manifests record, whatever monitor or keep policy it is given.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from savegame.errors import ConfigError
from savegame.run.checkpointer import Checkpointer

SRC = str(Path(__file__).resolve().parents[1] / "src")
LOSSES = [0.9, 0.5, 0.2, 0.4, 0.6]  # the best (0.2) is the third of five checkpoints
BEST = "epoch=003-step=000030"


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m savegame.cli`` from this checkout."""
    env = {**os.environ, "PYTHONPATH": SRC, "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "savegame.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip


def names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    """Five real checkpoints of a small model, monitored by val_loss (the best in the middle)."""
    root = tmp_path / "run"
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Checkpointer(root, monitor="val_loss", every_n_epochs=1) as ckpt:
        for epoch, loss in enumerate(LOSSES, start=1):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            ckpt.step({"model": model, "optimizer": opt}, epoch=epoch, step=10 * epoch,
                      metrics={"val_loss": loss, "val_acc": 1 - loss})  # fmt: skip
        assert ckpt.best is not None and ckpt.best.name == BEST
    assert len(names(root)) == 5
    return root


def test_cli_prune_with_a_misspelt_monitor_fails_and_deletes_nothing(run_root: Path) -> None:
    before = names(run_root)
    result = cli("prune", run_root, "--keep-best", "1", "--monitor", "val_los")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "val_los" in result.stderr and "'val_loss'" in result.stderr and "'val_acc'" in result.stderr
    assert "Traceback" not in result.stderr
    assert names(run_root) == before
    dry = cli("prune", run_root, "--keep-last", "1", "--monitor", "val_los", "--dry-run", "--json")
    assert dry.returncode == 2 and names(run_root) == before


def test_cli_prune_by_another_recorded_metric_keeps_the_recorded_best(run_root: Path) -> None:
    # val_acc ranks the same checkpoints the other way round: 0.8 (epoch 1) is its best; the run's
    # recorded best (val_loss 0.2, epoch 3) must survive too, and the newest.
    result = cli("prune", run_root, "--keep-best", "1", "--monitor", "val_acc", "--mode", "min", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert BEST not in report["deleted"]
    assert BEST in names(run_root)
    assert "epoch=005-step=000050" in names(run_root)


def test_cli_prune_keep_last_never_deletes_the_recorded_best(run_root: Path) -> None:
    result = cli("prune", run_root, "--keep-last", "1")
    assert result.returncode == 0, result.stderr
    assert names(run_root) == [BEST, "epoch=005-step=000050"]


def test_api_prune_with_a_misspelt_monitor_raises_and_deletes_nothing(run_root: Path) -> None:
    before = names(run_root)
    with Checkpointer(run_root, monitor="val_los", mode="min", keep_best=1) as ckpt:
        for dry_run in (True, False):
            with pytest.raises(ConfigError, match=r"'val_los'.*recorded metrics: 'val_acc', 'val_loss'"):
                ckpt.prune(dry_run=dry_run)
    assert names(run_root) == before


def test_api_prune_by_another_metric_keeps_the_recorded_best(run_root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run_root, copy)
    with Checkpointer(copy, monitor="val_acc", mode="min", keep_best=1) as ckpt:
        assert BEST not in ckpt.prune(dry_run=True)
        deleted = ckpt.prune(dry_run=False)
    assert BEST not in deleted and BEST in names(copy)
    with Checkpointer(run_root, keep_last=1) as ckpt:  # no monitor at all: the recorded best stays
        deleted = ckpt.prune(dry_run=False)
    assert names(run_root) == [BEST, "epoch=005-step=000050"]
    assert sorted(deleted) == ["epoch=001-step=000010", "epoch=002-step=000020", "epoch=004-step=000040"]


@pytest.mark.parametrize("composed", [False, True], ids=["KeepBest", "KeepUnion"])
def test_a_misspelled_keep_best_monitor_deletes_nothing(tmp_path: Path, composed: bool) -> None:
    """``keep=KeepBest(3, "val_los")`` (a typo of the recorded ``val_loss``) ranked nothing, so retention
    after each commit and prune() deleted the real best ones without a word. Now retention deletes
    nothing and warns once, and prune() raises ConfigError naming the recorded metrics."""
    from savegame.policies import KeepBest, KeepLast, KeepUnion

    with pytest.raises(ConfigError, match=r"KeepBest.*'val_los'.*pass mode='min' or mode='max'"):
        KeepBest(3, "val_los")  # mode="auto" cannot rank by a name it does not know: refused when built
    best = KeepBest(3, "val_los", mode="min")
    keep = KeepUnion(KeepLast(1), best) if composed else best
    ckpt = Checkpointer(tmp_path, monitor="val_loss", keep=keep, name="e{epoch:02d}")
    model = torch.nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="retention deletes nothing.*'val_los'.*'val_loss'") as caught:
        for epoch, loss in enumerate([0.1, 0.9, 0.8, 0.3, 0.2, 0.7], start=1):
            ckpt.save({"model": model}, epoch=epoch, metrics={"val_loss": loss})
    assert len([w for w in caught if "retention deletes nothing" in str(w.message)]) == 1
    assert names(tmp_path) == [f"e{i:02d}" for i in range(1, 7)]
    with pytest.raises(ConfigError, match="'val_los'"):
        ckpt.prune()
    assert names(tmp_path) == [f"e{i:02d}" for i in range(1, 7)]
    ckpt.close()


def test_save_with_metrics_that_lack_the_monitor_raises_and_keeps_the_best(tmp_path: Path) -> None:
    """``monitor="val_los"`` (a typo) with ``keep_last=1``: each explicit ``save`` at an epoch end tracked no
    best, so retention deleted the real best (0.1) with no word. ``step`` raised for the same typo; now
    ``save`` does too, before writing anything. Saves without metrics or inside an epoch are not judged."""
    model = torch.nn.Linear(2, 2)
    with Checkpointer(tmp_path, monitor="val_los", mode="min", keep_last=1, name="e{epoch:02d}") as ckpt:
        with pytest.raises(ConfigError, match=r"'val_los' is not in metrics= \(available: val_loss\)"):
            ckpt.save({"model": model}, epoch=1, metrics={"val_loss": 0.5})
        assert names(tmp_path) == []
        ckpt.save({"model": model}, epoch=1)  # no metrics: nothing to judge
        ckpt.save({"model": model}, epoch=1, step=3, metrics={"train_loss": 0.2}, epoch_end=False, name="mid")
    assert names(tmp_path) == ["mid"]


def test_contradicting_or_meaningless_ranking_options_are_refused(tmp_path: Path) -> None:
    """Accepted silently, each of these kept the wrong checkpoints or did nothing: a KeepBest or
    OnImprovement that ranks the monitor in the other direction than the Checkpointer's best tracking
    (the second best deleted, the two worst kept), a policy class instead of an instance (every save
    then failed its retention), and mode/min_delta/threshold without a monitor (ignored)."""
    from savegame.policies import KeepBest, KeepLast, KeepUnion, Never, OnImprovement

    with pytest.raises(ConfigError, match=r"KeepBest\('val_score'\) ranks it by 'min'.*by 'max'"):
        Checkpointer(tmp_path, monitor="val_score", mode="max", keep=KeepBest(2, "val_score", mode="min"))
    with pytest.raises(ConfigError, match=r"OnImprovement\('val_loss'\) ranks it by 'max'"):
        Checkpointer(tmp_path, monitor="val_loss", save=OnImprovement("val_loss", mode="max"))
    with pytest.raises(ConfigError, match=r"must be a keep policy \(an instance\)"):
        Checkpointer(tmp_path, keep=KeepLast)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="the class KeepUnion: pass an instance"):
        KeepUnion(KeepLast(1), KeepUnion)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="an instance"):
        Checkpointer(tmp_path, save=Never)  # type: ignore[arg-type]
    for knob in ({"mode": "max"}, {"min_delta": 0.5}, {"threshold": 0.5}):
        with pytest.raises(ConfigError, match="pass monitor= too"):
            Checkpointer(tmp_path, **knob)  # type: ignore[arg-type]
    # the same direction, said twice or inferred, is fine
    Checkpointer(tmp_path, monitor="val_score", mode="max", keep=KeepBest(2, "val_score", mode="max")).close()
    Checkpointer(tmp_path, monitor="val_loss", keep=KeepUnion(KeepLast(1), KeepBest(2, "val_loss"))).close()
    assert names(tmp_path) == []


@pytest.mark.parametrize(("monitor", "mode"), [("val_acc", "auto"), ("val_loss", "max")])
def test_a_resume_ranking_by_another_monitor_or_mode_keeps_the_earlier_best(
    tmp_path: Path, monitor: str, mode: str
) -> None:
    """Only the best named by a run's newest manifest was protected: once the resumed run's first manifest
    recorded a best by its new monitor (or the other mode), the first ranking's best was deleted."""
    model = torch.nn.Linear(2, 2)
    with Checkpointer(tmp_path, monitor="val_loss", keep_last=1, name="e{epoch:02d}") as ckpt:
        for epoch, loss in enumerate([0.9, 0.1, 0.5], start=1):
            ckpt.step({"model": model}, epoch=epoch, metrics={"val_loss": loss, "val_acc": 0.5 + epoch / 100})
    assert names(tmp_path) == ["e02", "e03"]
    with Checkpointer(tmp_path, monitor=monitor, mode=mode, keep_last=1, name="e{epoch:02d}") as ckpt:  # type: ignore[arg-type]
        ckpt.restore({"model": model})
        ckpt.step({"model": model}, epoch=4, metrics={"val_loss": 0.6, "val_acc": 0.9})
        ckpt.step({"model": model}, epoch=5, metrics={"val_loss": 0.7, "val_acc": 0.6})
    assert "e02" in names(tmp_path) and "e05" in names(tmp_path)


def test_a_copy_of_a_checkpoint_in_the_root_is_never_deleted(tmp_path: Path) -> None:
    """``cp -r epoch=002 keep_me_forever`` inside the root: the copy's manifest is the original's, so
    retention took it for a checkpoint of the run and deleted it at the next save. A run never has two
    checkpoints with one sequence number: both folders are kept (and still load)."""
    import shutil

    import savegame

    model = torch.nn.Linear(2, 2)
    with Checkpointer(tmp_path, monitor="val_loss", keep_last=1, name="e{epoch:02d}") as ckpt:
        ckpt.step({"model": model}, epoch=1, metrics={"val_loss": 0.5})
        ckpt.step({"model": model}, epoch=2, metrics={"val_loss": 0.1})
        shutil.copytree(tmp_path / "e02", tmp_path / "keep_me_forever")
        for epoch in (3, 4):
            ckpt.step({"model": model}, epoch=epoch, metrics={"val_loss": 0.1 * epoch})
        assert sorted(ckpt.prune(dry_run=False)) == []
    assert names(tmp_path) == ["e02", "e04", "keep_me_forever"]
    savegame.load(tmp_path / "keep_me_forever")


def test_which_best_refuses_a_damaged_best_instead_of_serving_the_runner_up(tmp_path: Path) -> None:
    """The best's manifest damaged: ``restore(which="best")`` loaded the second best without a warning,
    while the surviving manifests still named the damaged one. Now the lookup says the best is damaged."""
    from savegame.errors import CorruptCheckpointError
    from savegame.run.index import RunIndex

    model = torch.nn.Linear(2, 2)
    with Checkpointer(tmp_path, monitor="val_loss", name="e{epoch:02d}") as ckpt:
        for epoch, loss in enumerate([0.5, 0.1, 0.3], start=1):
            ckpt.step({"model": model}, epoch=epoch, metrics={"val_loss": loss})
    manifest = tmp_path / "e02" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"', b"'", 1))
    with pytest.raises(CorruptCheckpointError, match=r"the best checkpoint e02 \(by val_loss, min\) is damaged"):
        RunIndex.open(str(tmp_path)).resolve("best")
    assert RunIndex.open(str(tmp_path)).resolve("e03") == "e03"
    with Checkpointer(tmp_path, monitor="val_loss") as ckpt, pytest.raises(CorruptCheckpointError, match="e02"):
        ckpt.restore({"model": model}, "best")
