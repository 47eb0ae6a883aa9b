"""The functional API: ``save``, ``load``, ``verify``, ``read_manifest``.

``save`` captures the state (live objects -> nested state), encodes each top-level item into a skeleton
and its arrays, streams the arrays into one safetensors file per item inside a storage transaction, and
commits with the manifest last. ``load`` reads the manifest, checks every file it touches (size, hash,
header) and rebuilds the state, or restores it into live objects in place.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from typing import Any

from .capture import LoadReport, restore
from .errors import (
    CheckpointNotFoundError,
    HashMismatchError,
    InvalidManifestError,
    MissingFileError,
    NotACheckpointError,
    StateMismatchError,
    TruncatedFileError,
)
from .manifest import Manifest, parse_manifest
from .storage.base import MANIFEST, STAGING_PREFIX
from .storage.local import LocalStorage, check_checkpoint_name
from .tensorfile import TensorFileReader
from .tree import Decoder, Path, format_path, numpy_from_node
from .writer import EncodedItem, encode_state, save_in_background, save_now, write_items

__all__ = ["EncodedItem", "encode_state", "load", "read_manifest", "save", "verify", "write_items"]

PathLike = str | os.PathLike[str]
_SAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


# ---------------------------------------------------------------------------------------------------
# Save (the write path lives in writer.py and background.py)


def save(
    path: PathLike,
    state: Mapping[str, Any],
    *,
    metadata: Mapping[str, Any] | None = None,
    progress: Mapping[str, Any] | None = None,
    overwrite: bool = True,
    background: bool = False,
) -> Any:
    """Save ``state`` as the checkpoint directory ``path``, atomically and durably.

    ``state`` maps item names to live objects (``nn.Module``, optimizers, schedulers, ``GradScaler``,
    :class:`savegame.RNGState`, generators, any :class:`savegame.Stateful`) or plain nested data (dicts,
    lists, tuples, numbers, strings, bytes, NumPy arrays, torch tensors). Each item with arrays becomes one
    safetensors file; the rest lives in the manifest.

    ``metadata``: JSON-like data stored in the manifest (``read_manifest(path).metadata``).
    ``progress``: JSON-like training progress (epoch, step, metrics...), used by the Checkpointer.
    ``overwrite``: replace an existing checkpoint at ``path`` (atomically: the old one stays complete until
    the new one is committed); with False an existing ``path`` raises :class:`CommitError`.
    ``background``: return as soon as the state is copied to host memory and write it in a background
    thread; returns a :class:`~savegame.background.PendingSave` whose ``result()`` waits for the commit
    and returns the manifest (or raises :class:`BackgroundSaveError`). At most one background save is in
    flight: the next one first waits for it.

    Returns the :class:`Manifest` (sync). When a sync ``save`` returns (or a background save's
    ``result()`` does), the checkpoint is on stable storage (files, manifest and the directory entry
    were fsynced) and a power loss cannot take it back. If it fails, nothing new is visible at ``path``
    and whatever was there before is unchanged.
    """
    full = os.path.abspath(os.fspath(path))
    root, name = os.path.split(full.rstrip(os.sep))
    check_checkpoint_name(name)
    storage = LocalStorage(root)
    if background:
        from .background import default_writer

        return save_in_background(
            default_writer(), storage, name, state, metadata=metadata, progress=progress, overwrite=overwrite
        )
    _, manifest = save_now(storage, name, state, metadata=metadata, progress=progress, overwrite=overwrite)
    return manifest


# ---------------------------------------------------------------------------------------------------
# Read


def _checkpoint_dir(path: PathLike) -> str:
    full = os.path.abspath(os.fspath(path))
    if not os.path.lexists(full):
        raise CheckpointNotFoundError(f"{full}: no such checkpoint")
    if not os.path.isdir(full):
        raise NotACheckpointError(f"{full}: not a directory (a savegame checkpoint is a directory)")
    if os.path.basename(full).startswith(STAGING_PREFIX):
        raise NotACheckpointError(f"{full}: an unfinished save (staging directory), not a checkpoint")
    if not os.path.isfile(os.path.join(full, MANIFEST)):
        raise NotACheckpointError(f"{full}: no {MANIFEST}, so not a committed savegame checkpoint")
    return full


def read_manifest(path: PathLike) -> Manifest:
    """Read and validate a checkpoint's manifest (no tensor data is read)."""
    full = _checkpoint_dir(path)
    where = os.path.join(full, MANIFEST)
    with open(where, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        from .manifest import MAX_MANIFEST_BYTES

        if size > MAX_MANIFEST_BYTES:
            raise InvalidManifestError(f"{where}: manifest of {size} bytes exceeds {MAX_MANIFEST_BYTES}")
        data = f.read()
    return parse_manifest(data, where)


def open_file(directory: str, manifest: Manifest, file: str, *, verify: bool) -> TensorFileReader:
    """Open a data file of a checkpoint: exists, exact size, hash (if ``verify``), valid header."""
    entry = manifest.files[file]
    where = os.path.join(directory, file)
    if os.path.islink(where) or not os.path.isfile(where):
        raise MissingFileError(f"{where}: listed in the manifest but missing (or not a regular file)")
    size = os.path.getsize(where)
    if size != entry.bytes:
        raise TruncatedFileError(f"{where}: {size} bytes, the manifest says {entry.bytes}")
    if verify:
        from .hashing import new_hasher

        hasher = new_hasher()
        with open(where, "rb") as f:
            while chunk := f.read(16 << 20):
                hasher.update(chunk)
        if hasher.hexdigest() != entry.hash:
            raise HashMismatchError(f"{where}: content hash differs from the manifest (file is corrupted)")
    return TensorFileReader(where)


class _ItemDecoder:
    """Resolves array nodes of one item against its tensor file; identical keys give the same object."""

    def __init__(
        self, reader: TensorFileReader | None, item: str, *, map_location: Any, as_numpy: bool, zero_copy: bool
    ) -> None:
        self.reader = reader
        self.item = item
        self.map_location = map_location
        self.as_numpy = as_numpy
        self.zero_copy = zero_copy
        self.cache: dict[tuple[str, str], object] = {}

    def __call__(self, node: dict[str, Any], path: Path) -> object:
        where = format_path(path)
        key = node["key"]
        cached = self.cache.get((node["$"], key))
        if cached is not None:
            return cached
        if self.reader is None or key not in self.reader.tensors:
            raise InvalidManifestError(f"{where}: array {key!r} is not in the item's tensor file")
        info = self.reader.tensors[key]
        raw = self.reader.raw(key)
        if not self.zero_copy:
            raw = _aligned_copy(raw, torch_memory=node["$"] == "tensor" and not self.as_numpy)
        value: object
        if node["$"] == "tensor" and not self.as_numpy:
            from .adapters.torch import tensor_from_bytes

            value = tensor_from_bytes(node, raw, info.code, info.shape, where, self.map_location)
        else:
            value = numpy_from_node(node, raw, info.code, info.shape, where)
        self.cache[(node["$"], key)] = value
        return value


def _aligned_copy(raw: Any, *, torch_memory: bool) -> Any:
    """Copy mapped bytes into freshly allocated memory.

    Views of the file mapping are only aligned to their element size; vectorised kernels (dot products,
    reductions) can round differently on memory with another alignment, which would break bit-exact
    resume. Fresh allocations have the alignment the framework's own tensors have (64 bytes in torch).
    """
    if torch_memory:
        import torch

        dest = torch.empty(raw.size, dtype=torch.uint8).numpy()
    else:
        import numpy as np

        dest = np.empty(raw.size, dtype=np.uint8)
    dest[...] = raw
    return dest


def _torch_available() -> bool:
    if "torch" in sys.modules:
        return True
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def decode_item(
    directory: str, manifest: Manifest, name: str, *, verify: bool, map_location: Any = None,
    as_numpy: bool | None = None, zero_copy: bool = False,
) -> Any:
    """Read one item of a checkpoint back into nested state."""
    entry = manifest.items[name]
    reader = open_file(directory, manifest, entry.file, verify=verify) if entry.file else None
    has_tensors = _has_torch_node(entry.skeleton, 0)
    numpy_only = as_numpy if as_numpy is not None else not (has_tensors and _torch_available())
    tags = {}
    if not numpy_only:
        from .adapters.torch import decode_tags

        tags = decode_tags()
    resolver = _ItemDecoder(reader, name, map_location=map_location, as_numpy=numpy_only, zero_copy=zero_copy)
    decoder = Decoder(resolve=resolver, extra_tags=tags)
    return decoder.decode(entry.skeleton, (name,))


def _is_module(obj: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _has_torch_node(node: Any, depth: int) -> bool:
    """Whether a skeleton holds torch values (tensors, dtypes, sizes, devices)."""
    if depth > 300:
        return False
    if isinstance(node, list):
        return any(_has_torch_node(v, depth + 1) for v in node)
    if isinstance(node, dict):
        tag = node.get("$")
        if tag == "tensor" or (isinstance(tag, str) and tag.startswith("torch.")):
            return True
        return any(_has_torch_node(v, depth + 1) for v in node.values())
    return False


def load(
    path: PathLike,
    target: Mapping[str, Any] | None = None,
    *,
    map_location: Any = None,
    strict: bool = True,
    verify: bool = True,
) -> Any:
    """Load a checkpoint.

    Without ``target``: return the nested state, ``{item: value}``. Tensors saved from torch come back as
    torch tensors when torch is installed (NumPy arrays otherwise), in freshly allocated memory that does
    not depend on the files.

    With ``target`` (a dict of live objects with the same item names, e.g. ``{"model": model,
    "optimizer": opt}``): restore each in place and return a :class:`LoadReport`; items of the checkpoint
    not in ``target`` are returned in ``report.state`` only if they hold no arrays (epoch, loss, ...) and
    are otherwise not read at all.

    ``map_location``: like ``torch.load``: a device (``"cpu"``, ``"cuda:1"``), a dict from saved to new
    device, or ``fn(tensor, saved_device) -> tensor``. ``None`` puts tensors back on the device they were
    saved from when it exists (CPU otherwise, with a warning).
    ``strict``: refuse to load into a target when keys are missing, unexpected or shaped differently
    (:class:`StateMismatchError`, raised before anything is changed); ``strict=False`` loads what matches
    and lists the rest in the report.
    ``verify``: check each file's content hash before using it (XXH3, ~20 GB/s).
    """
    directory = _checkpoint_dir(path)
    manifest = read_manifest(directory)
    if target is None:
        return {
            name: decode_item(directory, manifest, name, verify=verify, map_location=map_location)
            for name in manifest.items
        }
    if not isinstance(target, Mapping):
        raise StateMismatchError(f"target must be a dict of live objects, not {type(target).__name__}")
    report = LoadReport(manifest=manifest)
    absent = [k for k in target if k not in manifest.items]
    if absent:
        if strict:
            raise StateMismatchError(
                f"{directory}: items {absent} are not in the checkpoint (it has {list(manifest.items)}); "
                "pass strict=False to load the rest",
            )
        report.missing_keys += absent
    for name in manifest.items:
        if name in target:
            # Modules copy into their own parameters, so they can read straight from the file mapping.
            direct = _is_module(target[name])
            value = decode_item(
                directory, manifest, name, verify=verify, map_location=map_location, zero_copy=direct
            )
            restore(target[name], value, strict=strict, path=(name,), report=report)
        elif manifest.items[name].file is None:
            report.state[name] = decode_item(directory, manifest, name, verify=verify)
    if strict and not report.clean:
        raise StateMismatchError(f"{directory}: state does not match the target: {report}", report)
    return report


def verify(path: PathLike) -> Manifest:
    """Check a checkpoint completely: manifest, every file's size and hash, headers, and references.

    Returns the manifest if everything is intact; raises a :class:`CorruptCheckpointError` subclass naming
    the first problem otherwise. Detects any single flipped byte in any file of the checkpoint.
    """
    directory = _checkpoint_dir(path)
    manifest = read_manifest(directory)
    readers = {file: open_file(directory, manifest, file, verify=True) for file in manifest.files}
    for name, entry in manifest.items.items():
        reader = readers.get(entry.file) if entry.file else None
        _check_references(entry.skeleton, reader, name)
    return manifest


def _check_references(skeleton: Any, reader: TensorFileReader | None, name: str) -> None:
    from .tree import iter_array_nodes

    for node in iter_array_nodes(skeleton):
        key = node.get("key")
        if not isinstance(key, str) or reader is None or key not in reader.tensors:
            raise InvalidManifestError(f"{name}: array {str(key)[:80]!r} is not in the item's tensor file")
    Decoder(resolve=lambda node, path: None, extra_tags=_any_tags()).decode(skeleton, (name,))


def _any_tags() -> dict[str, Any]:
    return {"torch.dtype": lambda v: v, "torch.Size": lambda v: v, "torch.device": lambda v: v}
