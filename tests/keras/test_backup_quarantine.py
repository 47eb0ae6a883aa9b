"""A damaged newest backup is quarantined by BackupAndRestore and the previous one is used.

The callbacks' Checkpointers are built with ``lock=False`` because the callback itself holds the process's
share of the writer lock for the whole ``fit``; a Checkpointer of a process that holds the lock acts as the
owner (it moves damaged checkpoints aside), while a plain ``lock=False`` reader leaves them in place.
"""

from __future__ import annotations

from pathlib import Path

import keras
import pytest
from _kerashelp import dense_model, iris

import savegame
import savegame.keras as sk


def _damage_newest(root: Path) -> str:
    names = sorted(p.name for p in root.iterdir() if (p / "manifest.json").exists())
    newest = max(names, key=lambda n: (root / n / "manifest.json").stat().st_mtime_ns)
    data = max((p for p in (root / newest).rglob("*") if p.is_file() and p.name != "manifest.json"),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    return newest


def test_damaged_newest_backup_is_quarantined_and_the_previous_one_resumed(tmp_path: Path) -> None:
    x, y, _, _ = iris()
    model = dense_model()
    backup_dir = tmp_path / "backup"
    model.fit(x, y, batch_size=16, epochs=2, verbose=0,
              callbacks=[sk.BackupAndRestore(str(backup_dir), double_checkpoint=True, delete_checkpoint=False)])
    damaged = _damage_newest(backup_dir)
    epochs: list[int] = []

    class Probe(keras.callbacks.Callback):  # type: ignore[misc]
        def on_epoch_begin(self, epoch: int, logs: object = None) -> None:
            epochs.append(epoch)

    again = dense_model()
    with pytest.warns(savegame.ResumeWarning, match="damaged"):
        again.fit(x, y, batch_size=16, epochs=3, verbose=0,
                  callbacks=[sk.BackupAndRestore(str(backup_dir), delete_checkpoint=False), Probe()])
    assert epochs == [1, 2]  # resumed after epoch 1, from the older backup
    assert not (backup_dir / damaged).exists()
    assert any(p.name.startswith(".quarantine-") for p in backup_dir.iterdir())
