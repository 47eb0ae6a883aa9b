"""Import checkpoints written by other tools: :func:`convert` (``savegame import SRC DEST``).

The source format is recognised from the path (see :data:`FORMATS`); one module reads each
(:mod:`.torchfiles` for torch and Lightning pickles, :mod:`.hf` for Hugging Face model directories,
:mod:`.kerasfiles` for Keras files, :mod:`.tensors` for ``.safetensors``, :mod:`.runs` for a run
directory of files). Nothing from a source is ever executed: pickles are disassembled before
``torch.load(weights_only=True)`` reads them (:mod:`.pickled`), Keras configs are parsed as JSON and
never deserialized, archives and structures are read with caps. The result is written with
``savegame.save`` (atomic, durable; ``dest`` must not exist), and an :class:`ImportReport` says what was
found, converted and left out.
"""

from __future__ import annotations

import os
from typing import Any

from savegame import api
from savegame.errors import ConfigError, UnknownSourceFormatError
from savegame.importers.plain import array_stats
from savegame.importers.report import Found, ImportReport, ItemSummary

__all__ = ["FORMATS", "ImportReport", "ItemSummary", "convert", "source_format"]

FORMATS: dict[str, str] = {
    ".pt": "torch", ".pth": "torch", ".bin": "torch", ".ckpt": "torch", ".safetensors": "safetensors",
    ".weights.h5": "keras", ".keras": "keras",
}  # fmt: skip
"""File suffix -> reader (a directory is a Hugging Face model directory, or a run directory with a template)."""


def source_format(src: str, *, template: str | None = None) -> str:
    """The reader for ``src``: ``torch``, ``safetensors``, ``keras``, ``huggingface`` or ``run-directory``."""
    if os.path.isdir(src):
        return "run-directory" if template is not None else "huggingface"
    if not os.path.exists(src):
        raise UnknownSourceFormatError(f"{src}: no such file or directory")
    if template is not None:
        raise ConfigError(f"{src}: a template applies to a directory of checkpoint files, not to one file")
    lower = src.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if lower.endswith(suffix):
            return FORMATS[suffix]
    if lower.endswith(".h5"):
        raise UnknownSourceFormatError(
            f"{src}: a .h5 file that is not a Keras 3 .weights.h5 (legacy Keras 2 HDF5 models are not imported); "
            "rename it if it is a Keras 3 weights file"
        )
    raise UnknownSourceFormatError(
        f"{src}: unknown checkpoint format (the name must end in {', '.join(FORMATS)}, or be a Hugging Face "
        "model directory with config.json)"
    )


def _read(src: str, fmt: str, keras_model: Any) -> Found:
    if keras_model is not None and fmt != "keras":
        raise ConfigError("keras_model applies to Keras files (.weights.h5, .keras) only")
    if fmt == "torch":
        from savegame.importers.torchfiles import read_torch

        return read_torch(src)
    if fmt == "safetensors":
        from savegame.importers.tensors import read_safetensors_file

        return read_safetensors_file(src)
    if fmt == "keras":
        from savegame.importers.kerasfiles import read_keras

        return read_keras(src, keras_model=keras_model)
    from savegame.importers.hf import read_hf_dir

    return read_hf_dir(src)


def convert(
    src: str | os.PathLike[str], dest: str | os.PathLike[str], *, template: str | None = None,
    mode: str = "auto", keras_model: Any = None,
) -> ImportReport:  # fmt: skip
    """Turn the checkpoint ``src`` written by another tool into the savegame checkpoint ``dest``.

    ``src``: a torch file (``.pt``, ``.pth``, ``.bin``), a Lightning ``.ckpt``, a ``.safetensors``
    file, a Keras ``.weights.h5`` or ``.keras`` file, a Hugging Face model directory, or (with
    ``template``) a directory of checkpoint files such as ``model_{epoch:02d}_{val_acc:.3f}.pth``,
    which becomes one run root (``mode``: ``min``, ``max`` or ``auto`` for its first metric).
    ``keras_model``: for Keras files, a built model of the same architecture; the weights are loaded
    into it and stored as its ``KerasState`` (see :mod:`savegame.importers.kerasfiles`).
    ``dest``: a path that does not exist yet (nothing is ever replaced).

    Returns an :class:`ImportReport`. Raises :class:`~savegame.SourceFormatError` subclasses for a source
    that cannot be imported: :class:`~savegame.UnknownSourceFormatError`,
    :class:`~savegame.DamagedSourceError` (truncated, malformed, over a limit),
    :class:`~savegame.UnsafePickleError` (a pickle that needs code; never run).
    """
    src_path, dest_path = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dest))
    if os.path.lexists(dest_path):
        raise ConfigError(f"{dest_path} exists; an import writes a new checkpoint and never replaces anything: "
                          "choose another destination (or remove that one first)")  # fmt: skip
    fmt = source_format(src_path, template=template)
    if fmt == "run-directory":
        from savegame.importers.runs import import_run_directory

        assert template is not None
        return import_run_directory(src_path, dest_path, template=template, mode=mode)
    found = _read(src_path, fmt, keras_model)
    if not found.items:
        raise UnknownSourceFormatError(f"{src_path}: nothing in it can be stored ({'; '.join(found.skipped[:5])})")
    metadata = {"imported_from": src_path, "source_format": found.format, **found.metadata}
    manifest = api.save(dest_path, found.items, metadata=metadata, progress=found.progress or None, overwrite=False)
    summaries = []
    for name, value in found.items.items():
        count, size = array_stats(value)
        summaries.append(ItemSummary(name, found.sources.get(name, name), count, size))
    return ImportReport(source=src_path, dest=dest_path, format=found.format, items=tuple(summaries),
                        checkpoints=(os.path.basename(dest_path),), progress=dict(manifest.progress or {}),
                        converted=tuple(found.converted), skipped=tuple(found.skipped))  # fmt: skip
