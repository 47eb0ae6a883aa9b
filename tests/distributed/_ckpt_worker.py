"""Checkpointer under DDP (torchrun, gloo, CPU): every rank makes the same ``Checkpointer`` calls.

``--mode train``: 6 steps; ``ckpt.step(...)`` every step with ``every_n_steps=2, keep_last=2``, so
steps 2, 4, 6 are saved and step 2 is deleted by rank 0's retention; then 3 more steps whose result is
the reference. ``--mode resume``: fresh objects (other seeds), ``ckpt.restore(state)`` (rank 0 picks and
verifies the newest checkpoint, every rank loads it and gets its own RNG back), then the same 3 steps.
Both write ``OUT/<mode>.rank<R>.json`` (parameter digest, next random draws), which must be identical.
"""

from __future__ import annotations

import argparse
import os
import random

import numpy as np
import torch
from _common import digest, finish, init, write_json
from _ddp_worker import build, train_step

import savegame

TRAIN_STEPS, MORE = 6, 3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("train", "resume"), required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank, _ = init()
    result: dict[str, object] = {}
    seed = 0 if args.mode == "train" else 123
    ddp, opt, sched = build(seed=seed)
    random.seed(10 + rank if args.mode == "train" else 999)
    np.random.seed(10 + rank if args.mode == "train" else 999)
    torch.manual_seed(10 + rank if args.mode == "train" else 999)
    state = {"model": ddp, "optimizer": opt, "scheduler": sched}
    ckpt = savegame.Checkpointer(args.root, every_n_steps=2, keep_last=2, save_at_end=False,
                                 metadata={"run": "ckpt-ddp"})  # fmt: skip
    if args.mode == "train":
        saved = []
        for step in range(1, TRAIN_STEPS + 1):
            train_step(ddp, opt, sched)
            done = ckpt.step(state, step=step, epoch_end=False, metrics={"loss": float(step)})
            if done is not None:
                saved.append(done.name)
        result["saved"] = saved
        start = TRAIN_STEPS
    else:
        restored = ckpt.restore(state)
        assert restored is not None
        result["restored"] = restored.name
        start = restored.step or 0
    result["listed"] = [r.name for r in ckpt.list()]
    ckpt.close()
    for _ in range(start + 1, start + MORE + 1):
        train_step(ddp, opt, sched)
    result["params"] = digest(ddp.module.parameters())
    result["draws"] = [torch.rand(3).tolist(), float(np.random.rand()), random.random()]
    write_json(os.path.join(args.out, f"{args.mode}.rank{rank}.json"), result)
    finish()


if __name__ == "__main__":
    main()
