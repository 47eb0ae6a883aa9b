"""savegame: training state that survives anything.

Crash-safe, verified, pickle-free checkpoints of the complete training state (model, optimizer,
schedulers, RNGs, data position) for PyTorch and Keras 3.

    import savegame
    savegame.save("runs/exp/epoch-3", {"model": model, "optimizer": opt, "rng": savegame.RNGState(), "epoch": 3})
    report = savegame.load("runs/exp/epoch-3", {"model": model, "optimizer": opt, "rng": savegame.RNGState()})
    savegame.verify("runs/exp/epoch-3")
"""

from __future__ import annotations

from ._version import __version__
from .adapters.rng import RNGState
from .api import load, read_manifest, save, verify
from .capture import LoadReport, Stateful
from .checkpointer import Checkpointer, CheckpointRecord, RestoredProgress, ResumeWarning, SaveResult
from .config import CheckpointConfig
from .errors import (
    BackgroundSaveError,
    CheckpointError,
    CheckpointNotFoundError,
    CommitError,
    ConfigError,
    CorruptCheckpointError,
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
    StateMismatchError,
    StorageError,
    TruncatedFileError,
    UnsupportedFormatError,
    UnsupportedTypeError,
)
from .manifest import FORMAT_VERSION, Manifest

__all__ = [
    "FORMAT_VERSION",
    "BackgroundSaveError",
    "CheckpointConfig",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointRecord",
    "Checkpointer",
    "CommitError",
    "ConfigError",
    "CorruptCheckpointError",
    "ForeignCheckpointError",
    "HashMismatchError",
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
    "RNGState",
    "RestoredProgress",
    "ResumeWarning",
    "SaveResult",
    "StateMismatchError",
    "Stateful",
    "StorageError",
    "TruncatedFileError",
    "UnsupportedFormatError",
    "UnsupportedTypeError",
    "__version__",
    "load",
    "read_manifest",
    "save",
    "verify",
]
