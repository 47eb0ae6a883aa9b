"""DDP worker (torchrun, gloo, CPU): train with dropout and per-rank data, save mid-run, or resume from it.

``--mode train``: 6 steps, saving ``ROOT/step-3`` after step 3 with :func:`savegame.distributed.save`.
``--mode resume``: fresh objects (other seeds), :func:`savegame.distributed.restore` of ``step-3``, steps
4-6. Both write ``OUT/<mode>.rank<R>.json`` with a digest of the final parameters and the next random
draws of every generator, which must be identical. ``--plain`` (resume): a checkpoint saved from a
plain (non-DDP) model that must load into the DDP model; ``--corrupt``: a copy of ``step-3`` with
rank 1's RNG file damaged, whose restore must fail on every rank (and a save whose items differ
between ranks must fail on every rank too).
"""

from __future__ import annotations

import argparse
import os
import random

import numpy as np
import torch
from _common import digest, finish, init, write_json
from torch.nn.parallel import DistributedDataParallel as DDP

import savegame
from savegame import distributed as sgd

TOTAL, SAVE_AT = 6, 3


def build(seed: int) -> tuple[DDP, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    )
    ddp = DDP(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return ddp, opt, sched


def train_step(ddp: DDP, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler) -> None:
    x = torch.randn(8, 6)
    y = torch.randint(0, 3, (8,))
    scale = 1.0 + float(np.random.rand()) * 0.1 + random.random() * 0.1
    loss = torch.nn.functional.cross_entropy(ddp(x), y) * scale
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("train", "resume"), required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--plain")
    parser.add_argument("--corrupt")
    args = parser.parse_args()
    rank, _ = init()
    ckpt = os.path.join(args.root, f"step-{SAVE_AT}")
    result: dict[str, object] = {}
    if args.mode == "train":
        ddp, opt, sched = build(seed=0)
        random.seed(10 + rank)
        np.random.seed(10 + rank)
        torch.manual_seed(10 + rank)
        for step in range(1, TOTAL + 1):
            train_step(ddp, opt, sched)
            if step == SAVE_AT:
                state = {"model": ddp, "optimizer": opt, "scheduler": sched, "rng": savegame.RNGState(), "step": step}
                manifest = sgd.save(ckpt, state, metadata={"run": "ddp-test"})
                result["files"] = sorted(manifest.files)
    else:
        ddp, opt, sched = build(seed=123)
        random.seed(999)
        np.random.seed(999)
        torch.manual_seed(999)
        state = {"model": ddp, "optimizer": opt, "scheduler": sched, "rng": savegame.RNGState(), "step": 0}
        report = sgd.restore(ckpt, state)
        start = report.state["step"]
        result["start"] = start
        for _ in range(start + 1, TOTAL + 1):
            train_step(ddp, opt, sched)
    result["params"] = digest(ddp.module.parameters())
    result["draws"] = [torch.rand(3).tolist(), float(np.random.rand()), random.random()]
    result["lr"] = sched.get_last_lr()
    if args.mode == "resume" and args.plain:
        other, _, _ = build(seed=7)
        sgd.restore(args.plain, {"model": other})
        saved = savegame.load(ckpt)["model"]
        keys = list(other.state_dict())
        same = all(torch.equal(v, saved[k]) for k, v in other.state_dict().items())
        result["plain_into_ddp"] = same and all(k.startswith("module.") for k in keys)
    if args.mode == "resume" and args.corrupt:
        # Failures are collective: every rank raises, no rank is left waiting, nothing is committed.
        extra = {"extra": 1} if rank == 1 else {}
        try:
            sgd.save(os.path.join(args.root, "mismatch"), {"model": ddp, **extra})
            result["mismatch"] = "saved"
        except savegame.CheckpointError as exc:
            result["mismatch"] = type(exc).__name__
        try:  # rank 1's RNG file is damaged: rank 1 finds it, every rank raises a corruption error
            sgd.restore(args.corrupt, {"model": ddp, "rng": savegame.RNGState()})
            result["corrupt"] = "loaded"
        except savegame.CheckpointError as exc:
            result["corrupt"] = type(exc).__name__
            result["corrupt_is_corruption"] = isinstance(exc, savegame.CorruptCheckpointError)
    write_json(os.path.join(args.out, f"{args.mode}.rank{rank}.json"), result)
    finish()


if __name__ == "__main__":
    main()
