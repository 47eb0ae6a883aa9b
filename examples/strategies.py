"""The three checkpoint strategies of "Save and Resume your Experiments" (seed 003).

* short training (minutes - hours): one checkpoint at the end;
* normal training (hours - a day): every n epochs, track the best, keep a fixed number (10);
* long training (days - weeks): save less often (every 5 epochs or 30 minutes), keep more: the 20 newest,
  a log-spaced history back to the start, and the best.

Each preset trains the same small model here and reports how many checkpoints it wrote and kept and
the disk they use, which is the frequency / number-to-keep tradeoff of the guide's table.

    python examples/strategies.py --dir runs/strategies --epochs 30
"""

from __future__ import annotations

import argparse
import os

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F

from savegame.run.checkpointer import Checkpointer


def run(preset: str, directory: str, epochs: int) -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    train, val = slice(0, 1600), slice(1600, None)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)

    ckpt = Checkpointer.preset(preset, directory, monitor="val_accuracy", max_epochs=epochs)
    state = {"model": model, "optimizer": optimizer}
    restored = ckpt.restore(state)
    saves = 0
    for epoch in range(restored.epoch or 0 if restored else 0, epochs):
        optimizer.zero_grad()
        F.cross_entropy(model(x[train]), y[train]).backward()
        optimizer.step()
        with torch.no_grad():
            val_accuracy = (model(x[val]).argmax(1) == y[val]).float().mean().item()
        # max_epochs makes the last epoch the final call: the "short" preset saves exactly there.
        if ckpt.step(state, epoch=epoch + 1, metrics={"val_accuracy": val_accuracy}) is not None:
            saves += 1
    kept = ckpt.list()
    best = ckpt.best
    print(f"{preset:6}  saves {saves:3}  kept {len(kept):3}  disk {sum(r.size for r in kept) / 1024:7.1f} KiB  "
          f"kept epochs {[r.epoch for r in kept]}  best epoch {best.epoch if best else '-'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="runs/examples/strategies")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    for preset in ("short", "normal", "long"):
        run(preset, os.path.join(args.dir, preset), args.epochs)


if __name__ == "__main__":
    main()
