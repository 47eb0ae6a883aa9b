"""Crash worker (torchrun, gloo, CPU): one rank is SIGKILLed in the middle of a distributed save.

Saves ``ROOT/good`` (FSDP2 model, Adam, per-rank RNG) normally, with rank 0 writing the full state to
``OUT/ref-good``; trains one more step, then saves ``ROOT/doomed`` with rank ``--victim`` writing
through file operations that SIGKILL the process halfway through the first file whose name starts with
``--file`` (``shards`` = its DCP shard file, ``rng`` = its per-rank RNG file). Never exits normally.
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
from _common import init
from _fsdp_worker import build, full_state, train_step

import savegame
from savegame import distributed as sgd
from savegame.storage.local import FileOps, LocalStorage


class KillingOps(FileOps):
    """File operations that kill this process after writing half of the first write to a chosen file."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.victims: set[int] = set()

    def open_new(self, path: str) -> int:
        fd = super().open_new(path)
        if os.path.basename(path).startswith(self.prefix):
            self.victims.add(fd)
        return fd

    def write(self, fd: int, data: memoryview) -> int:
        if fd in self.victims:
            os.write(fd, data[: max(1, len(data) // 2)])
            os.kill(os.getpid(), signal.SIGKILL)
        return super().write(fd, data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--victim", type=int, required=True)
    parser.add_argument("--file", choices=("shards", "rng"), required=True)
    args = parser.parse_args()
    rank, world = init()
    model, opt = build(world, seed=0)
    torch.manual_seed(10 + rank)
    train_step(model, opt)
    state = {"model": model, "optimizer": opt, "rng": savegame.RNGState(), "step": 1}
    sgd.save(os.path.join(args.root, "good"), state)
    full = full_state(model, opt)
    if rank == 0:
        savegame.save(os.path.join(args.out, "ref-good"), full)
    train_step(model, opt)
    state["step"] = 2
    storage = LocalStorage(args.root, ops=KillingOps(args.file) if rank == args.victim else None)
    sgd.write_state(storage, "doomed", state)
    raise SystemExit(f"rank {rank}: the save of 'doomed' returned although rank {args.victim} was killed")


if __name__ == "__main__":
    main()
