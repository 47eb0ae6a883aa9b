"""A CANDLE-style run configured by a default-model file plus command-line overrides (seed 001).

CANDLE benchmarks read their hyperparameters from ``*_default_model.txt`` and let the command line
override any of them; the ``ckpt_*`` keys drive checkpointing. savegame reads the same file format
(``ast.literal_eval`` values, never ``eval``) and keys, with CANDLE's meaning but fixed: an accuracy
metric is maximised (``ckpt_save_best_metric='val_accuracy'``), ``ckpt_save_interval=0`` only turns off
periodic saves, and the best checkpoint survives ``ckpt_keep_limit``.

    python examples/candle_digits.py
    python examples/candle_digits.py --epochs 3 --ckpt_save_interval 1 --ckpt_directory runs/candle
    python examples/candle_digits.py --config_file my_default_model.txt
"""

from __future__ import annotations

import os

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from savegame.config import CheckpointConfig, load_parameters
from savegame.data import ResumableRandomSampler

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "candle_default_model.txt")


def build_model(dense: list[int], dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = 64
    for units in dense:
        layers += [nn.Linear(width, units), nn.ReLU(), nn.Dropout(dropout)]
        width = units
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def main() -> None:
    params = load_parameters(DEFAULT_MODEL, description=__doc__.split("\n")[0])
    print("parameters:", {k: v for k, v in sorted(params.items()) if not k.startswith("ckpt_")})
    print("checkpointing:", {k: v for k, v in sorted(params.items()) if k.startswith("ckpt_")})

    torch.manual_seed(params["rng_seed"])
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x))
    train, val = order[:1400], order[1400:]
    dataset = TensorDataset(x[train], y[train])
    sampler = ResumableRandomSampler(dataset, seed=params["rng_seed"])
    loader = DataLoader(dataset, batch_size=params["batch_size"], sampler=sampler, generator=torch.Generator())

    model = build_model(params["dense"], params["dropout"])
    optimizer = torch.optim.SGD(model.parameters(), lr=params["learning_rate"], momentum=0.9)

    ckpt = CheckpointConfig.from_params(params).build()
    state = {"model": model, "optimizer": optimizer, "sampler": sampler}
    restored = ckpt.restore(state)  # honours ckpt_restart_mode: off | auto | required
    initial_epoch = restored.epoch or 0 if restored is not None else 0
    if restored is not None:
        print(f"restarting from {restored.name} at epoch {initial_epoch}")

    for epoch in range(initial_epoch, params["epochs"]):
        sampler.set_epoch(epoch)
        model.train()
        for xb, yb in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            logits = model(x[val])
            val_loss = F.cross_entropy(logits, y[val]).item()
            val_acc = (logits.argmax(1) == y[val]).float().mean().item()
        saved = ckpt.step(state, epoch=epoch + 1, metrics={"val_loss": val_loss, "val_accuracy": val_acc})
        note = f"  -> saved {saved.name}{' (best)' if saved.is_best else ''}" if saved else ""
        print(f"epoch {epoch + 1}: val_loss {val_loss:.4f} val_accuracy {val_acc:.4f}{note}")

    print(f"checkpoints in {ckpt.directory}:")
    for record in ckpt.list():
        flags = " ".join(f for f, on in (("best", record.is_best), ("latest", record.is_latest)) if on)
        print(f"  {record.name:16} epoch {record.epoch}  {flags}")


if __name__ == "__main__":
    main()
