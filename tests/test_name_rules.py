"""One set of checkpoint name rules (savegame.format.naming) for every save path.

``savegame.save("runs/a:b")`` used to save while ``ckpt.save(..., name="a:b")`` refused the same name:
storage checked only "one path component", the Checkpointer the documented portable rules. Now every
new checkpoint name goes through :func:`savegame.format.naming.validate_name` (storage ``begin``), and an
existing checkpoint with such a name stays readable.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import savegame
from savegame.errors import InvalidNameError
from savegame.format.naming import validate_name
from savegame.storage import RemoteStorage

NOT_PORTABLE = ["a:b", "a?b", "a*b", "a|b", "<a>", 'a"b', "trailing.", " lead", "trail "]


def _problem(name: str) -> str:
    with pytest.raises(InvalidNameError) as info:
        validate_name(name)
    return str(info.value)


@pytest.mark.parametrize("name", NOT_PORTABLE)
def test_save_and_checkpointer_save_refuse_the_same_names_with_the_same_message(tmp_path: Path, name: str) -> None:
    root = tmp_path / "runs"
    state = {"w": np.arange(3.0)}
    with pytest.raises(InvalidNameError) as direct:
        savegame.save(root / name, state)
    assert str(direct.value) == _problem(name)
    assert not root.exists() or os.listdir(root) == []  # nothing written, not even a staging folder

    ckpt = savegame.Checkpointer(tmp_path / "ckpt", lock=False)
    try:
        with pytest.raises(InvalidNameError) as via_checkpointer:
            ckpt.save(state, name=name, epoch=1)
    finally:
        ckpt.close()
    assert str(via_checkpointer.value) == str(direct.value)
    assert [n for n in os.listdir(tmp_path / "ckpt") if not n.startswith(".")] == []


def test_a_portable_name_saves_through_both(tmp_path: Path) -> None:
    state = {"w": np.arange(3.0)}
    savegame.save(tmp_path / "runs" / "epoch=03-val_acc=0.85", state)
    ckpt = savegame.Checkpointer(tmp_path / "ckpt", lock=False)
    try:
        result = ckpt.save(state, name="epoch=03-val_acc=0.85", epoch=3)
    finally:
        ckpt.close()
    assert result.name == "epoch=03-val_acc=0.85"
    np.testing.assert_array_equal(savegame.load(tmp_path / "runs" / "epoch=03-val_acc=0.85")["w"], state["w"])


def test_a_remote_save_refuses_the_same_names() -> None:
    storage = RemoteStorage(f"memory://sg-names-{os.getpid()}/run")
    with pytest.raises(InvalidNameError) as info:
        storage.begin("a:b")
    assert str(info.value) == _problem("a:b")


def test_an_existing_checkpoint_with_such_a_name_still_loads(tmp_path: Path) -> None:
    """Reading stays lenient: a checkpoint an older version (or a rename) gave a ':' keeps loading."""
    savegame.save(tmp_path / "ok", {"w": np.arange(4)})
    os.rename(tmp_path / "ok", tmp_path / "a:b")
    np.testing.assert_array_equal(savegame.load(tmp_path / "a:b")["w"], np.arange(4))
    savegame.verify(tmp_path / "a:b")


@pytest.mark.parametrize("alias", ["best", "latest"])
def test_a_checkpoint_cannot_take_the_name_of_an_alias(tmp_path: Path, alias: str) -> None:
    """``name="best"`` made a checkpoint folder ``best`` that hides the alias: ``savegame inspect ROOT/best``
    and ``load(ROOT/best)`` then read that folder (the worst epoch), not the best checkpoint."""
    from savegame import Checkpointer

    with pytest.raises(InvalidNameError, match="reserved"):
        Checkpointer(tmp_path / "a", name=alias)
    with Checkpointer(tmp_path / "b") as ckpt:
        with pytest.raises(InvalidNameError, match="reserved"):
            ckpt.save({"x": np.ones(2)}, epoch=1, name=alias)
        ckpt.save({"x": np.ones(2)}, epoch=2)
    assert not (tmp_path / "b" / alias).exists()
