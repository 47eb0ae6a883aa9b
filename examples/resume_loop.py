"""Resume training from the last checkpoint: epoch, model, optimizer, loss (seed 000).

The hand-written version saves ``{'epoch', 'model_state_dict', 'optimizer_state_dict', 'loss'}`` with
``torch.save`` and, on restart, loads it back and continues with ``for epoch in range(epoch,
num_epochs)``. With the Checkpointer the state is a dict of live objects; ``restore`` puts the saved
values back in place (and the RNGs, so dropout continues exactly) and returns where training stopped.

Run it, interrupt it (Ctrl-C, kill -9, or ``--stop-after-epoch 3`` to simulate a crash), run it again:
it continues from the newest valid checkpoint.

    python examples/resume_loop.py --dir runs/resume --stop-after-epoch 3
    python examples/resume_loop.py --dir runs/resume
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from savegame.run.checkpointer import Checkpointer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="runs/examples/resume")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--stop-after-epoch", type=int, default=None, help="simulate a crash after this epoch")
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(256, 10)
    y = x @ torch.randn(10, 1) + 0.1 * torch.randn(256, 1)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    loss = float("nan")

    ckpt = Checkpointer(args.dir, every_n_epochs=1, keep_last=2)
    state = {"model": model, "optimizer": optimizer, "loss": loss}
    restored = ckpt.restore(state)  # None on the first run
    start_epoch = 0
    if restored is not None:
        start_epoch = restored.epoch or 0
        loss = restored.data["loss"]
        print(f"resumed from {restored.name}: epoch {start_epoch}, loss {loss:.4f}")

    for epoch in range(start_epoch, args.epochs):
        model.train()
        optimizer.zero_grad()
        batch_loss = nn.functional.mse_loss(model(x), y)
        batch_loss.backward()
        optimizer.step()
        loss = batch_loss.item()
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss:.4f}")
        state["loss"] = loss
        ckpt.step(state, epoch=epoch + 1, final=epoch + 1 == args.epochs)
        if args.stop_after_epoch is not None and epoch + 1 == args.stop_after_epoch:
            print("simulated crash")
            sys.exit(3)

    print(f"done; checkpoints kept: {[r.name for r in ckpt.list()]}")


if __name__ == "__main__":
    main()
