"""Distributed saves to an S3 root (moto's server, reached over HTTP), torchrun, gloo, CPU.

The endpoint and credentials arrive as ``--options`` (JSON ``storage_options``); the environment holds no
AWS credentials, so every request must go through the configured storage.

``--mode train`` (2 ranks): the Checkpointer under DDP on ``--root`` (``every_n_steps=2, keep_last=2``:
steps 2, 4, 6 saved, step 2 deleted by rank 0), then 3 more steps (the reference); FSDP2: 3 steps,
``sgd.save(URL/ws2, storage_options=...)``, rank 0 keeps the full state in ``OUT/fsdp-ref``, then
``sgd.restore`` through a ``CheckpointRef`` into a fresh FSDP2 model, compared bit for bit.
``--mode resume`` (2 ranks): fresh objects (other seeds), ``ckpt.restore(state)``, the same 3 steps.
Each writes ``OUT/<mode>.rank<R>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from typing import Any

import numpy as np
import torch
from _common import diff, digest, finish, init, pickle_forbidden, write_json
from _ddp_worker import build, train_step

import savegame
from savegame import distributed as sgd
from savegame.storage.remote import RemoteStorage

TRAIN_STEPS, MORE = 6, 3


def fsdp_round_trip(fsdp_root: str, options: dict[str, Any], out: str, rank: int, world: int) -> dict[str, Any]:
    """FSDP2 (sharded) save to the bucket and restore at the same world size, through a CheckpointRef."""
    from _fsdp_worker import build as build_fsdp
    from _fsdp_worker import full_state
    from _fsdp_worker import train_step as fsdp_step

    model, opt = build_fsdp(world, seed=0)
    torch.manual_seed(20 + rank)
    for _ in range(3):
        fsdp_step(model, opt)
    state = {"model": model, "optimizer": opt, "rng": savegame.RNGState(), "step": 3}
    manifest = sgd.save(f"{fsdp_root}/ws2", state, storage_options=options)
    saved = full_state(model, opt)
    if rank == 0:
        savegame.save(os.path.join(out, "fsdp-ref"), saved)
    fresh, fresh_opt = build_fsdp(world, seed=7)
    target = {"model": fresh, "optimizer": fresh_opt, "rng": savegame.RNGState(), "step": 0}
    storage = RemoteStorage(fsdp_root, storage_options=options)
    with pickle_forbidden() as calls:
        restored = sgd.restore(storage.ref("ws2"), target)
    again = full_state(fresh, fresh_opt)
    return {
        "fsdp_files": sorted(manifest.files),
        "fsdp_step": restored.state["step"],
        "fsdp_diff": diff(again, saved) if rank == 0 else [],
        "fsdp_pickle_calls": calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("train", "resume"), required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--fsdp-root", required=True)
    parser.add_argument("--options", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    options = json.loads(args.options)
    rank, world = init()
    result: dict[str, Any] = {"aws_env": sorted(k for k in os.environ if k.startswith("AWS_"))}
    seed = 0 if args.mode == "train" else 123
    ddp, opt, sched = build(seed=seed)
    random.seed(10 + rank if args.mode == "train" else 999)
    np.random.seed(10 + rank if args.mode == "train" else 999)
    torch.manual_seed(10 + rank if args.mode == "train" else 999)
    state = {"model": ddp, "optimizer": opt, "scheduler": sched}
    ckpt = savegame.Checkpointer(args.root, storage_options=options, every_n_steps=2, keep_last=2,
                                 save_at_end=False, metadata={"run": "s3-ddp"})  # fmt: skip
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
        with pickle_forbidden() as calls:
            restored = ckpt.restore(state)
        assert restored is not None
        result["restored"] = restored.name
        result["pickle_calls"] = calls
        start = restored.step or 0
    result["listed"] = [r.name for r in ckpt.list()]
    ckpt.close()
    for _ in range(start + 1, start + MORE + 1):
        train_step(ddp, opt, sched)
    result["params"] = digest(ddp.module.parameters())
    result["draws"] = [torch.rand(3).tolist(), float(np.random.rand()), random.random()]
    if args.mode == "train":
        result.update(fsdp_round_trip(args.fsdp_root, options, args.out, rank, world))
    write_json(os.path.join(args.out, f"{args.mode}.rank{rank}.json"), result)
    finish()


if __name__ == "__main__":
    main()
