"""Issue 16 item 2: one read-only RunIndex of a run root, used by the Checkpointer, the CLI and Keras.

The root below is written by real Checkpointers: two runs (the first with a pinned checkpoint and its
own best), a checkpoint not written by a Checkpointer, one whose manifest is damaged, one whose
manifest is a symlink, and a dead writer's staging debris. The RunIndex must answer what the
Checkpointer and the CLI answer (they now use it), and reading must change nothing on disk.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import savegame
from savegame import cli
from savegame.cli.scan import doomed_by_retention, resolve_checkpoint, scan_root
from savegame.errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from savegame.run.checkpointer import Checkpointer, build_keep_policy
from savegame.run.index import RunIndex

RUN_A = [0.5, 0.3, 0.4, 0.45]
RUN_B = [0.9, 0.8, 0.85]


def _train(root: Path, losses: list[float], *, pin_epoch: int | None = None, **options: Any) -> str:
    """One run of a real model, a checkpoint per epoch with ``val_loss``; returns the run id."""
    torch.manual_seed(len(losses))
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Checkpointer(root, monitor="val_loss", **options) as ckpt:
        for epoch, loss in enumerate(losses, start=1):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            state = {"model": model, "optimizer": opt}
            if epoch == pin_epoch:
                ckpt.save(state, epoch=epoch, step=epoch, metrics={"val_loss": loss}, pin=True)
            else:
                ckpt.step(state, epoch=epoch, step=epoch, metrics={"val_loss": loss})
        return ckpt.run_id


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    """The mixed root described in the module docstring (its two run ids in ``runs.json`` beside it)."""
    root = tmp_path / "run"
    run_a = _train(root, RUN_A, pin_epoch=1)
    run_b = _train(root, RUN_B, restart="off")
    savegame.save(root / "foreign", {"w": np.arange(3.0)})
    shutil.copytree(root / "epoch=002-step=000002", root / "broken")
    (root / "broken" / "manifest.json").write_text('{"format": "savegame", "trunc')
    (root / "linked").mkdir()
    os.symlink(root / "epoch=003-step=000003" / "manifest.json", root / "linked" / "manifest.json")
    debris = root / ".staging-otherhost-4242-0123456789ab"
    debris.mkdir()
    (debris / "model.sgt").write_bytes(b"half a file")
    (tmp_path / "runs.json").write_text(json.dumps({"a": run_a, "b": run_b}))
    return root


def _runs(root: Path) -> dict[str, str]:
    runs: dict[str, str] = json.loads((root.parent / "runs.json").read_text())
    return runs


def _names(root: Path, run: str) -> list[str]:
    return [r.name for r in Checkpointer(root, lock=False).list() if r.run == run]


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` (and root itself) with its type, size and mtime in ns (symlinks not followed)."""
    found = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        found[str(path.relative_to(root.parent))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


# --------------------------------------------------------------------------------------------------
# What the index answers


def test_entries_order_latest_and_unreadable(root: Path) -> None:
    index = RunIndex.open(root)
    runs = _runs(root)
    ordered = [e.name for e in index.ordered()]
    # the foreign checkpoint (no sequence) first, then both runs by sequence; the symlinked manifest is
    # not a committed checkpoint (the storage's rule), the damaged one is kept aside with its error
    assert ordered[0] == "foreign" and not index.entries["foreign"].ours
    assert "linked" not in ordered and "linked" not in index.unreadable
    assert set(index.unreadable) == {"broken"} and isinstance(index.unreadable["broken"], CorruptCheckpointError)
    assert [e.run for e in index.ordered()[1:]] == [runs["a"]] * len(RUN_A) + [runs["b"]] * len(RUN_B)
    assert index.latest is not None and index.latest.name == ordered[-1] and index.latest.run == runs["b"]
    assert [e.epoch for e in index.ordered()[1:]] == [1, 2, 3, 4, 1, 2, 3]
    pinned = [e.name for e in index.ordered() if e.pinned]
    assert pinned == [_names(root, runs["a"])[0]]
    assert index.max_sequence == len(RUN_A) + len(RUN_B)
    assert index.names() == set(ordered) | {"broken"}
    # the Checkpointer lists the same, in the same order
    records = Checkpointer(root, monitor="val_loss", lock=False).list()
    assert [r.name for r in records] == ordered


def test_best_per_run_and_for_the_current_run(root: Path) -> None:
    index = RunIndex.open(root)
    runs = _runs(root)
    a, b = _names(root, runs["a"]), _names(root, runs["b"])
    newest = index.best("val_loss", "min")
    assert newest is not None and newest.name == b[1] and newest.value == pytest.approx(0.8)
    of_a = index.best("val_loss", "min", entries=index.run_entries(runs["a"]))
    assert of_a is not None and of_a.name == a[1]
    assert index.recorded_monitor() == ("val_loss", "min")
    assert index.best(None, None) is None
    # a threshold nothing beats: no best (recomputed), as the Checkpointer's threshold= says
    assert index.best("val_loss", "max", threshold=10.0) is None
    # the Checkpointer continuing the newest run, and the CLI, agree
    assert Checkpointer(root, monitor="val_loss", lock=False).best.name == b[1]  # type: ignore[union-attr]
    assert scan_root(str(root)).best.name == b[1]  # type: ignore[union-attr]


def test_resolve_and_the_cli_agree(root: Path) -> None:
    index = RunIndex.open(root)
    runs = _runs(root)
    b = _names(root, runs["b"])
    assert index.resolve("latest") == b[-1]
    assert index.resolve("best") == b[1]
    assert index.resolve("foreign") == "foreign"
    assert index.resolve("broken") == "broken"  # there, damaged: reading it reports what is wrong
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint 'nope'"):
        index.resolve("nope")
    for which in ("latest", "best", "foreign", "broken"):
        assert resolve_checkpoint(str(root), which) == str(root / index.resolve(which))
    assert resolve_checkpoint(str(root / "best")) == str(root / b[1])
    empty = root.parent / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointNotFoundError, match="holds no readable checkpoints"):
        RunIndex.open(empty).resolve("latest")


