"""FSDP2 (sharded) checkpoints with savegame, resharding, and export into a plain model for inference.

    torchrun --nproc_per_node=2 examples/ddp_fsdp2_export.py --dir /tmp/fsdp-run

Each rank saves only its shards (``shards.rank<R>.safetensors``) through torch.distributed.checkpoint;
the layout is JSON in the manifest, nothing is pickled. The checkpoint then restores at any world size
and, in any single process without a process group, into an ordinary unsharded model.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import savegame
from savegame import distributed as sgd


def make_model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True, help="checkpoint directory (shared by all ranks)")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    ctx = sgd.current_context()
    mesh = init_device_mesh("cpu", (ctx.world_size,))

    torch.manual_seed(0)
    model = make_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(10 + ctx.rank)
    for _ in range(5):
        x = torch.randn(8, 16)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()

    path = os.path.join(args.dir, "step-5")
    state = {"model": model, "optimizer": opt, "rng": savegame.RNGState(), "step": 5}
    manifest = sgd.save(path, state)  # every rank, same call
    if ctx.is_coordinator:
        print("saved", path, "with", sorted(manifest.files), flush=True)

    # Restoring is the same call on every rank, at this or any other world size.
    report = sgd.restore(path, {**state, "step": 0})
    assert report.state["step"] == 5

    if ctx.is_coordinator:  # one process, no collectives: assemble full tensors for inference / export
        full = sgd.load_full_state_dict(path, items=["model"])
        plain = make_model()
        plain.load_state_dict(full["model"])
        savegame.save(os.path.join(args.dir, "export-step-5"), {"model": plain})
        print("exported a plain model:", {k: tuple(v.shape) for k, v in plain.state_dict().items()}, flush=True)
    ctx.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
