"""Keep the best model by validation loss (seed 002: the wine MLP with ``best_loss = inf``).

The hand-written version tracks ``best_loss`` itself and overwrites ``best_model.pth`` with
``torch.save(model)`` (a pickle) whenever the validation loss improves. Here the Checkpointer does the
bookkeeping: ``save_best_only=True`` saves only on improvement, ``keep_last=1`` keeps just that one
(the best), the best value survives restarts, and at the end the best weights are loaded into a fresh
model. Files are safetensors plus a manifest: no pickle, verified on load.

    python examples/wine_best_val_loss.py --dir runs/wine --epochs 100
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split
from torch import nn, optim

from savegame.run.checkpointer import Checkpointer


def make_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(13, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="runs/examples/wine")
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args()

    torch.manual_seed(0)
    wine = load_wine()
    X = torch.tensor(wine.data, dtype=torch.float32)
    y = torch.tensor(wine.target, dtype=torch.long)
    X_train, X_valid, y_train, y_valid = train_test_split(X, y, test_size=0.2, random_state=0)

    model = make_model()
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.Adam(model.parameters(), lr=0.001)

    # Replaces `best_loss = float('inf')`, the `if val_loss < best_loss` test and `torch.save(model, ...)`.
    ckpt = Checkpointer(args.dir, monitor="val_loss", save_best_only=True, keep_last=1, weights_only=True)

    for epoch in range(args.epochs):
        model.train()
        optimizer.zero_grad()
        loss = criterion(model(X_train), y_train)
        loss.backward()
        optimizer.step()

        model.eval()
        with torch.no_grad():
            val_loss = criterion(model(X_valid), y_valid).item()

        saved = ckpt.step({"model": model}, epoch=epoch + 1, metrics={"val_loss": val_loss})
        if saved is not None:
            print(f"Model saved at epoch {epoch} with validation loss {val_loss:.4f}! -> {saved.name}")

    best = ckpt.best
    assert best is not None
    fresh = make_model()
    ckpt.restore({"model": fresh}, "best")
    with torch.no_grad():
        restored_loss = criterion(fresh(X_valid), y_valid).item()
    print(f"best checkpoint: {best.name} (epoch {best.epoch}, val_loss {best.metrics['val_loss']:.4f})")
    print(f"reloaded into a fresh model: val_loss {restored_loss:.4f}")
    print(f"checkpoints on disk: {[r.name for r in ckpt.list()]}")


if __name__ == "__main__":
    main()
