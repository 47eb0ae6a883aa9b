"""Plain weights files from a checkpoint item: ``.safetensors``, ``.pt``, ``.npz``, ``.weights.h5``.

``savegame export CKPT --item model --to out.safetensors`` (or :func:`export_checkpoint`) writes the
tensors of one item of a checkpoint as a flat ``{name: tensor}`` file other tools read directly. Names
are the item's state paths (``0.weight``, ``encoder.layers.3.bias``: the ``state_dict`` keys of a torch
module; variable paths such as ``sequential/dense/kernel`` for Keras weights). The format follows the
destination's suffix:

* ``.safetensors``: the stored bytes copied exactly (every dtype safetensors has, ``bfloat16`` and
  ``float8`` included); opens with ``safetensors.safe_open`` / ``safetensors.torch.load_file``.
* ``.pt``: PyTorch's own file format holding a flat dict of plain tensors (no other objects), so
  PyTorch opens it in its weights-only mode. Tensors tied in the checkpoint stay tied. Needs torch.
* ``.npz``: NumPy's zip of ``.npy`` files, written with ``allow_pickle=False`` (no object arrays);
  ``bfloat16``/``float8`` arrays, which NumPy cannot describe, are widened to ``float32`` (exactly).
* ``.weights.h5``: Keras's weights file. Its layout follows the *model's* layer structure, which a
  checkpoint does not record, so a built model is required (``--keras-model module:function`` on the
  command line, ``keras_model=`` here): the weights are loaded into it by variable path (with the
  structural fallback of :class:`savegame.adapters.keras.KerasState`) and written with
  ``model.save_weights``. Needs Keras 3.

Names must be unambiguous in the destination, so what a flat file cannot hold is refused with an
:class:`~savegame.InvalidNameError` naming the state paths, before anything is written (never one tensor
silently kept in place of another): two paths that give the same name (``{"a.b": x, "a": {"b": y}}`` both
give ``a.b``), names the format reserves or cannot encode (``__metadata__`` and names over 4,096
characters in ``.safetensors``; a lone surrogate in ``.safetensors`` and ``.npz``), and ``.npz`` member
names that could leave the archive's folder when it is unzipped (absolute, ``..``, ``.`` or empty
components, backslashes, NUL). Rename the key in the state, or export a part with ``item=``.

Values that are not tensors (an optimizer's hyper-parameters, a step counter stored as an int) have no
place in a weights file: they are left out and listed in :attr:`ExportResult.skipped`. Files are
written to a temporary name in the destination directory, fsynced and renamed, so a crash never leaves
half a file under the destination name. The source files are hash-verified before use.
"""

from __future__ import annotations

import os
import sys
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from savegame import api
from savegame.errors import CheckpointError, ConfigError, InvalidManifestError, InvalidNameError
from savegame.format.manifest import Manifest
from savegame.format.tensorfile import (
    TensorData,
    order_for_alignment,
    tensor_name_problem,
    write_tensor_file,
)
from savegame.format.tree import MAX_DEPTH, Decoder, numpy_from_node, too_deep
from savegame.storage import is_url

__all__ = [
    "ARRAY_TAGS",
    "FORMATS",
    "ArrayLeaf",
    "ExportResult",
    "check_unique_names",
    "dtype_name",
    "export_checkpoint",
    "flatten_skeleton",
    "format_for",
    "npz_member",
    "select_item",
    "write_atomic",
]

FORMATS: dict[str, str] = {
    ".safetensors": "safetensors",
    ".pt": "torch",
    ".pth": "torch",
    ".npz": "numpy",
    ".weights.h5": "keras",
}
"""Destination suffix -> format."""

ARRAY_TAGS = ("tensor", "ndarray", "npscalar")

_CODE_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "C64": "complex64",
    "I64": "int64", "U64": "uint64", "F64": "float64", "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
}  # fmt: skip


def dtype_name(code: str, logical: object = None) -> str:
    """The element type's usual name (``float32``, ``bfloat16``, ``complex128``) from a stored code."""
    if isinstance(logical, str):
        return logical
    return _CODE_NAMES.get(code, code)


