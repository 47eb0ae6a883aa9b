"""The pieces of savegame.distributed that need no second process: joining a transaction, single-process
use, reserved names, and hostile sharded manifests (the sharded checkpoint comes from a 2-rank run)."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _launch import FsdpRuns

import savegame
from savegame import distributed as sgd
from savegame.errors import CommitError, InvalidNameError, StorageError
from savegame.storage.local import LocalStorage


def test_other_processes_join_a_transaction_but_only_its_owner_commits(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    txn = storage.begin("ckpt")
    assert txn.token.startswith(".staging-") and (tmp_path / txn.token).is_dir()
    joined = storage.join("ckpt", txn.token)
    sink = joined.open("part.rank1.safetensors")
    sink.write(b"data")
    sink.close()
    assert (tmp_path / txn.token / "part.rank1.safetensors").read_bytes() == b"data"
    with pytest.raises(CommitError):
        joined.commit(b"{}")
    joined.abort()  # removes what it wrote, not the owner's directory
    assert (tmp_path / txn.token).is_dir() and not (tmp_path / txn.token / "part.rank1.safetensors").exists()
    for bad in ("../elsewhere", ".staging-x/../../y", "ckpt", ""):
        with pytest.raises(InvalidNameError):
            storage.join("ckpt", bad)
    with pytest.raises(StorageError):
        storage.join("ckpt", ".staging-never-created", timeout=0.05)
    txn.abort()
    assert list(tmp_path.iterdir()) == []


def test_single_process_save_and_restore(tmp_path: Path) -> None:
    ctx = sgd.current_context()
    assert (ctx.rank, ctx.world_size, ctx.is_coordinator) == (0, 1, True)
    assert ctx.broadcast_text("x") == "x" and ctx.all_gather_json({"a": 1}) == [{"a": 1}]
    assert ctx.run_on_coordinator(lambda: ["name"]) == ["name"]
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    rng = random.Random(5)
    manifest = sgd.save(tmp_path / "c", {"model": model, "optimizer": opt, "gen": rng, "epoch": 2})
    assert sorted(manifest.files) == ["gen.rank0.safetensors", "model.safetensors", "optimizer.safetensors"]
    assert sgd.item_names(manifest) == {"model", "optimizer", "gen", "epoch"}
    expected = rng.random()
    fresh, fresh_rng = torch.nn.Linear(3, 2), random.Random(1)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    report = sgd.restore(tmp_path / "c", {"model": fresh, "optimizer": fresh_opt, "gen": fresh_rng, "epoch": 0})
    assert report.state == {"epoch": 2} and fresh_rng.random() == expected
    assert torch.equal(fresh.weight, model.weight)
    momentum = opt.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(fresh_opt.state_dict()["state"][0]["momentum_buffer"], momentum)
    # A checkpoint of plain savegame.save restores through the same call (every item replicated).
    savegame.save(tmp_path / "plain", {"model": model})
    assert sgd.item_names(savegame.read_manifest(tmp_path / "plain")) == {"model"}
    assert sgd.restore(tmp_path / "plain", {"model": torch.nn.Linear(3, 2)}).loaded == ["model"]


def test_reserved_names_and_unknown_per_rank_items(tmp_path: Path) -> None:
    with pytest.raises(InvalidNameError):
        sgd.save(tmp_path / "a", {"rng.rank3": 1})
    with pytest.raises(InvalidNameError):
        sgd.save(tmp_path / "b", {sgd.LAYOUT_ITEM: 1})
    with pytest.raises(savegame.ConfigError):
        sgd.save(tmp_path / "c", {"x": 1}, per_rank=("sampler",))
    with pytest.raises(savegame.ConfigError):  # storage_options belong to URLs (which save() now accepts)
        sgd.save(tmp_path / "d", {"x": 1}, storage_options={"key": "k"})
    assert not any(tmp_path.iterdir())


def _chunks(body: dict[str, Any], path: str) -> list[dict[str, Any]]:
    tensors = body["items"]["model"]["skeleton"]["tensors"]
    chunks: list[dict[str, Any]] = next(t for t in tensors if t["path"] == [path])["chunks"]
    return chunks


HOSTILE: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "chunk past the end": (lambda b: _chunks(b, "0.weight")[1].update(offsets=[5, 0]), "exceeds size"),
    "overlapping chunks": (lambda b: _chunks(b, "0.weight")[1].update(offsets=[3, 0]), "overlaps"),
    "missing chunk": (lambda b: _chunks(b, "0.weight").pop(), "chunks hold"),
    "lying dtype": (lambda b: next(t for t in b["items"]["model"]["skeleton"]["tensors"]
                                   if t["path"] == ["0.weight"]).update(dtype="float64"), "manifest says"),
    "unknown dtype": (lambda b: next(t for t in b["items"]["model"]["skeleton"]["tensors"]
                                     if t["path"] == ["0.weight"]).update(dtype="__class__"), "unknown torch dtype"),
    "absent key": (lambda b: _chunks(b, "0.bias")[0].update(key="nope"), "not in shards"),
    "file outside the manifest": (lambda b: _chunks(b, "0.bias")[0].update(file="../../etc/passwd"), "not listed"),
    "negative offset": (lambda b: _chunks(b, "0.bias")[0].update(offsets=[-1]), "non-negative"),
}  # fmt: skip


@pytest.mark.subprocess
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_sharded_manifests_are_refused(
    case: str, fsdp_saved: FsdpRuns, tmp_path: Path, resign: Callable[..., dict[str, Any]]
) -> None:
    ckpt = tmp_path / "ws2"
    shutil.copytree(fsdp_saved.root / "ws2", ckpt)
    mutate, message = HOSTILE[case]
    resign(ckpt, mutate)
    with pytest.raises(savegame.CorruptCheckpointError, match=message):
        sgd.load_full_state_dict(ckpt)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    with pytest.raises(savegame.CorruptCheckpointError):
        sgd.restore(ckpt, {"model": model})


@pytest.mark.subprocess
def test_a_damaged_shard_is_detected(fsdp_saved: FsdpRuns, tmp_path: Path) -> None:
    ckpt = tmp_path / "ws2"
    shutil.copytree(fsdp_saved.root / "ws2", ckpt)
    data = bytearray((ckpt / "shards.rank1.safetensors").read_bytes())
    data[-5] ^= 0x01
    (ckpt / "shards.rank1.safetensors").write_bytes(bytes(data))
    with pytest.raises(savegame.HashMismatchError, match=r"shards\.rank1"):
        sgd.load_full_state_dict(ckpt)
    with pytest.raises(savegame.HashMismatchError):
        savegame.verify(ckpt)
