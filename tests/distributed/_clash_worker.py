"""A name taken by another writer while a 2-rank Checkpointer save is written (torchrun, gloo, CPU).

Rank 0's storage lets an intruder commit a checkpoint under the name being published, just before the
publishing rename; the save must go to the next free name on every rank, as a sync or background save
in one process does (tests/test_write_loop.py). Writes ``OUT/clash.rank<R>.json``.
"""

from __future__ import annotations

import argparse
import os

import torch
from _common import Intruder, finish, init, write_json

import savegame


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank, _ = init()
    torch.manual_seed(0)
    state = {"model": torch.nn.Linear(4, 3), "gen": torch.Generator().manual_seed(rank)}
    ckpt = savegame.Checkpointer(args.root, monitor="loss", per_rank=("gen",), save_at_end=False)
    intruder = Intruder()
    if rank == 0:
        ckpt.storage.ops = intruder  # only rank 0 publishes
    result = ckpt.step(state, epoch=1, metrics={"loss": 0.5})
    assert result is not None
    latest, best = ckpt.latest, ckpt.best
    assert latest is not None and best is not None
    ckpt.close()
    write_json(os.path.join(args.out, f"clash.rank{rank}.json"),
               {"name": result.name, "latest": latest.name, "best": best.name, "took": intruder.took})  # fmt: skip
    finish()


if __name__ == "__main__":
    main()
