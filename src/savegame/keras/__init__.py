"""savegame for Keras 3: a drop-in ``ModelCheckpoint``, ``BackupAndRestore``, ``load_weights``, export.

One-line change for a Keras user::

    from savegame.keras import ModelCheckpoint          # instead of keras.callbacks.ModelCheckpoint
    ckpt = ModelCheckpoint("checkpoints/model_weights.ckpt", monitor="val_loss",
                           save_weights_only=True, save_best_only=True, verbose=1)
    model.fit(x, y, epochs=10, validation_data=(xv, yv), callbacks=[ckpt])
    savegame.keras.load_weights(model, "checkpoints/model_weights.ckpt")

``ModelCheckpoint`` takes every argument of ``keras.callbacks.ModelCheckpoint`` and decides *when* to
save exactly as Keras 3 does (same ``save_freq`` batch counting, same ``monitor``/``mode`` resolution,
same ``initial_value_threshold``, same strict comparison), but writes savegame checkpoints: atomic,
hash-verified, pickle-free directories holding the full training state (weights, optimizer variables,
seed generators and global RNGs, the position in ``fit`` and the callback's best value) or only the
weights with ``save_weights_only=True``. Where the file goes:

* ``filepath`` with placeholders in its last component (``"ckpt/xception_v1_{epoch:02d}_{val_accuracy:.3f}"``):
  the directory part is the checkpoint root and each save is a checkpoint named from the template
  (Keras's formatting: ``epoch`` is 1-based, ``batch`` too, any key of the logs). All are kept unless a
  keep option says otherwise.
* ``filepath`` without placeholders (``"checkpoints/model_weights.ckpt"``): that path is the checkpoint
  root and each save a checkpoint inside it (``epoch=003``...). Keras overwrites one file; savegame keeps
  the newest (``keep_last=1``) and the best, and deletes older ones only after the new one is committed.
* ``filepath`` ending in ``.weights.h5``, ``.keras`` or ``.h5``: the Keras-native file, written
  atomically (temporary file in the same directory, fsync, rename, fsync of the directory).

Automatic resume: ``BackupAndRestore(backup_dir)`` (Keras's callback, done fully) or
``ModelCheckpoint(..., resume=True)``. At the start of ``fit`` the newest checkpoint is restored —
weights, optimizer variables, ``SeedGenerator`` and global RNG state, the best value and batch counters
of every savegame callback of the same ``fit`` — and ``fit`` continues at the saved epoch and, for
checkpoints saved every N batches, at the saved batch (the batches already done are skipped without
training, and the data order of the interrupted epoch is reproduced). A deterministic run interrupted
and resumed ends with the same variables as an uninterrupted one.

Limitations: mid-epoch resume needs a re-iterable input whose order is driven by the global RNGs (NumPy
arrays, ``tf.data`` pipelines without their own state, ``keras.utils.PyDataset`` without hidden state);
callbacks other than savegame's see the skipped batches' ``on_train_batch_*`` calls.
"""

from __future__ import annotations

from savegame.adapters.keras import KerasLoadReport as KerasLoadReport
from savegame.adapters.keras import KerasState as KerasState
from savegame.keras.backup import BackupAndRestore as BackupAndRestore
from savegame.keras.checkpoint import ModelCheckpoint as ModelCheckpoint
from savegame.keras.files import NATIVE_SUFFIXES as NATIVE_SUFFIXES
from savegame.keras.files import SaveFreq as SaveFreq
from savegame.keras.files import save_native as save_native
from savegame.keras.loading import export_weights as export_weights
from savegame.keras.loading import load_weights as load_weights
from savegame.keras.loading import restore as restore

__all__ = [
    "BackupAndRestore",
    "KerasLoadReport",
    "KerasState",
    "ModelCheckpoint",
    "export_weights",
    "load_weights",
    "restore",
    "save_native",
]
