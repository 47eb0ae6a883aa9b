"""``save(path, ...)`` never destroys what is at ``path``: only a savegame checkpoint may be replaced.

A non-empty folder without a savegame manifest, a regular file, a symbolic link (to anything) or a
folder holding another program's ``manifest.json`` raises :class:`OccupiedPathError` and is left
byte for byte as it was, with ``overwrite=True`` (the default), in the background, through a
Checkpointer's storage and when something takes the checkpoint's place between the check and the swap.
An empty folder may be saved into.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import savegame
from savegame import CommitError, OccupiedPathError
from savegame.storage.local import FileOps, LocalStorage


def _tree(root: Path) -> dict[str, tuple[str, bytes | str | None]]:
    """Everything under ``root`` (itself included): kind and content of each entry, links not followed."""
    found: dict[str, tuple[str, bytes | str | None]] = {}

    def visit(path: Path, rel: str) -> None:
        if path.is_symlink():
            found[rel] = ("link", os.readlink(path))
        elif path.is_file():
            found[rel] = ("file", path.read_bytes())
        elif path.is_dir():
            found[rel] = ("dir", None)
            for child in sorted(path.iterdir()):
                visit(child, f"{rel}/{child.name}")

    visit(root, ".")
    return found


def _user_data(tmp_path: Path) -> Path:
    data = tmp_path / "mydata"
    (data / "sub").mkdir(parents=True)
    (data / "train.csv").write_text("x,y\n1,2\n")
    (data / "sub" / "x.bin").write_bytes(os.urandom(4096))
    return data


def _debris(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".staging-", ".trash-")))


STATE = {"w": np.arange(10.0), "epoch": 3}


def _occupants(tmp_path: Path) -> dict[str, Path]:
    notes = tmp_path / "important_notes.txt"
    notes.write_text("do not lose me\n")
    data = _user_data(tmp_path)
    web = tmp_path / "site"
    web.mkdir()
    (web / "manifest.json").write_text('{"name": "my web app", "icons": []}')
    (web / "index.html").write_text("<html></html>")
    link_dir = tmp_path / "link-to-dir"
    link_dir.symlink_to(data)
    link_file = tmp_path / "link-to-file"
    link_file.symlink_to(notes)
    savegame.save(tmp_path / "real", STATE)
    link_ckpt = tmp_path / "link-to-checkpoint"
    link_ckpt.symlink_to(tmp_path / "real")
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    return {"a non-empty directory": data, "a regular file": notes, "another program's manifest.json": web,
            "a link to a directory": link_dir, "a link to a file": link_file, "a link to a checkpoint": link_ckpt,
            "a dangling link": dangling}  # fmt: skip


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("overwrite", [True, False])
def test_save_refuses_anything_but_a_checkpoint_and_leaves_it_untouched(
    tmp_path: Path, overwrite: bool, background: bool
) -> None:
    for what, target in _occupants(tmp_path).items():
        before = _tree(tmp_path)
        with pytest.raises(OccupiedPathError, match="not a savegame checkpoint") as info:
            savegame.save(target, STATE, overwrite=overwrite, background=background)  # raised at once
        err = info.value
        assert isinstance(err, CommitError), what
        assert err.errno == errno.EEXIST and str(target) in str(err), what
        assert _tree(tmp_path) == before, f"{what} was changed"
        assert _debris(tmp_path) == [], what
    savegame.engine.background.default_writer().wait()  # nothing was started in the background


def test_an_empty_directory_may_be_saved_into_and_a_checkpoint_overwritten(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    savegame.save(tmp_path / "empty", STATE, overwrite=False)
    assert savegame.load(tmp_path / "empty")["epoch"] == 3
    savegame.save(tmp_path / "empty", {"w": np.ones(2), "epoch": 4})  # a savegame checkpoint: replaced
    assert savegame.load(tmp_path / "empty")["epoch"] == 4
    with pytest.raises(CommitError, match="already exists"):
        savegame.save(tmp_path / "empty", STATE, overwrite=False)
    assert _debris(tmp_path) == []


def test_a_damaged_checkpoint_can_still_be_overwritten(tmp_path: Path) -> None:
    savegame.save(tmp_path / "c", STATE)
    manifest = tmp_path / "c" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:200])  # truncated: no longer loads, still savegame's
    savegame.save(tmp_path / "c", STATE)
    assert savegame.load(tmp_path / "c")["epoch"] == 3


def test_checkpointer_storage_refuses_a_user_folder_under_its_root(tmp_path: Path) -> None:
    data = _user_data(tmp_path)
    before = _tree(data)
    storage = LocalStorage(tmp_path)
    with pytest.raises(OccupiedPathError):
        storage.begin("mydata", overwrite=True)  # refused before anything is written
    assert _tree(data) == before and _debris(tmp_path) == []


class AtTheSwap(FileOps):
    """Between the commit's check and its swap, ``change`` is made to the checkpoint at ``target`` (once)."""

    def __init__(self, target: Path, change: Callable[[Path], None], *, exchange: bool) -> None:
        self.target = target
        self.change = change
        self.use_exchange = exchange
        self.fired = False

    def _fire(self) -> None:
        if not self.fired:
            self.fired = True
            self.change(self.target)

    def exchange(self, a: str, b: str) -> bool:
        if b == str(self.target):
            self._fire()
        return super().exchange(a, b) if self.use_exchange else False

    def rename(self, src: str, dst: str) -> None:
        if src == str(self.target):
            self._fire()
        super().rename(src, dst)


