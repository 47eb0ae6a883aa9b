"""A deterministic Keras digits training run used by the kill-and-resume tests.

    python _fit_script.py OUT_DIR [--kill-at-step N] [--mode backup|checkpoint|none] [--save-freq epoch|N]

Trains a small conv net for a few epochs with savegame's automatic resume; with ``--kill-at-step`` the
process SIGKILLs itself after that many training batches. At the end it writes every model and
optimizer variable to ``OUT_DIR/final.npz`` (plain arrays, no pickle) and the epoch logs and the best
``val_accuracy`` of the savegame ModelCheckpoint (``--mode backup``) to ``OUT_DIR/history.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras
import numpy as np
from _kerashelp import arrays, configure_determinism, conv_model, digits


class Killer(keras.callbacks.Callback):  # type: ignore[misc]
    """SIGKILLs the process after ``at`` training batches (counted over the whole run)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at
        self.seen = 0

    def on_train_batch_end(self, batch: int, logs: object = None) -> None:
        self.seen += 1
        if self.seen >= self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill-at-step", type=int, default=0)
    parser.add_argument("--mode", default="backup", choices=["backup", "checkpoint", "none"])
    parser.add_argument("--save-freq", default="epoch")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_freq: str | int = args.save_freq if args.save_freq == "epoch" else int(args.save_freq)

    configure_determinism()
    keras.utils.set_random_seed(1234)
    x, y, xv, yv = digits(400)
    model = conv_model()

    import savegame.keras as sk

    callbacks: list[object] = []
    best: sk.ModelCheckpoint | None = None
    if args.mode == "backup":
        callbacks.append(sk.BackupAndRestore(str(out / "backup"), save_freq=save_freq, delete_checkpoint=False))
        best = sk.ModelCheckpoint(str(out / "best"), monitor="val_accuracy", mode="max", save_best_only=True)
        callbacks.append(best)
    elif args.mode == "checkpoint":
        callbacks.append(sk.ModelCheckpoint(str(out / "ckpt"), save_freq=save_freq, resume=True, keep_last=2))
    if args.kill_at_step:
        callbacks.append(Killer(args.kill_at_step))
    history = model.fit(
        x, y, batch_size=32, epochs=args.epochs, validation_data=(xv, yv), callbacks=callbacks, verbose=0,
        shuffle=True,
    )
    variables = {f"model:{i}": a for i, a in enumerate(arrays(model.weights))}
    variables.update({f"opt:{i}": a for i, a in enumerate(arrays(model.optimizer.variables))})
    np.savez(out / "final.npz", **variables)
    logs = {k: [float(v) for v in vs] for k, vs in history.history.items()}
    (out / "history.json").write_text(json.dumps({"logs": logs, "best": None if best is None else best.best}))


if __name__ == "__main__":
    main()
