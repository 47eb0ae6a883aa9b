"""Seed 000 with savegame: keep the best weights by validation loss, then load them back.

The Keras snippet of the seed, on scikit-learn's digits, with one change: the import. Checkpoints are
atomic and verified; ``checkpoints/model_weights.ckpt`` is a directory holding the newest and the best.

    KERAS_BACKEND=torch python examples/keras_seed000_best_weights.py [OUT_DIR]
"""

from __future__ import annotations

import os
import sys

import keras
import numpy as np
from sklearn.datasets import load_digits

import savegame.keras
from savegame.keras import ModelCheckpoint


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/keras_seed000"
    keras.utils.set_random_seed(0)
    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target
    X_train, y_train, X_val, y_val = x[:1400], y[:1400], x[1400:], y[1400:]
    epochs = 5

    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])

    # Define the ModelCheckpoint callback (savegame's, same arguments as Keras's)
    checkpoint_path = os.path.join(out, "checkpoints", "model_weights.ckpt")
    checkpoint_callback = ModelCheckpoint(
        filepath=checkpoint_path, save_weights_only=True, monitor="val_loss", save_best_only=True, verbose=1
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(
        X_train, y_train, epochs=epochs, validation_data=(X_val, y_val), callbacks=[checkpoint_callback], verbose=2
    )

    # To load the saved weights back to the model
    savegame.keras.load_weights(model, checkpoint_path)
    val_loss = model.evaluate(X_val, y_val, verbose=0)[0]
    best = float(np.min(history.history["val_loss"]))
    print(f"restored val_loss {val_loss:.6f}, best during training {best:.6f}")
    assert abs(val_loss - best) < 1e-4


if __name__ == "__main__":
    main()