@pytest.mark.parametrize(("keep_last", "keep_best"), [(1, None), (1, 1), (2, None), (None, 2)])
def test_doomed_agrees_with_the_checkpointer_and_the_cli(root: Path, keep_last: int | None,
                                                         keep_best: int | None) -> None:  # fmt: skip
    index = RunIndex.open(root)
    runs = _runs(root)
    a, b = _names(root, runs["a"]), _names(root, runs["b"])
    policy = build_keep_policy(monitor="val_loss", mode="min", keep_last=keep_last, keep_best=keep_best)
    best = index.best("val_loss", "min")
    assert best is not None
    every_run = index.doomed(policy, run=None, best=best.name, monitor="val_loss", mode="min")
    checkpointer = Checkpointer(root, monitor="val_loss", keep_last=keep_last, keep_best=keep_best, lock=False)
    assert checkpointer.prune(dry_run=True, all_runs=True) == every_run
    scan = scan_root(str(root))
    assert [e.name for e in doomed_by_retention(scan, keep_last=keep_last, keep_best=keep_best)] == every_run
    # never: the newest, the bests (each run's), the pinned one, foreign ones, the damaged one
    assert not {b[-1], b[1], a[1], a[0], a[-1], "foreign", "broken"} & set(every_run)
    this_run = index.doomed(policy, run=runs["b"], best=best.name)
    assert checkpointer.prune(dry_run=True) == this_run and set(this_run) <= set(b)


def test_a_misspelt_monitor_is_refused_before_anything_is_planned(root: Path) -> None:
    index = RunIndex.open(root)
    with pytest.raises(ConfigError, match="no checkpoint recorded the metric 'val_los'"):
        index.check_monitor_recorded("val_los", run=None, where=str(root))
    index.check_monitor_recorded("val_loss", run=None, where=str(root))


def test_the_index_follows_a_writer(root: Path) -> None:
    index = RunIndex.open(root)
    before = index.latest
    runs = _runs(root)
    a = _names(root, runs["a"])
    shutil.rmtree(root / a[2])
    _train(root, [0.1])  # continues run b: one more checkpoint
    assert index.refresh() == {}
    assert a[2] not in index.entries and index.latest is not None and index.latest != before
    assert index.latest.run == runs["b"] and index.latest.sequence == len(RUN_A) + len(RUN_B) + 1


