"""Fit ``LitMLP`` through SavegameIO in a fresh process: optionally SIGKILL itself mid-training, resume
with ``ckpt_path``, run under ``strategy="ddp"`` on 2 CPU processes, and save the final weights.

    python _fit_script.py ROOT --epochs 4 [--kill-at-step 10] [--resume last|PATH] [--background]
                          [--ddp] [--out OUT] [--log LOG]

``--out``: the final model weights as a savegame checkpoint (rank 0), for the parent to compare.
``--log``: one line per ``save_checkpoint`` call (``rank name``) and, on resume, whether each rank's
weights at the start of training equal the checkpoint's.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from _lithelp import LitMLP, data, model_checkpoint, trainer

import savegame
import savegame.lightning as sl


class KillAt(pl.Callback):
    """SIGKILL this process after training step ``step`` (no cleanup, no atexit: a real crash)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class LoggedIO(sl.SavegameIO):
    """SavegameIO that appends ``rank path`` to a file for every save call, and checks resumes."""

    def __init__(self, log: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log_file = log

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        with open(self.log_file, "a") as f:
            f.write(f"{os.environ.get('LOCAL_RANK', '0')} {os.path.basename(path)}\n")
        super().save_checkpoint(checkpoint, path, storage_options)


class CheckRestored(pl.Callback):
    """At the start of a resumed fit, every rank's weights equal the checkpoint's (written to a file)."""

    def __init__(self, ckpt: str, log: Path) -> None:
        self.expected = savegame.load(ckpt)["state_dict"]
        self.log_file = log

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        same = all(torch.equal(v, self.expected[k]) for k, v in module.state_dict().items())
        with open(self.log_file, "a") as f:
            f.write(f"{trainer.global_rank} step={trainer.global_step} restored={same}\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--kill-at-step", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--background", action="store_true")
    parser.add_argument("--ddp", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--log", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    model = LitMLP()
    callbacks: list[Any] = [model_checkpoint(args.root, save_last=True, save_top_k=-1)]
    if args.kill_at_step:
        callbacks.append(KillAt(args.kill_at_step))
    if args.resume and args.log:
        callbacks.append(CheckRestored(str(args.root / "ckpts" / "last.ckpt"), args.log))
    extra: dict[str, Any] = {"strategy": "ddp", "devices": 2} if args.ddp else {}
    io = LoggedIO(args.log, background=args.background) if args.log else sl.SavegameIO(background=args.background)
    t = trainer(args.root, epochs=args.epochs, io=io, callbacks=callbacks, **extra)
    train, val = data()
    t.fit(model, train, val, ckpt_path=args.resume)
    if args.out is not None and t.is_global_zero:
        savegame.save(args.out, {"model": model})


if __name__ == "__main__":
    main()
