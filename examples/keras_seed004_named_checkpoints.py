"""Seed 004 with savegame: file names with epoch and metric, save only on improvement.

``xception_v1_{epoch:02d}_{val_accuracy:.3f}`` names one checkpoint per improvement of
``val_accuracy`` (mode max), like ``mobilenet_v2_07_0.895.pth`` in the seed; ``keep_best=3`` keeps the
three best. Then the best is loaded and exported as a Keras-native ``.weights.h5`` file.

    KERAS_BACKEND=jax python examples/keras_seed004_named_checkpoints.py [OUT_DIR]
"""

from __future__ import annotations

import os
import sys

import keras
from sklearn.datasets import load_digits

import savegame.keras
from savegame.keras import ModelCheckpoint


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/keras_seed004"
    keras.utils.set_random_seed(4)
    data = load_digits()
    x = (data.images[..., None] / 16.0).astype("float32")
    y = data.target
    train_x, train_y, val_x, val_y = x[:1400], y[:1400], x[1400:], y[1400:]

    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(10),
    ])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])

    checkpoint = ModelCheckpoint(
        os.path.join(out, "xception_v1_{epoch:02d}_{val_accuracy:.3f}"),
        save_best_only=True, monitor="val_accuracy", mode="max", keep_best=3,
    )
    model.fit(train_x, train_y, epochs=6, batch_size=64, validation_data=(val_x, val_y), callbacks=[checkpoint],
              verbose=2)

    assert checkpoint.checkpointer is not None
    for record in checkpoint.checkpointer.list():
        flag = "  <- best" if record.is_best else ""
        print(f"{record.name}  epoch={record.epoch}  val_accuracy={record.metrics['val_accuracy']:.3f}{flag}")
    best = checkpoint.checkpointer.best
    assert best is not None
    exported = savegame.keras.export_weights(model, out, os.path.join(out, "best.weights.h5"), which="best")
    print(f"best: {best.name}; exported to {exported}")


if __name__ == "__main__":
    main()
