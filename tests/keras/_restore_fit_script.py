"""A deterministic Keras run resumed by hand: ``Checkpointer.restore`` of a ``KerasState``, then ``fit``.

    python _restore_fit_script.py OUT_DIR CKPT_DIR --phase full|first|resume

``full`` trains 4 epochs straight; ``first`` trains 2 epochs and saves ``{"keras": KerasState(model)}``
with a :class:`savegame.Checkpointer` at every epoch end; ``resume`` builds and compiles the model
afresh (another process), restores the newest checkpoint and calls ``fit(initial_epoch=2, epochs=4)``.
Each phase writes every model and optimizer variable to ``OUT_DIR/final.npz``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras
import numpy as np
from _kerashelp import arrays, configure_determinism, conv_model, digits

from savegame import Checkpointer
from savegame.adapters.keras import KerasState

EPOCHS = 4
RESUME_AT = 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("ckpt")
    parser.add_argument("--phase", required=True, choices=["full", "first", "resume"])
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configure_determinism()
    keras.utils.set_random_seed(1234)
    x, y, xv, yv = digits(400)
    model = conv_model()
    fit = {"x": x, "y": y, "batch_size": 32, "validation_data": (xv, yv), "shuffle": True, "verbose": 0}
    if args.phase == "full":
        model.fit(epochs=EPOCHS, **fit)
    elif args.phase == "first":
        ckpt = Checkpointer(args.ckpt, keep_last=1)
        saver = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: ckpt.save({"keras": KerasState(model)}, epoch=epoch + 1)
        )
        model.fit(epochs=RESUME_AT, callbacks=[saver], **fit)
        ckpt.close()
    else:
        keras.utils.set_random_seed(999)  # whatever the RNGs are now, the restore puts them back
        with Checkpointer(args.ckpt) as ckpt:
            restored = ckpt.restore({"keras": KerasState(model)})
        assert restored is not None and restored.epoch == RESUME_AT, restored
        model.fit(initial_epoch=restored.epoch, epochs=EPOCHS, **fit)
    variables = arrays(model.weights) + arrays(model.optimizer.variables)
    np.savez(out / "final.npz", **{f"v{i:03d}": v for i, v in enumerate(variables)})


if __name__ == "__main__":
    main()
