"""FSDP2 worker (torchrun, gloo, CPU): sharded saves, and restores at world size 1 and 2.

``--mode save`` (2 ranks): train 3 steps, save ``ROOT/ws2`` sharded; rank 0 writes the full (gathered)
model and optimizer state to ``OUT/ref`` and, after one more step, to ``OUT/ref-next``.
``--mode restore1`` (1 rank): restore ``ws2`` into a fresh FSDP2 model on a 1-rank mesh, compare with
``ref``, then save it as ``ROOT/ws1``.
``--mode restore2`` (2 ranks): with ``pickle.load``/``pickle.loads``/``torch.load`` made to raise,
restore ``ws2``, compare with ``ref``, train one step, compare with ``ref-next`` (bit-identical); then
restore ``ws1`` into another fresh model and compare with ``ref``; restore an unsharded checkpoint
of ``ref``'s model into an FSDP2 model; save and restore DTensors made by ``distribute_tensor``.
Each mode writes ``OUT/<mode>.json`` (rank 0) with what it found.
"""

from __future__ import annotations

import argparse
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from _common import diff, finish, init, pickle_forbidden, write_json
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor

import savegame
from savegame import distributed as sgd


def build(world: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """An MLP with uneven shards (7 rows over 2 ranks) and BatchNorm buffers, and its Adam."""
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7), torch.nn.ReLU(), torch.nn.Linear(7, 3)
    )
    for layer in (model[0], model[3]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole (unsharded) model and optimizer state, on rank 0 (collective)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, opt, options=options)
    return {"model": dict(msd), "optimizer": dict(osd)}


def compare(model: torch.nn.Module, opt: torch.optim.Optimizer, ref: str, rank: int) -> list[str]:
    state = full_state(model, opt)
    if rank != 0:
        return []
    return diff(state, savegame.load(ref))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("save", "restore1", "restore2"), required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank, world = init()
    ref, ref_next = os.path.join(args.out, "ref"), os.path.join(args.out, "ref-next")
    report: dict[str, Any] = {"world": world}
    if args.mode == "save":
        model, opt = build(world, seed=0)
        torch.manual_seed(10 + rank)
        for _ in range(3):
            train_step(model, opt)
        state = {"model": model, "optimizer": opt, "rng": savegame.RNGState(), "step": 3}
        report["files"] = sorted(sgd.save(os.path.join(args.root, "ws2"), state).files)
        full = full_state(model, opt)
        if rank == 0:
            savegame.save(ref, full)
        train_step(model, opt)
        full = full_state(model, opt)
        if rank == 0:
            savegame.save(ref_next, full)
    elif args.mode == "restore1":
        model, opt = build(world, seed=42)
        state = {"model": model, "optimizer": opt, "rng": savegame.RNGState(), "step": 0}
        with pickle_forbidden() as calls:
            restored = sgd.restore(os.path.join(args.root, "ws2"), state)
        report["pickle_calls"] = calls
        report["step"] = restored.state["step"]
        report["diff_ws2"] = compare(model, opt, ref, rank)
        state["step"] = restored.state["step"]
        sgd.save(os.path.join(args.root, "ws1"), state)
    else:
        model, opt = build(world, seed=42)
        state = {"model": model, "optimizer": opt, "rng": savegame.RNGState(), "step": 0}
        with pickle_forbidden() as calls:
            restored = sgd.restore(os.path.join(args.root, "ws2"), state)
        report["pickle_calls"] = calls
        report["step"] = restored.state["step"]
        report["diff_ws2"] = compare(model, opt, ref, rank)
        train_step(model, opt)
        report["diff_next"] = compare(model, opt, ref_next, rank)
        other, other_opt = build(world, seed=43)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            target = {"model": other, "optimizer": other_opt, "rng": savegame.RNGState()}
            sgd.restore(os.path.join(args.root, "ws1"), target)
        report["warnings"] = [str(w.message) for w in caught if issubclass(w.category, sgd.DistributedWarning)]
        report["diff_ws1"] = compare(other, other_opt, ref, rank)
        # An unsharded checkpoint (one process, or DDP) into an FSDP2 model: DCP distributes the full tensors.
        unsharded = os.path.join(args.out, "unsharded")
        if rank == 0:
            savegame.save(unsharded, {"model": savegame.load(ref)["model"]})
        dist.barrier()
        third, third_opt = build(world, seed=44)
        sgd.restore(unsharded, {"model": third})
        full = full_state(third, third_opt)
        report["diff_unsharded"] = diff(full["model"], savegame.load(ref)["model"]) if rank == 0 else []
        # Plain DTensors (distribute_tensor) in a dict item, next to plain values.
        mesh = init_device_mesh("cpu", (world,))
        table = distribute_tensor(torch.arange(30.0).reshape(10, 3), mesh, [Shard(0)])
        sgd.save(os.path.join(args.root, "dtensor"), {"emb": {"table": table, "rows": 10}})
        zeros = distribute_tensor(torch.zeros(10, 3), mesh, [Shard(0)])
        restored = sgd.restore(os.path.join(args.root, "dtensor"), {"emb": {"table": zeros}})
        report["dtensor_ok"] = bool(torch.equal(zeros.full_tensor(), torch.arange(30.0).reshape(10, 3)))
        report["dtensor_rows"] = restored.state["emb"]["rows"]
    if rank == 0:
        write_json(os.path.join(args.out, f"{args.mode}.json"), report)
    finish()


if __name__ == "__main__":
    main()