@dataclass(frozen=True)
class ArrayLeaf:
    """An array of an item's skeleton: its path in the state and its node (``key``, logical dtype...)."""

    path: tuple[str, ...]
    node: dict[str, Any]

    @property
    def key(self) -> str:
        """The tensor file entry holding its bytes."""
        return str(self.node.get("key"))

    @property
    def logical(self) -> str | None:
        """The logical dtype for types stored as views (``complex128``...), else None."""
        value = self.node.get("dtype")
        return value if isinstance(value, str) else None

    def shape(self, stored: Sequence[int]) -> list[int]:
        """The array's shape (the logical one for view types, else the stored one)."""
        logical = self.node.get("shape")
        if self.logical is not None and isinstance(logical, list):
            return [int(d) for d in logical]
        return [int(d) for d in stored]


_TORCH_TAGS: dict[str, Callable[[Any], object]] = {
    "torch.dtype": lambda v: f"torch.{v}",
    "torch.Size": lambda v: tuple(v) if isinstance(v, list) else v,
    "torch.device": lambda v: f"device({v!r})",
}


def decode_value(node: Any) -> Any:
    """A non-array skeleton node as a plain Python value (torch dtypes and devices as strings)."""
    return Decoder(resolve=None, extra_tags=_TORCH_TAGS).decode(node)


def _is_scalar_node(node: Any) -> bool:
    return node is None or isinstance(node, (bool, int, float, str)) or (
        isinstance(node, dict) and node.get("$") in ("int", "float", "bytes")
    )


def flatten_skeleton(node: Any, path: tuple[str, ...] = (), depth: int = 0) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Walk a skeleton: yield ``(path, ArrayLeaf)`` for arrays and ``(path, value)`` for plain leaves.

    Dicts (also with int or tuple keys) and tuples are descended into (key components as ``str``);
    lists of scalars and empty containers are single plain leaves.
    """
    if depth >= MAX_DEPTH:  # the item's name is the first level, as for the encoder and the decoder
        raise InvalidManifestError(too_deep(".".join(path[:20]) + "...", "skeleton"))
    if isinstance(node, list):
        if not node or all(_is_scalar_node(v) for v in node):
            yield path, decode_value(node)
            return
        for i, v in enumerate(node):
            yield from flatten_skeleton(v, (*path, str(i)), depth + 1)
        return
    if isinstance(node, dict):
        tag = node.get("$")
        if tag is None:
            if not node:
                yield path, {}
            for k, v in node.items():
                yield from flatten_skeleton(v, (*path, k), depth + 1)
            return
        if tag in ARRAY_TAGS:
            yield path, ArrayLeaf(path, node)
            return
        if tag == "tuple" and isinstance(node.get("v"), list):
            values = node["v"]
            if not values or all(_is_scalar_node(v) for v in values):
                yield path, decode_value(node)
                return
            for i, v in enumerate(values):
                yield from flatten_skeleton(v, (*path, str(i)), depth + 1)
            return
        if tag in ("dict", "odict") and isinstance(node.get("k"), list) and isinstance(node.get("v"), list):
            if not node["k"]:
                yield path, {}
            for k, v in zip(node["k"], node["v"]):
                yield from flatten_skeleton(v, (*path, str(decode_value(k))), depth + 1)
            return
        yield path, decode_value(node)
        return
    yield path, node


# --------------------------------------------------------------------------------------------------
# Choosing what to export


def select_item(manifest: Manifest, item: str | None) -> tuple[str, tuple[str, ...], Any]:
    """``(item name, sub-path, skeleton node)`` for ``--item`` (default ``model``).

    ``item`` is an item name, or an item name and a path inside it joined by dots (``keras.model``).
    Without ``item``: ``model`` if the checkpoint has it, the weights of a Keras training state
    (``keras.model``), or the only item that has tensors.
    """
    items = manifest.items
    if item is None:
        if "model" in items:
            item = "model"
        elif "keras" in items and isinstance(items["keras"].skeleton, dict) and "model" in items["keras"].skeleton:
            item = "keras.model"
        else:
            with_tensors = [name for name, entry in items.items() if entry.file is not None]
            if len(with_tensors) != 1:
                raise ConfigError(f"which item? the checkpoint has {sorted(items)}; choose one with --item")
            item = with_tensors[0]
    sub: tuple[str, ...] = ()
    if item in items:
        name = item
    else:
        parts = item.split(".")
        for i in range(len(parts) - 1, 0, -1):
            if ".".join(parts[:i]) in items:
                name, sub = ".".join(parts[:i]), tuple(parts[i:])
                break
        else:
            raise ConfigError(f"no item {item!r} in the checkpoint (items: {', '.join(sorted(items))})")
    node = items[name].skeleton
    # A Keras training state (savegame.adapters.keras.KerasState): its weights are the "model" section.
    if not sub and isinstance(node, dict) and node.get("format") == "savegame.keras/1" and "model" in node:
        sub = ("model",)
    for part in sub:
        if not isinstance(node, dict) or part not in node or node.get("$") is not None:
            raise ConfigError(f"no {'.'.join((name, *sub))!r} in the checkpoint's item {name!r}")
        node = node[part]
    return name, sub, node


def format_for(destination: str) -> str:
    """The export format for a destination file name (by suffix); ConfigError if unsupported."""
    lower = destination.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if lower.endswith(suffix):
            return FORMATS[suffix]
    if lower.endswith(".h5"):
        raise ConfigError(f"{destination}: Keras weights files must end in .weights.h5")
    supported = ", ".join(FORMATS)
    raise ConfigError(f"{destination}: unknown export format (the file name must end in {supported})")


# --------------------------------------------------------------------------------------------------
# Writers


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_checkpoint` wrote."""

    path: str
    format: str
    source: str
    item: str
    tensors: int
    bytes: int
    skipped: tuple[str, ...] = ()
    converted: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Array:
    name: str
    leaf: ArrayLeaf
    code: str
    shape: tuple[int, ...]
    raw: np.ndarray


