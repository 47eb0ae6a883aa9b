"""The one write loop (savegame.engine.write_loop): the per-rank save writes through it too (StorageError for a
full disk, no staging debris, a progress bar), and a name taken by another writer while a Checkpointer
save is written is handled alike by the sync, background and per-rank saves: committed under the next
free name, the intruder left untouched."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch

import savegame
from distributed._common import Intruder
from savegame import Checkpointer
from savegame import distributed as sgd
from savegame._util import progress
from savegame.errors import CommitError, StorageError
from savegame.storage.local import FileOps, LocalStorage


class FullDiskAtWrite(FileOps):
    """Every data write fails as on a full disk."""

    def write(self, fd: int, data: memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def _state() -> dict[str, Any]:
    torch.manual_seed(0)
    return {"model": torch.nn.Linear(4, 3), "gen": random.Random(7), "epoch": 1}


def _debris(root: Path) -> list[str]:
    return sorted(n for n in os.listdir(root) if n.startswith((".staging-", ".trash-")))


def test_per_rank_save_translates_a_full_disk_into_storage_error_and_leaves_no_debris(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, ops=FullDiskAtWrite())
    with pytest.raises(StorageError) as info:
        sgd.write_state(storage, "ckpt", _state(), per_rank=("gen",))
    assert info.value.errno == errno.ENOSPC
    assert "writing checkpoint ckpt failed" in str(info.value)
    assert os.listdir(tmp_path) == []  # nothing published, no staging directory left


def test_per_rank_save_shows_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SAVEGAME_PROGRESS", "1")
    monkeypatch.setattr(progress, "SHOW_AFTER_SECONDS", 0.0)
    path, manifest = sgd.write_state(LocalStorage(tmp_path), "ckpt", _state(), per_rank=("gen",))
    err = capsys.readouterr().err
    assert "saving ckpt [" in err and "100%" in err, err
    assert sorted(manifest.files) == ["gen.rank0.safetensors", "model.safetensors"]
    savegame.verify(path)


def _check_renamed(root: Path, taken: str, final: str) -> None:
    """The save went to ``final`` (the next free name after ``taken``), with progress naming it as the
    best; the other writer's checkpoint at ``taken`` is untouched."""
    assert final == f"{taken}-v1"
    assert savegame.load(root / taken)["theirs"].tolist() == [0, 1, 2]
    saved = savegame.read_manifest(root / final).progress
    assert saved is not None and saved["best"]["name"] == final and saved["is_best"] is True
    savegame.verify(root / final)
    assert _debris(root) == []


@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_a_name_taken_meanwhile_is_saved_under_the_next_free_name(tmp_path: Path, background: bool) -> None:
    ckpt = Checkpointer(tmp_path, monitor="val_loss", background=background)
    intruder = Intruder()
    ckpt.storage.ops = intruder
    result = ckpt.step(_state(), epoch=1, metrics={"val_loss": 0.5})
    assert result is not None
    ckpt.wait()  # a background save: settled without an error
    latest = ckpt.latest
    assert latest is not None and len(intruder.took) == 1
    _check_renamed(tmp_path, intruder.took[0], latest.name)
    # A sync save returns where it went; a background one had returned the name it started with.
    assert result.name == (intruder.took[0] if background else latest.name)
    best = ckpt.best
    assert best is not None and best.name == latest.name
    # The next save goes on from there.
    again = ckpt.step(_state(), epoch=2, metrics={"val_loss": 0.4})
    ckpt.wait()
    assert again is not None and ckpt.latest is not None and ckpt.latest.name == again.name
    ckpt.close()


def test_the_per_rank_save_retries_a_name_taken_meanwhile_alike(tmp_path: Path) -> None:
    """What the Checkpointer's per-rank path runs on every rank: write_state with the same next_name
    rule; without one the clash is the caller's error, as for savegame.save(overwrite=False)."""
    intruder = Intruder()
    storage = LocalStorage(tmp_path, ops=intruder)
    asked: list[str] = []

    def next_name(clashed: str) -> tuple[str, dict[str, Any]]:
        asked.append(clashed)
        name = f"{clashed}-v1"
        return name, {"best": {"name": name}, "is_best": True}

    path, manifest = sgd.write_state(storage, "epoch=001", _state(), per_rank=("gen",),
                                     progress={"best": {"name": "epoch=001"}, "is_best": True},
                                     next_name=next_name)  # fmt: skip
    assert asked == ["epoch=001"] and os.path.basename(path) == "epoch=001-v1"
    assert manifest.progress == {"best": {"name": "epoch=001-v1"}, "is_best": True}
    _check_renamed(tmp_path, "epoch=001", "epoch=001-v1")
    other = Intruder()
    with pytest.raises(CommitError) as info:
        sgd.write_state(LocalStorage(tmp_path, ops=other), "epoch=002", _state(), per_rank=("gen",))
    assert info.value.errno in (errno.EEXIST, errno.ENOTEMPTY)
    assert _debris(tmp_path) == []


def test_side_files_are_committed_with_the_checkpoint_or_not_at_all(tmp_path: Path) -> None:
    from savegame.engine.write_loop import EncodedExtras
    from savegame.engine.writer import encode_state, write_encoded
    from savegame.errors import ConfigError

    storage = LocalStorage(tmp_path)
    items = encode_state({"model": torch.nn.Linear(2, 2)})
    extras = EncodedExtras.encode(None, None)
    write_encoded(storage, "ok", items, extras, overwrite=False, side_files={"config.json": b"{}"})
    assert (tmp_path / "ok" / "config.json").read_bytes() == b"{}"
    assert set(savegame.read_manifest(tmp_path / "ok").files) == {"model.safetensors"}  # tensor files only
    savegame.verify(tmp_path / "ok")
    with pytest.raises(ConfigError, match=r"model\.safetensors"):
        write_encoded(storage, "clash", items, extras, overwrite=False, side_files={"model.safetensors": b"x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]  # the failed save left nothing behind