# --------------------------------------------------------------------------------------------------
# Reading never writes


def test_reading_a_root_changes_nothing_on_disk(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(root)
    index = RunIndex.open(root)
    index.refresh(relist=True)
    index.ordered()
    index.best("val_loss", "min")
    for which in ("latest", "best", "foreign", "broken"):
        index.resolve(which)
    index.doomed(build_keep_policy(monitor="val_loss", mode="min", keep_last=1, keep_best=None), run=None)
    scan = scan_root(str(root))
    doomed_by_retention(scan, keep_last=1, keep_best=None)
    resolve_checkpoint(str(root), "best")
    for argv in (["ls", str(root)], ["ls", str(root), "--json"], ["prune", str(root), "--keep-last", "1", "--dry-run"],
                 ["inspect", str(root), "--which", "best"]):  # fmt: skip
        assert cli.main(argv) in (0, 1), argv
    capsys.readouterr()
    assert snapshot(root) == before
    missing = root.parent / "missing"
    assert RunIndex.open(missing).entries == {} and not missing.exists()


# --------------------------------------------------------------------------------------------------
# Where the copies disagreed


def test_restoring_a_checkpoint_by_name_whose_manifest_is_damaged_reports_the_damage(root: Path) -> None:
    """``Checkpointer.restore(which=NAME)`` is documented to raise "the verification error if it is
    damaged"; it said ``CheckpointNotFoundError`` for a checkpoint whose manifest is damaged (the CLI
    resolved it and reported the damage)."""
    state = {"model": torch.nn.Linear(4, 2), "optimizer": None}
    with pytest.raises(CorruptCheckpointError, match="broken"):
        Checkpointer(root, monitor="val_loss", lock=False).restore(state, "broken")


def test_a_symlinked_manifest_is_not_listed_as_a_checkpoint_by_the_cli(root: Path) -> None:
    """The CLI followed a symlinked ``manifest.json`` and listed the folder; the storage (and so the
    Checkpointer and ``savegame.load``'s root listing) does not count it as committed."""
    scan = scan_root(str(root))
    assert "linked" not in {e.name for e in scan.entries}
    assert "linked" not in {r.name for r in Checkpointer(root, lock=False).list()}


# --------------------------------------------------------------------------------------------------
# A remote root (fsspec memory://, in-process)


def test_a_remote_root_through_the_storage_protocol(tmp_path: Path) -> None:
    """The same answers through RemoteStorage; reading lists and reads objects, it writes none."""
    fsspec = pytest.importorskip("fsspec")
    url = f"memory://savegame-run-index-{os.getpid()}-{id(tmp_path)}/run"
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    with Checkpointer(url, monitor="val_loss", rng=False) as ckpt:
        for epoch, loss in enumerate([0.5, 0.2, 0.4], start=1):
            ckpt.step({"model": model}, epoch=epoch, metrics={"val_loss": loss})
        expected = [r.name for r in ckpt.list()]
    fs = fsspec.filesystem("memory")

    def objects() -> dict[str, tuple[Any, Any]]:
        found = fs.find(url.split("://", 1)[1], detail=True)
        return {path: (info.get("size"), info.get("created")) for path, info in found.items()}

    before = objects()
    assert {path.rsplit("/", 2)[-2] for path in before if path.endswith("/manifest.json")} >= set(expected)
    index = RunIndex.open(url)
    assert [e.name for e in index.ordered()] == expected
    assert index.resolve("latest") == expected[-1] and index.resolve("best") == expected[1]
    assert [e.name for e in scan_root(url).readable] == expected
    assert resolve_checkpoint(url, "best") == f"{url}/{expected[1]}"
    policy = build_keep_policy(monitor="val_loss", mode="min", keep_last=1, keep_best=None)
    assert index.doomed(policy, run=None, best=expected[1], monitor="val_loss", mode="min") == [expected[0]]
    assert objects() == before
