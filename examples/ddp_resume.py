"""DDP training that survives being killed: every rank saves and resumes through savegame.distributed.

    torchrun --nproc_per_node=2 examples/ddp_resume.py --dir /tmp/ddp-run --epochs 6 --stop-after-epoch 3
    torchrun --nproc_per_node=2 examples/ddp_resume.py --dir /tmp/ddp-run --epochs 6     # resumes at epoch 3

Every rank runs the same code: the model and optimizer are written once (by rank 0), each rank's RNG
state separately, and the checkpoint appears only after all ranks finished writing. Rank 0 picks the
checkpoint to resume from and deletes old ones; every rank restores (each gets its own RNG back).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import savegame
from savegame import distributed as sgd
from savegame.storage.local import LocalStorage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True, help="checkpoint directory (shared by all ranks)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    parser.add_argument("--stop-after-epoch", type=int, default=0, help="simulate a crash after this epoch")
    args = parser.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    ctx = sgd.current_context()

    torch.manual_seed(0)  # same data and initial weights on every rank (DDP also broadcasts rank 0's)
    data = TensorDataset(torch.randn(512, 10), torch.randint(0, 3, (512,)))
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=32, sampler=sampler)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Dropout(0.2), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 3)))  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    torch.manual_seed(100 + ctx.rank)  # dropout masks differ per rank; savegame restores each rank's stream
    state = {"model": model, "optimizer": opt, "scheduler": sched, "rng": savegame.RNGState()}

    storage = LocalStorage(args.dir)
    if ctx.is_coordinator:
        storage.cleanup()  # leftovers of a crashed save (never visible to readers anyway)
    committed = storage.committed() if ctx.is_coordinator else []
    latest = ctx.broadcast_text(committed[-1] if committed else "")  # rank 0 decides, everyone follows
    start = 0
    if latest:
        report = sgd.restore(storage.path(latest), {**state, "epoch": 0})
        start = report.state["epoch"]
        if ctx.is_coordinator:
            print(f"resumed from {latest}: epoch {start}", flush=True)

    for epoch in range(start, args.epochs):
        sampler.set_epoch(epoch)
        total = 0.0
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss)
        sched.step()
        name = f"epoch-{epoch + 1:03d}"
        sgd.write_state(storage, name, {**state, "epoch": epoch + 1}, progress={"epoch": epoch + 1})
        if ctx.is_coordinator:  # retention on one rank only, after the commit
            for old in storage.committed()[: -args.keep]:
                storage.delete(old)
            print(f"epoch {epoch + 1}/{args.epochs} loss {total / len(loader):.4f} -> saved {name}", flush=True)
        if epoch + 1 == args.stop_after_epoch:
            dist.destroy_process_group()
            os._exit(3)  # a crash: no cleanup, no goodbye
    ctx.barrier()  # let rank 0 finish its retention before the group goes away
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
