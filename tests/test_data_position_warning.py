"""A mid-epoch resume of a PyTorch state with no data position warns once (issue 18, part 1).

A plain ``DataLoader`` left out of the state starts the epoch again from its first batch after a
restore: savegame cannot fix what it never saw, but it must not let that pass silently. The warning
names the checkpoint and says what to do; states that carry the position (a ``resumable`` loader, a
sampler or loader with its own state) and end-of-epoch checkpoints do not warn.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import savegame
import savegame.data
from savegame.run import resume


@pytest.fixture(autouse=True)
def _fresh_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resume, "_warned_data_position", False)


def _parts() -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader[tuple[torch.Tensor, ...]]]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    data = TensorDataset(torch.randn(40, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=4, shuffle=True)


def _save(root: Path, *, epoch_end: bool, with_loader: bool) -> None:
    model, opt, loader = _parts()
    state: dict[str, object] = {"model": model, "optimizer": opt}
    if with_loader:
        wrapped = savegame.data.resumable(loader)
        state["loader"] = wrapped
        batches = iter(wrapped)
        next(batches), next(batches)
    with savegame.Checkpointer(root) as ckpt:
        ckpt.save(state, epoch=0 if not epoch_end else 1, step=2, epoch_end=epoch_end)


def _restore(root: Path, *, with_loader: bool) -> list[warnings.WarningMessage]:
    model, opt, loader = _parts()
    state: dict[str, object] = {"model": model, "optimizer": opt}
    if with_loader:
        state["loader"] = savegame.data.resumable(loader)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with savegame.Checkpointer(root, quiet=True) as ckpt:
            assert ckpt.restore(state) is not None
    return [w for w in caught if issubclass(w.category, savegame.ResumeWarning)]


def test_a_mid_epoch_resume_without_a_data_position_warns_once(tmp_path: Path) -> None:
    _save(tmp_path / "run", epoch_end=False, with_loader=False)
    first = _restore(tmp_path / "run", with_loader=False)
    assert len(first) == 1
    message = str(first[0].message)
    assert "saved mid-epoch (epoch 0, step 2)" in message and "savegame.data.resumable(loader)" in message
    assert _restore(tmp_path / "run", with_loader=False) == []  # once per process


def test_a_state_that_carries_the_position_does_not_warn(tmp_path: Path) -> None:
    _save(tmp_path / "run", epoch_end=False, with_loader=True)
    assert _restore(tmp_path / "run", with_loader=True) == []


def test_an_end_of_epoch_checkpoint_does_not_warn(tmp_path: Path) -> None:
    _save(tmp_path / "run", epoch_end=True, with_loader=False)
    assert _restore(tmp_path / "run", with_loader=False) == []


def test_a_state_without_torch_objects_does_not_warn(tmp_path: Path) -> None:
    with savegame.Checkpointer(tmp_path / "run") as ckpt:
        ckpt.save({"counter": 3}, epoch=0, step=5, epoch_end=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with savegame.Checkpointer(tmp_path / "run", quiet=True) as ckpt:
            ckpt.restore({"counter": 0})
    assert [w for w in caught if issubclass(w.category, savegame.ResumeWarning)] == []


def test_a_loop_that_records_its_own_batch_position_does_not_warn(tmp_path: Path) -> None:
    """A plain item named like a batch position (accelerate's ``position``, a loop's ``batch_idx``) means
    the loop skips the consumed batches itself."""
    model, opt, _ = _parts()
    with savegame.Checkpointer(tmp_path / "run") as ckpt:
        ckpt.save({"model": model, "optimizer": opt, "progress": {"batches_seen": 2}}, epoch=0, step=2, epoch_end=False)
    model, opt, _ = _parts()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with savegame.Checkpointer(tmp_path / "run", quiet=True) as ckpt:
            restored = ckpt.restore({"model": model, "optimizer": opt, "progress": None})
    assert restored is not None and restored.data["progress"] == {"batches_seen": 2}
    assert [w for w in caught if issubclass(w.category, savegame.ResumeWarning)] == []
