"""Seed 001 with savegame: a CANDLE-style Keras digits run configured by a default-model file.

CANDLE's Keras checkpointing saves weights, optimizer and epoch, keeps a limited number of checkpoints,
tracks the best by a metric and restarts automatically. Here the ``ckpt_*`` keys of
``keras_candle_default_model.txt`` (overridable as ``--key value`` on the command line) configure
savegame's ``ModelCheckpoint``: ``ckpt_restart_mode='auto'`` resumes the newest checkpoint, exactly where
it stopped (run the script twice: the second run continues, or does nothing when training finished).

    KERAS_BACKEND=tensorflow python examples/keras_seed001_candle.py [--ckpt_directory DIR] [--epochs N]
"""

from __future__ import annotations

import argparse
import ast
import os
from pathlib import Path
from typing import Any

import keras
from sklearn.datasets import load_digits

from savegame.keras import ModelCheckpoint

DEFAULT_MODEL = Path(__file__).with_name("keras_candle_default_model.txt")


def read_params(path: Path, argv: list[str] | None = None) -> dict[str, Any]:
    """``key = value`` lines (values are Python literals), then ``--key value`` overrides."""
    params: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "[")) or "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        params[key] = ast.literal_eval(value)
    parser = argparse.ArgumentParser(description=__doc__)
    for key, value in params.items():
        parser.add_argument(f"--{key}", type=lambda s: ast.literal_eval(s) if s[:1] in "[{'\"0123456789-" or s in (
            "True", "False", "None") else s, default=value)
    return vars(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> None:
    params = read_params(DEFAULT_MODEL, argv)
    keras.utils.set_random_seed(1)
    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target
    layers: list[Any] = [keras.Input((64,))]
    for units in params["dense"]:
        layers += [keras.layers.Dense(units, activation="relu"), keras.layers.Dropout(params["dropout"])]
    model = keras.Sequential([*layers, keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.Adam(params["learning_rate"]),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])

    directory = os.path.join(params["ckpt_directory"], params["model_name"])
    checkpoint = ModelCheckpoint(
        os.path.join(directory, "epoch={epoch:03d}-val_accuracy={val_accuracy:.4f}"),
        monitor=params["ckpt_save_best_metric"],
        save_best_only=False,
        save_weights_only=params["ckpt_save_weights_only"],
        # ckpt_save_interval counts epochs (Keras's integer save_freq counts batches): every N-th epoch and
        # the last one; 0 = the last one only. With ckpt_save_best, every improvement is saved too.
        save_freq="epoch",
        every_n_epochs=int(params["ckpt_save_interval"]),
        keep_last=params["ckpt_keep_limit"],
        keep_best=1 if params["ckpt_save_best"] else None,
        resume=params["ckpt_restart_mode"] != "off" and not params["ckpt_save_weights_only"],
        verbose=1,
    )
    model.fit(x[:1400], y[:1400], epochs=params["epochs"], batch_size=params["batch_size"],
              validation_data=(x[1400:], y[1400:]), callbacks=[checkpoint], verbose=2)
    assert checkpoint.checkpointer is not None
    for record in checkpoint.checkpointer.list():
        print(f"{record.name}  best={record.is_best}")


if __name__ == "__main__":
    main()