def _replace_with_user_data(target: Path) -> None:
    shutil.rmtree(target)
    (target / "sub").mkdir(parents=True)
    (target / "train.csv").write_text("precious\n")


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-fallback"])
def test_user_data_that_appears_during_the_commit_is_put_back_untouched(tmp_path: Path, exchange: bool) -> None:
    savegame.save(tmp_path / "c", STATE)
    ops = AtTheSwap(tmp_path / "c", _replace_with_user_data, exchange=exchange)
    storage = LocalStorage(tmp_path, ops=ops)
    with pytest.raises(OccupiedPathError):
        savegame.api.write_items(storage, "c", savegame.api.encode_state(STATE), metadata=None, progress=None,
                                 overwrite=True)  # fmt: skip
    assert ops.fired
    assert _tree(tmp_path / "c") == {".": ("dir", None), "./sub": ("dir", None),
                                     "./train.csv": ("file", b"precious\n")}  # fmt: skip
    assert _debris(tmp_path) == []


def test_distributed_single_process_save_uses_the_same_guard(tmp_path: Path) -> None:
    from savegame import distributed

    data = _user_data(tmp_path)
    before = _tree(data)
    with pytest.raises(OccupiedPathError):
        distributed.write_state(LocalStorage(tmp_path), "mydata", STATE, overwrite=True,
                                context=distributed.RankContext())  # fmt: skip
    assert _tree(data) == before and _debris(tmp_path) == []


def _with_user_files(checkpoint: Path) -> None:
    (checkpoint / "notes.txt").write_text("lr 3e-4 diverged at step 900\n")
    (checkpoint / "plots").mkdir()
    (checkpoint / "plots" / "loss.png").write_bytes(os.urandom(64))


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("damaged", [False, True], ids=["intact", "damaged-manifest"])
def test_overwriting_a_checkpoint_that_holds_user_files_is_refused(
    tmp_path: Path, background: bool, damaged: bool
) -> None:
    """A file or folder a user put into a checkpoint folder would be deleted with the old version: the
    overwrite is refused at once, names what is in the way and changes nothing (also when the old
    manifest no longer parses and its file list is unknown)."""
    savegame.save(tmp_path / "c", STATE)
    _with_user_files(tmp_path / "c")
    if damaged:
        manifest = tmp_path / "c" / "manifest.json"
        manifest.write_bytes(manifest.read_bytes()[:200])
    before = _tree(tmp_path)
    with pytest.raises(OccupiedPathError, match=r"2 entries savegame did not write \('notes\.txt', 'plots'\)"):
        savegame.save(tmp_path / "c", {"w": np.ones(2), "epoch": 4}, background=background)
    assert _tree(tmp_path) == before and _debris(tmp_path) == []
    savegame.engine.background.default_writer().wait()


def test_a_checkpoint_without_user_files_is_still_overwritten_with_its_side_files(tmp_path: Path) -> None:
    """What savegame wrote is not in the way: data files, the manifest and the side files an integration
    records in its metadata (a Hugging Face checkpoint's config.json)."""
    from savegame.engine.writer import EncodedExtras, encode_state, write_encoded

    files = {"config.json": b'{"n_layer": 2}', "trainer_state.json": b"{}"}
    metadata = {"savegame.example": {"files": {name: {"bytes": len(data)} for name, data in files.items()}}}
    for epoch in (1, 2):
        write_encoded(LocalStorage(tmp_path), "c", encode_state({**STATE, "epoch": epoch}),
                      EncodedExtras.encode(metadata, None), overwrite=True, side_files=files)  # fmt: skip
    assert savegame.load(tmp_path / "c")["epoch"] == 2
    (tmp_path / "c" / "vocab.txt").write_text("not recorded\n")  # the same name, unrecorded: refused
    with pytest.raises(OccupiedPathError, match=r"vocab\.txt"):
        write_encoded(LocalStorage(tmp_path), "c", encode_state(STATE), EncodedExtras.encode(metadata, None),
                      overwrite=True, side_files=files)  # fmt: skip
    assert savegame.load(tmp_path / "c")["epoch"] == 2


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "rename-fallback"])
def test_a_user_file_added_during_the_commit_puts_the_old_checkpoint_back(tmp_path: Path, exchange: bool) -> None:
    savegame.save(tmp_path / "c", STATE)
    ops = AtTheSwap(tmp_path / "c", lambda c: (c / "notes.txt").write_text("precious\n"), exchange=exchange)
    with pytest.raises(OccupiedPathError, match=r"notes\.txt"):
        savegame.api.write_items(LocalStorage(tmp_path, ops=ops), "c", savegame.api.encode_state({"epoch": 9}),
                                 metadata=None, progress=None, overwrite=True)  # fmt: skip
    assert ops.fired
    assert (tmp_path / "c" / "notes.txt").read_text() == "precious\n"
    assert savegame.load(tmp_path / "c")["epoch"] == 3
    assert _debris(tmp_path) == []
