"""Issue 15 item 8: a path that is a checkpoint (or a ``best``/``latest`` alias), not a run root.

``Checkpointer(<a committed checkpoint>).restore()`` used to return None silently and write ``.lock``
into the checkpoint; ``Checkpointer("ROOT/best")`` created a real ``ROOT/best`` directory that then hid
the alias from ``savegame load ROOT/best``. Both now raise ConfigError naming the run root, and nothing
is written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from savegame.cli.scan import resolve_checkpoint
from savegame.errors import CheckpointError, ConfigError
from savegame.run.checkpointer import Checkpointer


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime (to show nothing was written)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def run_root(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    model = torch.nn.Linear(3, 2)
    with Checkpointer(root, monitor="val_loss") as ckpt:
        for epoch, loss in ((1, 0.5), (2, 0.7)):
            ckpt.step({"model": model}, epoch=epoch, step=epoch, metrics={"val_loss": loss})
    return root


def test_a_checkpoint_directory_is_refused_and_left_untouched(run_root: Path) -> None:
    ckpt_dir = run_root / "epoch=001-step=000001"
    before = tree(run_root)
    with pytest.raises(ConfigError) as info:
        Checkpointer(ckpt_dir)
    message = str(info.value)
    assert isinstance(info.value, CheckpointError)
    assert f"{ckpt_dir} is a checkpoint" in message
    assert f"pass its run root {run_root}" in message and "which='epoch=001-step=000001'" in message
    with pytest.raises(ConfigError):
        Checkpointer(ckpt_dir, lock=False, restart="required")
    assert tree(run_root) == before
    assert not (ckpt_dir / ".lock").exists()


@pytest.mark.parametrize("alias", ["best", "latest"])
def test_an_alias_of_a_run_root_is_refused_and_not_created(run_root: Path, alias: str) -> None:
    before = tree(run_root)
    with pytest.raises(ConfigError) as info:
        Checkpointer(run_root / alias, monitor="val_loss")
    assert f"names the {alias!r} checkpoint of the run root {run_root}" in str(info.value)
    assert f"which={alias!r}" in str(info.value)
    assert not (run_root / alias).exists()
    assert tree(run_root) == before
    # the alias still resolves for the savegame commands (a real ROOT/best directory would hide it)
    expected = "epoch=001-step=000001" if alias == "best" else "epoch=002-step=000002"
    assert resolve_checkpoint(str(run_root / alias)) == str(run_root / expected)


def test_best_is_an_ordinary_name_where_no_run_root_is_its_parent(tmp_path: Path) -> None:
    # "experiments/best" is a fine directory name when "experiments" holds no checkpoints
    with Checkpointer(tmp_path / "experiments" / "best") as ckpt:
        ckpt.save({"x": torch.ones(2)}, epoch=1)
    assert (tmp_path / "experiments" / "best" / "epoch=001").is_dir()
    with Checkpointer(tmp_path / "experiments" / "best") as ckpt:  # and reopening it works
        assert ckpt.latest is not None and ckpt.latest.name == "epoch=001"


@pytest.mark.parametrize("bad", [5, None, b"run", ["run"], 2.5])
def test_a_path_of_the_wrong_type_is_a_config_error_everywhere(tmp_path: Path, bad: object,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """save/load/read_manifest/verify/base=/Checkpointer given an int, None, bytes or a list: a ConfigError
    that says what was given (once a TypeError or AttributeError from deep inside), nothing written."""
    import savegame

    monkeypatch.chdir(tmp_path)
    model = torch.nn.Linear(2, 2)
    savegame.save("good", {"model": model})
    before = tree(tmp_path)
    calls = [
        lambda: savegame.save(bad, {"model": model}),  # type: ignore[arg-type]
        lambda: savegame.load(bad),  # type: ignore[arg-type]
        lambda: savegame.read_manifest(bad),  # type: ignore[arg-type]
        lambda: savegame.verify(bad),  # type: ignore[arg-type]
        lambda: Checkpointer(bad),  # type: ignore[arg-type]
    ]
    if bad is not None:  # base=None is the default: a full save
        calls.append(lambda: savegame.save("new", {"model": model}, base=bad))  # type: ignore[arg-type]
    for call in calls:
        with pytest.raises(ConfigError, match=type(bad).__name__):
            call()
    assert tree(tmp_path) == before