def write_atomic(destination: str, write: Callable[[str], None]) -> int:
    """Write via ``write(temporary path)`` in the same directory, fsync, rename; return the file size."""
    directory = os.path.dirname(destination) or "."
    temporary = os.path.join(directory, f".{uuid.uuid4().hex[:8]}.tmp.{os.path.basename(destination)}")
    try:
        write(temporary)
        fd = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        os.replace(temporary, destination)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return size


class _FileSink:
    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return self.f.write(data)


def check_unique_names(arrays: Sequence[_Array]) -> None:
    """Refuse two arrays that would get the same name in a flat file (one would silently replace the
    other), naming both state paths."""
    seen: dict[str, _Array] = {}
    for a in arrays:
        other = seen.setdefault(a.name, a)
        if other is not a:
            raise InvalidNameError(
                f"{_shown(a.name)}: two tensors of the checkpoint get this name in a flat file, at state paths "
                f"{_shown_path(other.leaf.path)} and {_shown_path(a.leaf.path)} (a dotted key such as 'a.b' next "
                "to a nested 'a' -> 'b'); rename one of the keys in the saved state, or export only a part with "
                "--item (item=)"
            )


def _shown(name: str) -> str:
    """A name for a message: cut to 200 characters, lone surrogates and control characters escaped."""
    return ascii(name[:200]) if not name.isprintable() or not name.isascii() else repr(name[:200])


def _shown_path(path: Sequence[str]) -> str:
    return "[" + ", ".join(_shown(p) for p in path) + "]"


def _check_safetensors_names(arrays: Sequence[_Array]) -> None:
    for a in arrays:
        problem = tensor_name_problem(a.name)
        if problem is not None:
            raise InvalidNameError(
                f"{_shown(a.name)}: cannot be a .safetensors tensor name (it {problem}); rename the key in the "
                "saved state, or export to .pt"
            )


def npz_member(name: str) -> str:
    """The ``.npz`` member name of array ``name`` (``name + ".npy"``), refusing (:class:`InvalidNameError`)
    one that could land outside the folder an unzip tool extracts it to, or that zip cannot encode."""
    escapes = "so unzipping it could write outside the destination folder"
    problem = None
    parts = name.split("/")
    if name.startswith("/"):
        problem = f"is an absolute path, {escapes}"
    elif "\\" in name or "\x00" in name:
        problem = f"holds a backslash or NUL, {escapes}"
    elif any(p in ("", ".", "..") for p in parts):
        problem = f"has an empty, '.' or '..' path component, {escapes}"
    elif len(parts[0]) >= 2 and parts[0][1] == ":":
        problem = f"starts with a drive letter, {escapes}"
    else:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            problem = "holds a lone surrogate, which zip cannot encode"
    if problem is not None:
        raise InvalidNameError(
            f"{_shown(name)}: cannot be an .npz member name (it {problem}); rename the key in the saved "
            "state, or export to .safetensors or .pt"
        )
    return name + ".npy"


