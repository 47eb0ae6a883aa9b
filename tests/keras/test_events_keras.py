"""The Keras callbacks pass ``callbacks=`` (savegame event callbacks) and ``quiet=`` on to their
Checkpointer (issue 18, part 2): a real ``fit`` reports its saves and its resume to the hooks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _kerashelp import dense_model, iris

import savegame
import savegame.keras as sk
from savegame.errors import ConfigError


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_save_committed(self, info: Any) -> None:
        self.events.append(("committed", info))

    def on_deleted(self, info: Any) -> None:
        self.events.append(("deleted", info))

    def on_restored(self, info: Any) -> None:
        self.events.append(("restored", info))


def test_model_checkpoint_and_backup_report_to_event_callbacks(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    x, y, xv, yv = iris()
    rec = Recorder()
    model = dense_model()
    checkpoint = sk.ModelCheckpoint(tmp_path / "ckpt", monitor="val_loss", keep_last=1, callbacks=[rec])
    backup = sk.BackupAndRestore(tmp_path / "backup", delete_checkpoint=False, callbacks=[rec])
    model.fit(x, y, epochs=3, batch_size=32, validation_data=(xv, yv), verbose=0, callbacks=[checkpoint, backup])
    committed = [info for hook, info in rec.events if hook == "committed"]
    assert sorted({str(Path(i.path).parent) for i in committed}) == [str(tmp_path / "backup"), str(tmp_path / "ckpt")]
    for info in committed:
        if Path(info.path).exists():
            assert savegame.read_manifest(info.path).total_bytes == info.bytes > 0
    assert any(hook == "deleted" for hook, _ in rec.events)  # keep_last=1 / the single backup
    capfd.readouterr()

    resumed = Recorder()  # a new fit resumes from the backup: the hook and the stderr line say so
    again = sk.BackupAndRestore(tmp_path / "backup", delete_checkpoint=False, callbacks=[resumed])
    dense_model().fit(x, y, epochs=4, batch_size=32, verbose=0, callbacks=[again])
    (restored,) = [info for hook, info in resumed.events if hook == "restored"]
    assert restored.epoch == 3
    assert f"savegame: resumed from {restored.name}" in capfd.readouterr().err
    quiet = sk.BackupAndRestore(tmp_path / "backup", delete_checkpoint=False, quiet=True)
    dense_model().fit(x, y, epochs=5, batch_size=32, verbose=0, callbacks=[quiet])
    assert "resumed from" not in capfd.readouterr().err


def test_a_callback_without_hooks_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="defines none of the hooks"):
        sk.ModelCheckpoint(tmp_path / "ckpt", callbacks=[object()])
