"""DDP (replicated state) across 2 processes: save, resume bit-identically, per-rank RNG, module. prefix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _launch import torchrun

import savegame
from savegame.storage.local import LocalStorage

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]


def _read(out: Path, mode: str, rank: int) -> dict[str, object]:
    data: dict[str, object] = json.loads((out / f"{mode}.rank{rank}.json").read_text())
    return data


def test_ddp_save_and_resume_is_bit_identical(tmp_path: Path) -> None:
    root, out = tmp_path / "ckpt", tmp_path / "out"
    root.mkdir()
    out.mkdir()
    torchrun("_ddp_worker.py", "--mode", "train", "--root", str(root), "--out", str(out))
    ckpt = root / "step-3"

    # One committed checkpoint: the replicated items once (rank 0), the RNGs once per rank.
    assert LocalStorage(root).committed() == ["step-3"]
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "manifest.json", "model.safetensors", "optimizer.safetensors", "rng.rank0.safetensors",
        "rng.rank1.safetensors",
    ]  # fmt: skip (the scheduler has no tensors: it lives in the manifest)
    manifest = savegame.verify(ckpt)
    assert manifest.metadata == {"run": "ddp-test"}
    layout = savegame.load(ckpt)["savegame.distributed"]
    assert layout["world_size"] == 2 and layout["per_rank"] == {"rng": ["rng.rank0", "rng.rank1"]}
    rng0, rng1 = savegame.load(ckpt)["rng.rank0"], savegame.load(ckpt)["rng.rank1"]
    assert not torch.equal(rng0["torch"], rng1["torch"])  # each rank's own generator state

    # Saved under DDP (module. prefix), loads into a plain model; saved from a plain model, loads into DDP.
    plain = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    report = savegame.load(ckpt, {"model": plain})
    assert report.loaded == ["model"]
    saved = savegame.load(ckpt)["model"]
    assert all(k.startswith("module.") for k in saved)
    assert all(torch.equal(v, saved["module." + k]) for k, v in plain.state_dict().items())
    savegame.save(tmp_path / "plain", {"model": plain})

    corrupt = tmp_path / "corrupt"
    shutil.copytree(ckpt, corrupt)
    with open(corrupt / "rng.rank1.safetensors", "r+b") as f:
        f.seek(-3, 2)
        byte = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([byte[0] ^ 0x10]))

    torchrun("_ddp_worker.py", "--mode", "resume", "--root", str(root), "--out", str(out),
             "--plain", str(tmp_path / "plain"), "--corrupt", str(corrupt))  # fmt: skip
    for rank in (0, 1):
        uninterrupted, resumed = _read(out, "train", rank), _read(out, "resume", rank)
        assert resumed["start"] == 3
        assert resumed["params"] == uninterrupted["params"]  # bit-identical parameters after steps 4-6
        assert resumed["draws"] == uninterrupted["draws"]  # torch, numpy and Python RNGs continue exactly
        assert resumed["lr"] == uninterrupted["lr"]
        assert resumed["plain_into_ddp"] is True
    assert _read(out, "train", 0)["draws"] != _read(out, "train", 1)["draws"]  # the ranks' streams differ

    # Collective failures: items differing between ranks, a file only rank 1 reads being damaged.
    zero, one = _read(out, "resume", 0), _read(out, "resume", 1)
    assert (zero["mismatch"], one["mismatch"]) == ("CheckpointError", "ConfigError")
    assert not (root / "mismatch").exists() and LocalStorage(root).committed() == ["step-3"]
    assert one["corrupt"] == "HashMismatchError" and zero["corrupt"] == "CorruptCheckpointError"
    assert zero["corrupt_is_corruption"] and one["corrupt_is_corruption"]


def test_checkpointer_under_ddp_saves_once_retains_on_rank0_and_resumes_bit_identically(tmp_path: Path) -> None:
    root, out = tmp_path / "ckpt", tmp_path / "out"
    out.mkdir()
    torchrun("_ckpt_worker.py", "--mode", "train", "--root", str(root), "--out", str(out))
    names = ["step=000004", "step=000006"]
    for rank in (0, 1):
        trained = _read(out, "train", rank)
        assert trained["saved"] == ["step=000002", "step=000004", "step=000006"]  # the same names on both ranks
        assert trained["listed"] == names
    assert LocalStorage(root).committed() == names  # step 2 deleted by retention, once
    manifest = savegame.verify(root / "step=000006")
    assert manifest.metadata == {"run": "ckpt-ddp"} and manifest.progress["step"] == 6
    assert {"rng.rank0", "rng.rank1"} <= set(manifest.items)

    torchrun("_ckpt_worker.py", "--mode", "resume", "--root", str(root), "--out", str(out))
    for rank in (0, 1):
        trained, resumed = _read(out, "train", rank), _read(out, "resume", rank)
        assert resumed["restored"] == "step=000006"
        assert resumed["params"] == trained["params"], f"rank {rank}: parameters differ after resuming"
        assert resumed["draws"] == trained["draws"], f"rank {rank}: random streams differ after resuming"
    assert _read(out, "train", 0)["draws"] != _read(out, "train", 1)["draws"]  # really per-rank RNGs
