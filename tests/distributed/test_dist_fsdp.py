"""FSDP2 (sharded state) across processes: shard-by-shard saves, restore at world size 1 and 2, export."""

from __future__ import annotations

import json

import pytest
import torch
from _common import diff
from _launch import FsdpRuns
from safetensors import safe_open

import savegame
from savegame import distributed as sgd

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]


def plain_model() -> torch.nn.Module:
    """The FSDP2 workers' model, unsharded."""
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.ReLU(), torch.nn.Linear(7, 3))


def test_sharded_checkpoint_layout(fsdp_saved: FsdpRuns) -> None:
    ckpt = fsdp_saved.root / "ws2"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["manifest.json", "rng.rank0.safetensors", "rng.rank1.safetensors",
                     "shards.rank0.safetensors", "shards.rank1.safetensors"]  # fmt: skip
    manifest = savegame.verify(ckpt)  # every shard's size and hash are in the manifest, written last
    assert set(manifest.files) == set(names) - {"manifest.json"}
    skeleton = manifest.items["model"].skeleton
    assert skeleton["format"] == "savegame.sharded"
    weight = next(t for t in skeleton["tensors"] if t["path"] == ["0.weight"])
    assert weight["size"] == [7, 5]  # 7 rows over 2 ranks: uneven shards
    assert [(c["offsets"], c["sizes"], c["file"]) for c in weight["chunks"]] == [
        ([0, 0], [4, 5], "shards.rank0.safetensors"), ([4, 0], [3, 5], "shards.rank1.safetensors"),
    ]  # fmt: skip
    # Replicated plain tensors (BatchNorm buffers, Adam's step) are written once, from rank 0.
    running = next(t for t in skeleton["tensors"] if t["path"] == ["1.running_mean"])
    assert [c["file"] for c in running["chunks"]] == ["shards.rank0.safetensors"]
    with safe_open(str(ckpt / "shards.rank1.safetensors"), framework="pt") as f:
        assert "model.0.weight@4,0" in f.keys()


def test_fsdp2_restore_at_world_size_1_and_2(fsdp_restored: FsdpRuns) -> None:
    one = json.loads((fsdp_restored.out / "restore1.json").read_text())
    assert one["world"] == 1 and one["step"] == 3
    assert one["diff_ws2"] == []  # saved at 2 ranks, restored at 1: same parameters and optimizer state
    two = json.loads((fsdp_restored.out / "restore2.json").read_text())
    assert two["world"] == 2 and two["step"] == 3
    assert two["diff_ws2"] == []  # saved at 2, restored at 2
    assert two["diff_next"] == []  # and one more step is bit-identical to the run that never stopped
    assert two["diff_ws1"] == []  # saved at 1 (after the 2 -> 1 restore), restored at 2
    assert two["diff_unsharded"] == []  # a single-process checkpoint continues under FSDP2
    assert two["dtensor_ok"] is True and two["dtensor_rows"] == 10  # distribute_tensor DTensors in a dict
    assert sorted(p.name for p in (fsdp_restored.root / "ws1").iterdir()) == [
        "manifest.json", "rng.rank0.safetensors", "shards.rank0.safetensors",
    ]  # fmt: skip


def test_export_to_a_plain_model(fsdp_saved: FsdpRuns) -> None:
    ckpt = fsdp_saved.root / "ws2"
    ref = savegame.load(fsdp_saved.out / "ref")
    full = sgd.load_full_state_dict(ckpt)
    assert full["step"] == 3 and set(full) == {"model", "optimizer", "rng.rank0", "rng.rank1", "step"}
    model = plain_model()
    model.load_state_dict(full["model"])
    assert diff(dict(model.state_dict()), ref["model"]) == []
    assert diff(full["optimizer"], ref["optimizer"]) == []

    # Or restore in place, without any process group: DCP reads the shards into full tensors.
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = plain_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    report = sgd.restore(ckpt, {"model": model, "optimizer": opt, "rng": savegame.RNGState(), "step": 0})
    assert report.state == {"step": 3} and sorted(report.loaded) == ["model", "optimizer", "rng"]
    assert diff(dict(model.state_dict()), ref["model"]) == []
    assert diff(dict(get_optimizer_state_dict(model, opt)), ref["optimizer"]) == []
    assert opt.param_groups[0]["lr"] == 1e-2


def test_mismatched_model_is_refused_before_loading(fsdp_saved: FsdpRuns) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(savegame.StateMismatchError, match=r"0\.weight"):
        sgd.restore(fsdp_saved.root / "ws2", {"model": model})
    assert diff(dict(model.state_dict()), before) == []
    report = sgd.restore(fsdp_saved.root / "ws2", {"model": model}, strict=False)
    assert ("model.0.weight", (7, 5), (8, 5)) in report.mismatched_keys
