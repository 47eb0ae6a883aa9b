"""Name checkpoints after epoch and metric, save only on improvement (seed 004).

Keras's ``ModelCheckpoint('xception_v1_{epoch:02d}_{val_accuracy:.3f}.h5', save_best_only=True,
monitor='val_accuracy', mode='max')`` and the hand-written PyTorch loop with ``best_val_accuracy = 0.0``
become one Checkpointer. The template is checked when the Checkpointer is built (a typo in a placeholder
fails now, not hours into training); epochs are 1-based in names, as in Keras. Every improvement is
kept, so the directory shows the history of champions::

    mobilenet_v2_01_0.903/   mobilenet_v2_02_0.942/   mobilenet_v2_05_0.958/ ...

    python examples/epoch_metric_names.py --dir runs/names --epochs 10
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from savegame.run.checkpointer import Checkpointer


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = model(x)
        return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="runs/examples/names")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x))
    train, val = order[:1400], order[1400:]
    loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True)

    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(
        args.dir,
        name="mobilenet_v2_{epoch:02d}_{val_accuracy:.3f}",
        monitor="val_accuracy",
        mode="max",
        save_best_only=True,
        weights_only=True,
    )

    for epoch in range(args.epochs):
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        train_loss, train_acc = evaluate(model, x[train], y[train])
        val_loss, val_acc = evaluate(model, x[val], y[val])

        saved = ckpt.step({"model": model}, epoch=epoch + 1, metrics={"val_loss": val_loss, "val_accuracy": val_acc})
        if saved is not None:
            print(f"Checkpoint saved: {saved.path}")
        print(f"Epoch {epoch + 1}/{args.epochs}")
        print(f"  Train Loss: {train_loss:.4f}, Train Acc: {train_acc:.4f}")
        print(f"  Val Loss: {val_loss:.4f}, Val Acc: {val_acc:.4f}")

    print("\nsaved (only improvements):")
    for record in ckpt.list():
        print(f"  {record.name}{'   <- best' if record.is_best else ''}")


if __name__ == "__main__":
    main()
