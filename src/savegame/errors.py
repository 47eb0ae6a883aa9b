"""The exceptions savegame raises.

Every error is a subclass of :class:`CheckpointError`, so ``except savegame.CheckpointError`` catches
everything the library raises on purpose. Each subclass names one kind of problem; the message says
what is wrong and where (the checkpoint path, the file, the key path inside the state).

Some subclasses also derive from the matching built-in exception (``TypeError``, ``ValueError``,
``FileNotFoundError``, ``OSError``) so code written against the built-ins keeps working.
"""

from __future__ import annotations

from savegame._util.safetext import escape_controls

__all__ = [
    "BackgroundSaveError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CommitError",
    "ConfigError",
    "CorruptCheckpointError",
    "DamagedSourceError",
    "ForeignCheckpointError",
    "HashMismatchError",
    "IntegrationMismatchError",
    "InvalidManifestError",
    "InvalidNameError",
    "InvalidTensorFileError",
    "LockedError",
    "MissingExtraError",
    "MissingFileError",
    "NotACheckpointError",
    "OccupiedPathError",
    "ResumeWarning",
    "SourceFormatError",
    "StateMismatchError",
    "StorageError",
    "TornSnapshotError",
    "TruncatedFileError",
    "UnknownSourceFormatError",
    "UnsafePickleError",
    "UnsupportedFormatError",
    "UnsupportedTypeError",
]


class CheckpointError(Exception):
    """Base class of every error savegame raises on purpose.

    Messages quote names from checkpoints (folders, keys, metrics) that anyone could have written, so
    ``str()`` shows their control characters as escapes (:func:`savegame._util.safetext.escape_controls`):
    printing an error, or its traceback, cannot move the cursor or retitle the terminal.
    """

    def __str__(self) -> str:
        return escape_controls(super().__str__(), keep_newlines=True)


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path (or the checkpoint asked for by name, ``latest`` or ``best``) does not exist."""


class NotACheckpointError(CheckpointError):
    """The path exists but is not a committed savegame checkpoint (no ``manifest.json``)."""


class UnsupportedFormatError(CheckpointError):
    """The manifest was written by a newer (or unknown) format version than this library reads."""


class CorruptCheckpointError(CheckpointError):
    """The checkpoint exists but its content is damaged or inconsistent."""


class InvalidManifestError(CorruptCheckpointError):
    """``manifest.json`` is not valid JSON, or breaks the schema or a size limit."""


class InvalidTensorFileError(CorruptCheckpointError):
    """A tensor file's header is malformed or lies (offsets, shapes, dtypes, sizes)."""


class MissingFileError(CorruptCheckpointError):
    """A file the manifest lists is not in the checkpoint."""


class TruncatedFileError(CorruptCheckpointError):
    """A file is shorter (or longer) than the manifest says."""


class HashMismatchError(CorruptCheckpointError):
    """A file's content hash differs from the one recorded in the manifest."""


class UnsupportedTypeError(CheckpointError, TypeError):
    """A value in the state cannot be stored exactly (the message names its path in the state)."""


class StateMismatchError(CheckpointError):
    """A strict load found missing, unexpected or shape-mismatched keys; ``report`` has the details."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report


class InvalidNameError(CheckpointError, ValueError):
    """A checkpoint, item or template name is not allowed (separators, ``..``, unknown placeholders)."""


class StorageError(CheckpointError, OSError):
    """An I/O operation failed (disk full, I/O error, permission); nothing partial is visible."""


class CommitError(StorageError):
    """Publishing a finished checkpoint failed; the staging data was removed, older checkpoints kept."""


class OccupiedPathError(CommitError):
    """A save's path holds something that is not a savegame checkpoint (a file, a symbolic link, a
    non-empty folder without a savegame manifest): the save is refused and that path is left untouched.
    ``overwrite=True`` replaces committed checkpoints only; an empty folder may be saved into."""


class LockedError(CheckpointError):
    """Another live process holds the writer lock of this checkpoint directory."""


class BackgroundSaveError(CheckpointError):
    """A save running in the background failed; raised at the next call that can report it."""


class TornSnapshotError(BackgroundSaveError):
    """A lazy snapshot (``snapshot="lazy"``) saw a tensor it had not finished copying change in place
    outside ``optimizer.step()``: its copy may mix old and new values, so that save is not committed
    (earlier checkpoints are unchanged). The message names the tensor."""


class ConfigError(CheckpointError, ValueError):
    """A configuration value (parameter file, command line, constructor option) is invalid."""


class MissingExtraError(ConfigError, ImportError):
    """An integration's framework is not installed; the message names the extra to install
    (``pip install 'savegame[lightning]'``, ``[transformers]``, ``[accelerate]``, ``[ray]``). An
    ``ImportError`` too, so ``except ImportError`` around an optional import keeps working."""


class ForeignCheckpointError(NotACheckpointError):
    """The path holds a framework's own checkpoint (``torch.save``/pickle files such as ``optimizer.pt``,
    ``random_states_0.pkl``, ``.ckpt``), not a savegame checkpoint, or one savegame will not read here.
    savegame never unpickles it; the message says what to do instead (``savegame import``, or the
    integration that wrote it)."""


class IntegrationMismatchError(CheckpointError):
    """A savegame checkpoint written by another integration (or by plain ``savegame.save``) was given to
    an integration that cannot restore it; the message names the writer and the function that reads it."""


class SourceFormatError(CheckpointError, ValueError):
    """``savegame.convert`` / ``savegame import``: the source cannot be imported (see the subclasses)."""


class UnknownSourceFormatError(SourceFormatError):
    """The source is not a format savegame imports (unknown extension, a folder that is not a Hugging Face
    model directory): the message lists what is accepted."""


class DamagedSourceError(SourceFormatError):
    """The source file is truncated, malformed, or over a size limit (a zip bomb in a ``.keras`` file)."""


class UnsafePickleError(SourceFormatError):
    """A pickled source (``.pt``, ``.ckpt``, ``pytorch_model.bin``) needs code to be unpickled: the classes or
    functions it names (``globals``) are not plain tensors and containers. It is refused and never run."""

    def __init__(self, message: str, globals_: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.globals = globals_

class ResumeWarning(UserWarning):
    """A checkpoint could not be used for resuming (it was quarantined) or resuming was partial (an
    item absent, a data loader whose position cannot be restored exactly). A warning, not an error:
    training goes on. Defined here, the lowest layer, so that the adapters can raise it too."""