def _write_safetensors(path: str, arrays: list[_Array], torch_style: bool) -> list[str]:
    _check_safetensors_names(arrays)
    for a in arrays:
        if a.leaf.logical is not None:
            raise ConfigError(f"{a.name}: dtype {a.leaf.logical} has no safetensors type; export to .npz or .pt")
    tensors = order_for_alignment([TensorData(a.name, a.code, a.shape, _bytes_of(a.raw)) for a in arrays])
    metadata = {"format": "pt"} if torch_style else None
    with open(path, "wb") as f:
        write_tensor_file(_FileSink(f), tensors, metadata=metadata)
    return []


def _bytes_of(raw: np.ndarray) -> memoryview:
    """The bytes of a 1-D uint8 array as a memoryview of format ``B``."""
    return memoryview(raw).cast("B")  # type: ignore[arg-type]


def _bf16_to_f32(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    bits = raw.view("<u2").astype("<u4") << 16
    result: np.ndarray = bits.view("<f4").reshape(shape)
    return result


def _numpy_array(a: _Array) -> tuple[np.ndarray, bool]:
    """(NumPy array, whether it was widened to float32)."""
    where = a.name
    try:
        arr = numpy_from_node(a.leaf.node, a.raw.copy(), a.code, a.shape, where)
    except CheckpointError:
        if a.code == "BF16" and a.leaf.logical is None:
            return _bf16_to_f32(a.raw, a.shape), True
        raise
    arr = np.asarray(arr)
    if arr.dtype.kind == "V" or arr.dtype.name in {"bfloat16"} or arr.dtype.name.startswith("float8"):
        return arr.astype(np.float32), True
    return arr, False


def _write_npz(path: str, arrays: list[_Array]) -> list[str]:
    members = [npz_member(a.name) for a in arrays]  # all checked before the file is begun
    converted = []
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for a, member_name in zip(arrays, members):
            arr, widened = _numpy_array(a)
            if widened:
                converted.append(f"{a.name}: {dtype_name(a.code, a.leaf.logical)} -> float32")
            if arr.dtype.hasobject:
                raise ConfigError(f"{a.name}: object arrays cannot be exported")
            with zf.open(member_name, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.array(arr, order="C", copy=None), allow_pickle=False)
    return converted


def _torch_tensors(arrays: list[_Array]) -> dict[str, Any]:
    from savegame.adapters.torch import tensor_from_bytes

    out: dict[str, Any] = {}
    by_key: dict[str, Any] = {}
    for a in arrays:
        tensor = by_key.get(a.leaf.key)
        if tensor is None:
            try:
                tensor = tensor_from_bytes(a.leaf.node, a.raw.copy(), a.code, a.shape, a.name, "cpu").detach()
            except CheckpointError as exc:
                raise ConfigError(f"{a.name}: cannot be a torch tensor ({exc})") from None
            by_key[a.leaf.key] = tensor
        out[a.name] = tensor
    return out


def _write_torch(path: str, arrays: list[_Array]) -> list[str]:
    try:
        from savegame.adapters.torch import save_pt
    except ImportError:
        raise ConfigError("exporting to .pt needs PyTorch (pip install torch)") from None
    save_pt(path, _torch_tensors(arrays))
    return []


def _write_keras(path: str, arrays: list[_Array], model: Any) -> list[str]:
    from savegame.adapters.keras import STATE_FORMAT, KerasState

    if model is None:
        raise ConfigError(
            "exporting to .weights.h5 needs the Keras model (--keras-model module:function returning the "
            "built model): Keras's weights file follows the model's layer structure, which a checkpoint "
            "does not record"
        )
    weights: dict[str, np.ndarray] = {}
    for a in arrays:
        arr, _ = _numpy_array(a)
        name = "/".join(a.leaf.path) or a.name
        if name in weights:
            raise InvalidNameError(f"{_shown(name)}: two tensors of the checkpoint have this Keras variable path")
        weights[name] = arr
    KerasState(model, include_optimizer=False, include_rng=False).load_state_dict(
        {"format": STATE_FORMAT, "model": weights}, strict=True
    )
    model.save_weights(path)
    return []


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    item: str | None = None,
    keras_model: Any = None,
    overwrite: bool = False,
    verify: bool = True,
) -> ExportResult:
    """Write the tensors of one item of ``checkpoint`` (a checkpoint directory) to ``destination``.

    The format follows ``destination``'s suffix (see the module docstring). ``item``: as for
    :func:`select_item` (default ``model``). ``keras_model``: a built Keras model, needed for
    ``.weights.h5``. ``overwrite``: replace an existing ``destination`` (otherwise ConfigError).
    ``verify``: check the item file's hash first.
    """
    source = os.fspath(checkpoint) if is_url(os.fspath(checkpoint)) else os.path.abspath(os.fspath(checkpoint))
    dest = os.path.abspath(os.fspath(destination))
    fmt = format_for(dest)
    if os.path.isdir(dest):
        raise ConfigError(f"{dest} is a directory; give a file name ending in {', '.join(FORMATS)}")
    if os.path.lexists(dest) and not overwrite:
        raise ConfigError(f"{dest} exists (use --force to replace it)")
    if not os.path.isdir(os.path.dirname(dest)):
        raise ConfigError(f"{os.path.dirname(dest)}: no such directory")
    manifest = api.read_manifest(source)
    name, sub, node = select_item(manifest, item)
    label = ".".join((name, *sub))
    entry = manifest.items[name]
    arrays_leaves: list[ArrayLeaf] = []
    skipped: list[str] = []
    for path, value in flatten_skeleton(node):
        if isinstance(value, ArrayLeaf):
            arrays_leaves.append(value)
        else:
            skipped.append(".".join(path) or label)
    if not arrays_leaves:
        raise ConfigError(f"item {label!r} holds no tensors (items with tensors: "
                          f"{', '.join(n for n, e in manifest.items.items() if e.file) or 'none'})")  # fmt: skip
    reader = api.open_item(source, manifest, name, verify=verify)
    assert reader is not None and entry.file is not None
    arrays: list[_Array] = []
    for leaf in arrays_leaves:
        info = reader.tensors.get(leaf.key)
        if info is None:
            raise InvalidManifestError(f"{label}.{'.'.join(leaf.path)}: array {leaf.key!r} is not in {entry.file}")
        export_name = ".".join(leaf.path) if leaf.path else label
        arrays.append(_Array(export_name, leaf, info.code, info.shape, reader.raw(leaf.key)))
    check_unique_names(arrays)
    torch_style = all(a.leaf.node.get("$") == "tensor" for a in arrays)

    converted: list[str] = []

    def write(path: str) -> None:
        nonlocal converted
        if fmt == "safetensors":
            converted = _write_safetensors(path, arrays, torch_style)
        elif fmt == "numpy":
            converted = _write_npz(path, arrays)
        elif fmt == "torch":
            converted = _write_torch(path, arrays)
        else:
            converted = _write_keras(path, arrays, keras_model)

    size = write_atomic(dest, write)
    return ExportResult(path=dest, format=fmt, source=source, item=label, tensors=len(arrays), bytes=size,
                        skipped=tuple(skipped), converted=tuple(converted))  # fmt: skip


def load_keras_model(spec: str) -> Any:
    """Build a Keras model from ``module:function`` or ``path/to/file.py:function`` (called without
    arguments). The current directory is importable, as with ``python -m``."""
    import importlib
    import importlib.util

    module_name, sep, function = spec.rpartition(":")
    if not sep or not module_name or not function.isidentifier():
        raise ConfigError(f"--keras-model {spec!r}: expected module:function or file.py:function")
    if module_name.endswith(".py"):
        path = os.path.abspath(module_name)
        if not os.path.isfile(path):
            raise ConfigError(f"--keras-model: {path}: no such file")
        module_spec = importlib.util.spec_from_file_location(f"_savegame_keras_model_{uuid.uuid4().hex[:8]}", path)
        if module_spec is None or module_spec.loader is None:
            raise ConfigError(f"--keras-model: cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"--keras-model: cannot import {module_name!r}: {exc}") from None
    build = getattr(module, function, None)
    if not callable(build):
        raise ConfigError(f"--keras-model: {module_name} has no function {function!r}")
    return build()
