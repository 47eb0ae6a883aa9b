"""savegame: training state that survives anything.

Crash-safe, verified, pickle-free checkpoints of the complete training state (model, optimizer,
schedulers, RNGs, data position) for PyTorch and Keras 3.

    import savegame
    savegame.save("runs/exp/epoch-3", {"model": model, "optimizer": opt, "rng": savegame.RNGState(), "epoch": 3})
    report = savegame.load("runs/exp/epoch-3", {"model": model, "optimizer": opt, "rng": savegame.RNGState()})
    savegame.verify("runs/exp/epoch-3")
"""

from __future__ import annotations

from savegame import _moved
from savegame._version import __version__
from savegame.adapters.rng import RNGState
from savegame.api import load, read_manifest, save, verify
from savegame.config import CheckpointConfig
from savegame.engine.capture import LoadReport, Stateful
from savegame.errors import (
    BackgroundSaveError,
    CheckpointError,
    CheckpointNotFoundError,
    CommitError,
    ConfigError,
    CorruptCheckpointError,
    DamagedSourceError,
    ForeignCheckpointError,
    HashMismatchError,
    InvalidManifestError,
    InvalidNameError,
    InvalidTensorFileError,
    LockedError,
    MissingExtraError,
    MissingFileError,
    NotACheckpointError,
    OccupiedPathError,
    SourceFormatError,
    StateMismatchError,
    StorageError,
    TornSnapshotError,
    TruncatedFileError,
    UnknownSourceFormatError,
    UnsafePickleError,
    UnsupportedFormatError,
    UnsupportedTypeError,
)
from savegame.format.manifest import FORMAT_VERSION, Manifest
from savegame.importers import ImportReport, convert
from savegame.run.checkpointer import (
    Checkpointer,
    CheckpointRecord,
    RestoredProgress,
    ResumeWarning,
    SaveResult,
)
from savegame.run.options import Background, Preemption, StorageOptions

_moved.install()

__all__ = [
    "FORMAT_VERSION",
    "Background",
    "BackgroundSaveError",
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointRecord",
    "Checkpointer",
    "CommitError",
    "ConfigError",
    "CorruptCheckpointError",
    "DamagedSourceError",
    "ForeignCheckpointError",
    "HashMismatchError",
    "ImportReport",
    "InvalidManifestError",
    "InvalidNameError",
    "InvalidTensorFileError",
    "LoadReport",
    "LockedError",
    "Manifest",
    "MissingExtraError",
    "MissingFileError",
    "NotACheckpointError",
    "OccupiedPathError",
    "Preemption",
    "RNGState",
    "RestoredProgress",
    "ResumeWarning",
    "SaveResult",
    "SourceFormatError",
    "StateMismatchError",
    "Stateful",
    "StorageError",
    "StorageOptions",
    "TornSnapshotError",
    "TruncatedFileError",
    "UnknownSourceFormatError",
    "UnsafePickleError",
    "UnsupportedFormatError",
    "UnsupportedTypeError",
    "__version__",
    "convert",
    "load",
    "read_manifest",
    "save",
    "verify",
]
