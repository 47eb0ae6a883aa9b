"""Issue 16 item 2: ``savegame.keras``'s loaders find checkpoints through the read-only RunIndex.

They used to build a Checkpointer just to find a checkpoint; now "latest", "best" and a name mean what
``savegame ls`` / ``inspect --which`` mean, and loading changes nothing in the root.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
from _kerashelp import arrays, dense_model, iris

import savegame.keras as sk
from savegame.adapters.keras import KerasState
from savegame.cli.scan import resolve_checkpoint
from savegame.errors import CorruptCheckpointError
from savegame.run.checkpointer import Checkpointer


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under ``root`` with its type, size and mtime in ns (symlinks not followed)."""
    return {str(p.relative_to(root.parent)): (p.lstat().st_mode, p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in [root, *root.rglob("*")]}  # fmt: skip


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, dict[str, list[np.ndarray]]]:
    """A fit with ``ModelCheckpoint(monitor="val_loss")`` (run 1), then a second run saved by a
    Checkpointer without a monitor but with ``val_loss`` recorded (run 2), a checkpoint whose manifest
    is damaged and a dead writer's staging debris. Returns the model, the root and each checkpoint's
    weights."""
    keras.utils.set_random_seed(5)
    x, y, xv, yv = iris()
    model = dense_model()
    root = tmp_path_factory.mktemp("keras-index") / "ck"
    model.fit(x, y, batch_size=16, epochs=2, validation_data=(xv, yv), verbose=0,
              callbacks=[sk.ModelCheckpoint(str(root), monitor="val_loss")])  # fmt: skip
    weights: dict[str, list[np.ndarray]] = {}
    with Checkpointer(root, restart="off") as second:
        for epoch, loss in ((1, 0.7), (2, 0.2), (3, 0.6)):
            model.fit(x, y, batch_size=16, epochs=1, verbose=0)
            result = second.save({"keras": KerasState(model)}, epoch=epoch, metrics={"val_loss": loss})
            weights[result.name] = arrays(model.weights)
    shutil.copytree(root / result.name, root / "broken")
    (root / "broken" / "manifest.json").write_text('{"format": "savegame", "cut')
    debris = root / ".staging-otherhost-4242-0123456789ab"
    debris.mkdir()
    (debris / "keras.sgt").write_bytes(b"half a file")
    return model, root, weights


def test_best_means_what_the_cli_means(fitted: tuple[Any, Path, dict[str, list[np.ndarray]]]) -> None:
    """The newest manifest records no best (run 2 had no monitor); the monitor run 1 recorded ranks run
    2's checkpoints, as ``savegame inspect ROOT --which best`` does (``load_weights`` used to raise
    CheckpointNotFoundError: it only looked at the newest manifest)."""
    _model, root, weights = fitted
    best = Path(resolve_checkpoint(str(root), "best")).name
    assert best == list(weights)[1]  # val_loss 0.2
    fresh = dense_model()
    sk.load_weights(fresh, root, which="best", include_optimizer=False)
    assert all(np.array_equal(a, b) for a, b in zip(arrays(fresh.weights), weights[best]))
    sk.load_weights(fresh, root, which="latest", include_optimizer=False)
    assert all(np.array_equal(a, b) for a, b in zip(arrays(fresh.weights), weights[list(weights)[-1]]))
    assert Path(resolve_checkpoint(str(root), "latest")).name == list(weights)[-1]


def test_a_damaged_checkpoint_by_name_reports_the_damage(fitted: tuple[Any, Path, Any]) -> None:
    """It used to say "no checkpoint 'broken'" (CheckpointNotFoundError) for a checkpoint that is there."""
    _, root, _ = fitted
    with pytest.raises(CorruptCheckpointError, match="broken"):
        sk.load_weights(dense_model(), root, which="broken")


def test_loading_changes_nothing_in_the_root(fitted: tuple[Any, Path, Any], tmp_path: Path) -> None:
    _model, root, weights = fitted
    before = snapshot(root)
    for which in ("latest", "best", next(iter(weights))):
        sk.load_weights(dense_model(), root, which=which)
    sk.restore(dense_model(), root, which="latest")
    sk.export_weights(dense_model(), root, tmp_path / "best.weights.h5")
    sk.load_weights(dense_model(), root / next(iter(weights)))
    assert snapshot(root) == before
