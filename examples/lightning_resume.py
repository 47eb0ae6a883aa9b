"""Lightning with savegame checkpoints: one line, then kill -9 mid-training and resume exactly.

The only change to a Lightning script is the plugin::

    trainer = pl.Trainer(..., plugins=[savegame.lightning.SavegameIO()])

Lightning's own ModelCheckpoint then writes savegame checkpoints (``epoch=1-step=46.ckpt`` is a
directory, committed atomically, pickle-free) and ``trainer.fit(ckpt_path="last")`` resumes from them.
This script trains an MLP on scikit-learn's digits three ways: uninterrupted; in a child process that
SIGKILLs itself in the middle of epoch 3; and resumed from that child's ``last.ckpt``. The resumed run
ends with the same weights, bit for bit.

    python examples/lightning_resume.py [OUT_DIR]
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

import savegame
import savegame.lightning

EPOCHS = 4
KILL_AT_STEP = 2 * 12 + 5  # epoch 3 (12 batches of 128 per epoch), batch 6


class Digits(pl.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(hidden, 10))  # fmt: skip

    def training_step(self, batch: Any, index: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, index: int) -> None:
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def loaders() -> tuple[DataLoader[Any], DataLoader[Any]]:
    x, y = load_digits(return_X_y=True)
    ds = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    train = torch.utils.data.Subset(ds, range(1536))
    val = torch.utils.data.Subset(ds, range(1536, len(ds)))
    return DataLoader(train, batch_size=128, shuffle=True), DataLoader(val, batch_size=256)


class KillAt(pl.Callback):
    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == KILL_AT_STEP:
            print(f"step {KILL_AT_STEP}: kill -9", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def run(directory: Path, *, resume: bool = False, kill: bool = False) -> Digits:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = Digits()
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=directory / "ckpts", monitor="val_acc", mode="max",
                                               save_top_k=2, save_last=True)  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", deterministic=True, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=directory, callbacks=[checkpoints, *([KillAt()] if kill else [])],
        plugins=[savegame.lightning.SavegameIO()],  # <- the one-line change
    )  # fmt: skip
    trainer.fit(model, *loaders(), ckpt_path="last" if resume else None)
    return model


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/examples/lightning")
    if os.environ.get("LIGHTNING_RESUME_CHILD"):
        run(out / "killed", kill=True)
        return
    straight = run(out / "straight")
    child = subprocess.run([sys.executable, __file__, str(out)], env={**os.environ, "LIGHTNING_RESUME_CHILD": "1"})
    print(f"child exited with {child.returncode} (-9: killed); checkpoints left:",
          sorted(os.listdir(out / "killed" / "ckpts")))  # fmt: skip
    resumed = run(out / "killed", resume=True)
    same = all(torch.equal(a, b) for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()))
    print(f"resumed run identical to the uninterrupted run: {same}")
    best = savegame.read_manifest(out / "killed" / "ckpts" / "last.ckpt")
    print("last.ckpt holds items:", ", ".join(best.items))
    sys.exit(0 if same and child.returncode == -signal.SIGKILL else 1)


if __name__ == "__main__":
    main()
