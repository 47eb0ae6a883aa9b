"""PyTorch: tensors in and out of tensor files, and modules / optimizers restored in place.

Imported only when torch is already imported by the user (``sys.modules``), so the core never pays for
torch. Tensors of every dtype safetensors has a code for are stored under that code; ``complex128``,
``complex32`` and ``float8_e8m0fnu`` are stored as views (see :mod:`savegame.format.dtypes`). Not storable:
quantized tensors, sub-byte types (``uint1``..``uint7``, ``int1``..``int7``), sparse / nested / meta
tensors and tensor subclasses other than ``nn.Parameter`` (DTensor is handled by the distributed module).

Modules and optimizers are restored in place by :mod:`savegame.adapters.torch_restore`, and modules are
read from their live tensors by :mod:`savegame.adapters.torch_modules` (the restore side is
re-exported here).
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from savegame._util.logs import warn
from savegame.adapters.torch_restore import _PLAIN_TENSORS
from savegame.adapters.torch_restore import ModuleReport as ModuleReport  # re-exported: the restore side moved
from savegame.adapters.torch_restore import restore_module as restore_module
from savegame.adapters.torch_restore import restore_optimizer as restore_optimizer
from savegame.errors import ConfigError, InvalidManifestError, UnsupportedTypeError
from savegame.format.checks import check_device, check_size
from savegame.format.tensorfile import TensorData
from savegame.format.tree import (
    ArrayRecord,
    Encoder,
    Path,
    Where,
    check_array_node,
    format_path,
)  # fmt: skip

# torch dtype -> (stored code, logical name or None, trailing dimension)
_CODES: dict[torch.dtype, tuple[str, str | None, int]] = {
    torch.float64: ("F64", None, 1),
    torch.float32: ("F32", None, 1),
    torch.float16: ("F16", None, 1),
    torch.bfloat16: ("BF16", None, 1),
    torch.int64: ("I64", None, 1),
    torch.int32: ("I32", None, 1),
    torch.int16: ("I16", None, 1),
    torch.int8: ("I8", None, 1),
    torch.uint8: ("U8", None, 1),
    torch.bool: ("BOOL", None, 1),
    torch.complex64: ("C64", None, 1),
    torch.complex128: ("F64", "complex128", 2),
    torch.complex32: ("F16", "complex32", 2),
}
for _name, _code in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
):
    if hasattr(torch, _name):
        _CODES[getattr(torch, _name)] = (_code, None, 1)
if hasattr(torch, "float8_e8m0fnu"):
    _CODES[torch.float8_e8m0fnu] = ("U8", "float8_e8m0fnu", 1)

_FROM_CODE: dict[str, torch.dtype] = {code: dt for dt, (code, logical, _) in _CODES.items() if logical is None}
_FROM_LOGICAL: dict[str, torch.dtype] = {
    logical: dt for dt, (_, logical, _) in _CODES.items() if logical is not None
}

_ITEMSIZE: dict[torch.dtype, int] = {dt: int(getattr(dt, "itemsize", 0)) for dt in _CODES}

_NUMPY_SAME: dict[str, np.dtype[Any]] = {} if sys.byteorder != "little" else {
    code: np.dtype(name)
    for code, name in (
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("C64", "complex64"), ("I64", "int64"),
        ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"),
    )
}
"""Codes whose NumPy dtype ``torch.from_numpy`` maps to the same torch dtype: their tensors are built with
NumPy views (a fraction of the cost of torch's ``view``/``reshape`` calls, which add up over 10,000s of
small tensors)."""
_NUMPY_SAME_DTYPE: dict[torch.dtype, np.dtype[Any]] = {
    _FROM_CODE[code]: dt for code, dt in _NUMPY_SAME.items() if code in _FROM_CODE
}

_DTYPES: dict[str, torch.dtype] = {
    name: value for name in dir(torch) if isinstance(value := getattr(torch, name, None), torch.dtype)
}
"""Every dtype this torch has, by the name :func:`dtype_name` stores (``float32``, ``int64``, ...)."""

MapLocation = (
    str | torch.device | Mapping[str, str] | Callable[[torch.Tensor, str], torch.Tensor] | None
)


def dtype_name(dtype: torch.dtype) -> str:
    """The name a ``torch.dtype`` is stored under (``float32``): the ``v`` of a ``torch.dtype`` node and
    the ``dtype`` of a DCP tensor record."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(value: object, where: str = "") -> torch.dtype:
    """The one decoder of a stored torch dtype name (skeleton tags, DCP records): a lookup in this
    torch's fixed table of dtypes, never a ``getattr`` of file data; :class:`InvalidManifestError`
    naming ``where`` for anything else. (Without torch, :func:`savegame.format.checks.check_dtype_name`
    checks the form only.)"""
    result = _DTYPES.get(value) if isinstance(value, str) else None
    if result is None:
        prefix = f"{where}: " if where else ""
        raise InvalidManifestError(f"{prefix}unknown torch dtype {str(value)[:40]!r}")
    return result




_NUMPY_VIEWABLE = frozenset(
    {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
     torch.bool}
)
"""Dtypes whose ``Tensor.numpy()`` exports a plain single-character buffer format (a cheap byte view)."""


def encode_hook(obj: object, path: Path, enc: Encoder) -> dict[str, Any] | None:
    """Tree-codec hook: skeleton nodes for tensors, dtypes, sizes and devices."""
    if not isinstance(obj, torch.Tensor):
        if isinstance(obj, torch.dtype):
            return {"$": "torch.dtype", "v": dtype_name(obj)}
        if type(obj) is torch.Size:
            return {"$": "torch.Size", "v": [int(d) for d in obj]}
        if isinstance(obj, torch.device):
            return {"$": "torch.device", "v": str(obj)}
        return None
    if not enc.allow_arrays:
        raise UnsupportedTypeError(f"{format_path(path)}: tensors are not allowed here (metadata is JSON-like)")
    cls = type(obj)
    if cls not in _PLAIN_TENSORS:
        raise UnsupportedTypeError(
            f"{format_path(path)}: cannot store tensor subclass {cls!r} (use its local or full tensor)"
        )
    if obj.layout != torch.strided or obj.is_nested:
        raise UnsupportedTypeError(
            f"{format_path(path)}: cannot store a {obj.layout} tensor (convert it to dense first)"
        )
    device = obj.device
    device_type = device.type
    if device_type == "meta":
        raise UnsupportedTypeError(f"{format_path(path)}: cannot store a meta tensor (it has no data)")
    dtype = obj.dtype
    spec = _CODES.get(dtype)
    if spec is None:
        raise UnsupportedTypeError(
            f"{format_path(path)}: cannot store dtype {dtype} (quantized and sub-byte types)"
        )
    code, logical, trailing = spec
    node: dict[str, Any] = {"$": "tensor"}
    shape = tuple(obj.shape)
    if logical is not None:
        node["dtype"] = logical
        node["shape"] = list(shape)
    if cls is torch.nn.Parameter:
        node["param"] = True
        node["requires_grad"] = bool(obj.requires_grad)
    elif obj.requires_grad:
        node["requires_grad"] = True
    if device_type != "cpu":
        node["device"] = str(device)
    if obj.is_neg() or (dtype.is_complex and obj.is_conj()):
        # a lazy negative or conjugate view (x.conj(), x.conj().imag): its bytes are not its values, and it has
        # the address, shape and strides of x, so as it is it would pass for an alias of x; its values are stored
        obj = obj.detach().resolve_conj().resolve_neg()
    identity = None
    numel = obj.numel()
    if numel > 0:
        # the first element's address names the storage and offset in one call (the dtype is in the key);
        # contiguous views of the same shape at the same address hold the same bytes whatever the strides
        # of their size-1 dimensions (and is_contiguous() costs a third of stride())
        identity = ("torch", obj.data_ptr(), shape, None if obj.is_contiguous() else obj.stride(), dtype, device)
        alias = enc.alias_of(identity)
        if alias is not None:
            node["key"] = alias
            return node
        enc.holds.append(obj)  # its address stays its own while the walk may look it up (Encoder.holds)
        nbytes = numel * dtype.itemsize
        if enc.copy and nbytes <= SMALL_TENSOR_BYTES and device_type == "cpu" and dtype in _BATCHABLE:
            stored = shape if trailing == 1 else (*shape, trailing)
            node["key"] = _small_copies(enc).add(obj, nbytes, path, code, stored, identity)
            return node
    src = obj.detach()
    t, raw = _host_tensor(src, enc)
    if numel == 0:
        data = memoryview(b"")
    elif raw is not None:  # a snapshot buffer: its bytes are the tensor's
        data = memoryview(raw)  # type: ignore[arg-type]
    elif dtype in _NUMPY_VIEWABLE:
        data = memoryview(t.numpy()).cast("B")  # type: ignore[arg-type]
    else:
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]
    node["key"] = enc.add_array(path, code, shape if trailing == 1 else (*shape, trailing), data, t, identity)
    return node


SMALL_TENSOR_BYTES = 64 << 10
"""CPU tensors up to this size are copied together in a snapshot (:class:`_SmallCopies`)."""
_SMALL_BATCH_BYTES = 16 << 20
"""A batch of small tensors is copied once it holds this many bytes (bounds the buffers' size)."""
_BATCHABLE = frozenset(d for d in _CODES if not d.is_complex)
"""Dtypes copied in batches: complex tensors may carry lazy conjugate/negative bits, which must be
resolved first; they keep the per-tensor path."""
_SMALL_SPECS: dict[torch.dtype, tuple[str, str | None]] = {
    d: (code, logical) for d, (code, logical, trailing) in _CODES.items() if d in _BATCHABLE and trailing == 1
}
"""Stored code and logical name of each batchable dtype (stored with the tensor's own shape)."""


def _small_copies(enc: Encoder) -> _SmallCopies:
    """The encoder's batch of small tensors, created (and registered to be finished) on first use."""
    batch = enc.hook_state.get("torch.small")
    if batch is None:
        batch = enc.hook_state["torch.small"] = _SmallCopies(enc)
        enc.finishers.append(batch.flush)
    assert isinstance(batch, _SmallCopies)
    return batch


class _SmallCopies:
    """The small CPU tensors of one snapshot, copied with one C++ call per dtype and shape instead of a
    buffer, three views and a ``copy_`` each (which cost several times the copy itself for 4 KB tensors).

    ``add`` takes a tensor's key at once (name, alias); ``flush`` (when a batch is full, and from
    :meth:`Encoder.finish`) stacks the batch (one ``torch.stack`` of tensors of the same dtype and shape:
    models and their optimizer states repeat a few shapes) into one snapshot buffer (reused by the next
    save of the same sizes, as every snapshot buffer is) and records each entry with its slice.
    In a background save the copies run on the snapshot worker while the walk goes on (``torch.stack``
    releases the GIL), and the save call returns only once they are done (:meth:`CopyQueue.wait
    <savegame._util.copyqueue.CopyQueue.wait>`), so later changes to the live tensors cannot reach the
    snapshot; without a copy queue they run at once. Building the records (one per tensor, over bytes
    already final) may wait for the writer thread (:meth:`Encoder.add_records_later`).
    """

    def __init__(self, enc: Encoder) -> None:
        self._enc = enc
        self._pending: dict[tuple[torch.dtype, tuple[int, ...]], _Batch] = {}

    def add(
        self, t: torch.Tensor, nbytes: int, path: Path, code: str, shape: tuple[int, ...],
        identity: tuple[object, ...],
    ) -> str:  # fmt: skip
        """Take ``t`` (``nbytes`` of data, CPU, a batchable dtype) into its dtype's batch; return its key."""
        key = self._enc.reserve_key(path, identity)
        self.take(t, key, code, shape, nbytes)
        return key

    def take(self, t: torch.Tensor, key: str, code: str, shape: tuple[int, ...], nbytes: int) -> None:
        """:meth:`add` under a key already reserved (:meth:`Encoder.reserve_name`)."""
        group = (t.dtype, shape)
        batch = self._pending.get(group)
        if batch is None:
            batch = self._pending[group] = _Batch(code, nbytes)
        batch.tensors.append(t)
        batch.keys.append(key)
        batch.left -= 1
        if not batch.left:
            self._copy(group)

    def batch(self, group: tuple[torch.dtype, tuple[int, ...]], code: str, size: int) -> _Batch:
        """The pending batch of ``group`` (dtype, stored shape), opened if there is none: the caller appends
        a tensor and its key, counts ``left`` down and calls :meth:`copy` at 0 (what :meth:`take` does)."""
        batch = self._pending.get(group)
        if batch is None:
            batch = self._pending[group] = _Batch(code, size)
        return batch

    def copy(self, group: tuple[torch.dtype, tuple[int, ...]]) -> None:
        """Copy the full batch of ``group`` now (see :meth:`batch`)."""
        self._copy(group)

    def flush(self) -> None:
        """Copy every batch not full yet, on this thread: the walk is over, so the caller would only wait
        for the worker (which may still be copying full batches meanwhile)."""
        for group in list(self._pending):
            self._copy(group, here=True)

    def _copy(self, group: tuple[torch.dtype, tuple[int, ...]], *, here: bool = False) -> None:
        dtype, shape = group
        batch = self._pending.pop(group)
        count, size, code = len(batch.keys), batch.size, batch.code
        buf = self._enc.host_buffer(count * size)  # reused by the next snapshot (BufferPool)
        out = _buffer_tensor(buf, dtype, (count, *shape))
        copies = self._enc.copies
        if copies is None or here:
            _stack(batch.tensors, out)
        else:  # on the snapshot worker while the walk goes on (the save call returns after it: CopyQueue.wait)
            copies.run(functools.partial(_stack, batch.tensors, out))
        keys = batch.keys

        def records() -> list[ArrayRecord]:  # the bytes are final: building them may wait (add_records_later)
            view = memoryview(buf)  # type: ignore[arg-type]
            return [
                ArrayRecord(TensorData(key, code, shape, view[i * size : (i + 1) * size]), buf)
                for i, key in enumerate(keys)
            ]

        self._enc.add_records_later(records)


def _buffer_tensor(buf: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The uint8 snapshot buffer ``buf`` as a tensor of ``dtype`` and ``shape`` (no copy).

    Always a normal tensor, also when the save is called inside ``torch.inference_mode``: the snapshot
    worker (a thread of its own, never in inference mode) writes into it, and torch refuses an in-place
    write to an inference tensor outside inference mode."""
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            return _buffer_tensor(buf, dtype, shape)
    same = _NUMPY_SAME_DTYPE.get(dtype)
    if same is not None:  # NumPy views cost a fraction of torch's view/reshape calls
        return torch.from_numpy(buf.view(same).reshape(shape))
    return torch.from_numpy(buf).view(dtype).reshape(shape)


def _stack(tensors: list[torch.Tensor], out: torch.Tensor) -> None:
    """Copy ``tensors`` (one dtype and shape) into the rows of ``out``: one C++ call for the group, strided
    or not, every tensor in row-major order, bit for bit (a copy within one dtype converts nothing)."""
    with torch.no_grad():  # (grad mode is per thread: set here, where the copy runs)
        torch.stack(tensors, out=out)


class _Batch:
    """One dtype and shape's small tensors waiting for their copy: their code and size (the same for all:
    the dtype and shape are the batch's) and parallel lists, no object per tensor."""

    __slots__ = ("code", "keys", "left", "size", "tensors")

    def __init__(self, code: str, size: int) -> None:
        self.code = code
        self.size = size
        self.left = max(1, -(-_SMALL_BATCH_BYTES // size))  # tensors until the batch holds its bound's bytes
        self.tensors: list[torch.Tensor] = []
        self.keys: list[str] = []




def _host_tensor(t: torch.Tensor, enc: Encoder) -> tuple[torch.Tensor, np.ndarray | None]:
    """A contiguous CPU tensor with ``t``'s values: ``t`` itself when no copy is needed (sync save of a
    contiguous CPU tensor), else a copy into a snapshot buffer (pinned + non-blocking from CUDA). The
    second value is the snapshot's uint8 host buffer when the copy went into one (its bytes, no view)."""
    on_cpu = t.device.type == "cpu"
    if on_cpu and not enc.copy and t.is_contiguous():
        return t, None
    nbytes = t.numel() * t.element_size()
    if nbytes == 0:
        return torch.empty(t.shape, dtype=t.dtype), None
    if not on_cpu and t.device.type == "cuda" and enc.allocate is not None:
        pinned: torch.Tensor = enc.allocate(nbytes, True)
        dest = pinned.view(t.dtype).reshape(t.shape)
        dest.copy_(t, non_blocking=True)
        enc.needs_sync = True
        return dest, None
    if not on_cpu:
        return t.to("cpu").contiguous(), None
    buf = enc.host_buffer(nbytes)
    dest = _buffer_tensor(buf, t.dtype, t.shape)
    if enc.copies is not None:
        enc.copies.add(dest, t, nbytes)  # copied on the snapshot worker while the walk goes on
    else:
        dest.copy_(t)
    return dest, buf


def decode_tags() -> dict[str, Callable[[Any], object]]:
    """Skeleton tags for torch values that are not tensors (one table, built on first use: every
    decode of an item asks for it)."""
    global _DECODE_TAGS
    if _DECODE_TAGS is None:
        _DECODE_TAGS = _make_decode_tags()
    return _DECODE_TAGS


_DECODE_TAGS: dict[str, Callable[[Any], object]] | None = None


def _make_decode_tags() -> dict[str, Callable[[Any], object]]:

    def dtype(v: Any) -> torch.dtype:
        return dtype_from_name(v)

    def size(v: Any) -> torch.Size:
        return torch.Size(check_size(v))

    def device(v: Any) -> torch.device:
        try:
            return torch.device(check_device(v))
        except RuntimeError:
            raise InvalidManifestError(f"invalid torch.device {v!r}") from None

    return {"torch.dtype": dtype, "torch.Size": size, "torch.device": device}


def plain_tensor(raw: np.ndarray, code: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """What :func:`tensor_from_bytes` builds for a ``tensor`` node with no field but its tag and key (a
    CPU tensor of a stored dtype NumPy shares, without flags) loaded without ``map_location``, skipping
    the checks of the fields such a node does not have; None when it is not that simple case (another
    dtype, read-only bytes, bytes that do not hold ``shape``): the caller then asks tensor_from_bytes."""
    same = _NUMPY_SAME.get(code)
    if same is None or not raw.flags.writeable:
        return None
    try:
        return torch.from_numpy(raw.view(same).reshape(shape))
    except ValueError:  # tensor_from_bytes names the problem
        return None


def grad_variant(tensor: object, node: Mapping[str, Any]) -> object:
    """``tensor``'s memory as the node says it was saved: a Parameter (``param``) or a plain tensor, with
    its ``requires_grad`` (what two views of one memory with other flags, ``p`` and ``p.detach()``, load as)."""
    if not isinstance(tensor, torch.Tensor):
        return tensor
    return _with_grad_flags(tensor.detach(), node, "a tensor")


def _with_grad_flags(tensor: torch.Tensor, node: Mapping[str, Any], where: str | Where) -> torch.Tensor:
    """``tensor`` as a Parameter when the node says ``param``, requiring grad as it says. Only floating
    point and complex tensors can require grad: a node that says an integer one does is forged or
    damaged (InvalidManifestError, not torch's bare RuntimeError)."""
    param = bool(node.get("param"))
    wants_grad = bool(node.get("requires_grad", param))
    if wants_grad and not (tensor.is_floating_point() or tensor.is_complex()):
        raise InvalidManifestError(
            f"{where}: a tensor of dtype {str(tensor.dtype).removeprefix('torch.')} cannot require gradients, but its "
            "manifest entry says it does (param/requires_grad): the manifest is damaged or forged"
        )
    if param:
        return torch.nn.Parameter(tensor, requires_grad=wants_grad)
    if wants_grad:
        tensor.requires_grad_(True)
    return tensor


def tensor_from_bytes(
    node: Mapping[str, Any], raw: np.ndarray, code: str, shape: tuple[int, ...], where: str | Where,
    map_location: MapLocation,
) -> torch.Tensor:
    """Build the tensor of a ``tensor`` node from its stored bytes (a uint8 view, not copied), once the
    node passed the one rule for array nodes (:func:`savegame.format.tree.check_array_node`)."""
    shape = check_array_node(node, nbytes=raw.size, shape=shape, where=where)
    logical = node.get("dtype")
    same = _NUMPY_SAME.get(code) if logical is None else None
    if same is not None and raw.flags.writeable:
        try:
            tensor = torch.from_numpy(raw.view(same).reshape(shape))
        except ValueError:  # the bytes do not hold that shape (readers check this; callers may not)
            raise InvalidManifestError(f"{where}: shape {list(shape)} x {code} does not match its bytes") from None
    else:
        tensor = _tensor_from_raw(node, raw, code, shape, where)
    saved_device = node.get("device")
    if saved_device is not None or map_location is not None:  # else: a CPU tensor staying on the CPU
        tensor = _place(tensor, saved_device, map_location, where)
    if "param" in node or "requires_grad" in node:
        return _with_grad_flags(tensor, node, where)
    return tensor


def _tensor_from_raw(
    node: Mapping[str, Any], raw: np.ndarray, code: str, shape: tuple[int, ...], where: str | Where
) -> torch.Tensor:
    """The general case of :func:`tensor_from_bytes`: logical dtypes (stored as another code), dtypes NumPy
    lacks (bfloat16, float8), read-only buffers."""
    logical = node.get("dtype")
    dtype = _FROM_LOGICAL.get(logical) if isinstance(logical, str) else _FROM_CODE.get(code)
    if dtype is None:
        raise InvalidManifestError(f"{where}: dtype {str(logical or code)[:40]} is not available in this torch")
    target_shape = shape  # the logical shape when there is one (check_array_node)
    if not raw.size:
        base = torch.empty(0, dtype=torch.uint8)
    elif raw.flags.writeable:
        base = torch.from_numpy(raw)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffers (verify=False paths) are fine
            base = torch.from_numpy(raw)
    return base.view(dtype).reshape(target_shape)


def _place(tensor: torch.Tensor, saved: object, map_location: MapLocation, where: str | Where) -> torch.Tensor:
    """``tensor`` (saved on ``saved``) where ``map_location`` says; ConfigError naming the tensor for a
    device this machine lacks, the ``meta`` device (no data) or a callable that fails or returns something
    else than a tensor of the same shape."""
    saved_device = saved if isinstance(saved, str) else "cpu"
    if map_location is None:
        if saved_device == "cpu":
            return tensor
        try:
            return tensor.to(saved_device)
        except (RuntimeError, AssertionError) as exc:
            warn(
                f"tensor was saved on {saved_device}, which is not available here ({exc}); loading it on the "
                "CPU (pass map_location to choose)",
                stacklevel=4,
            )
            return tensor
    if callable(map_location):
        return _placed_by(map_location, tensor, saved_device, where)
    dest = map_location.get(saved_device, saved_device) if isinstance(map_location, Mapping) else map_location
    try:
        dest_device = torch.device(dest)
        if dest_device.type == "meta":
            raise ConfigError(f"{where}: map_location={map_location!r} places it on the 'meta' device, which holds "
                              "no data; pass a real device, e.g. map_location='cpu'")  # fmt: skip
        return tensor if dest_device.type == "cpu" else tensor.to(dest_device)
    except (RuntimeError, AssertionError, TypeError) as exc:  # a bad device string, no CUDA build, no such GPU
        raise ConfigError(
            f"map_location={map_location!r}: cannot place a tensor saved on {saved_device} on {dest!r} here "
            f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}); pass a device this machine "
            "has, e.g. map_location='cpu'"
        ) from exc


def unwritable_reason(tensor: object) -> str | None:
    """Why ``tensor.copy_(value)`` would fail or load nothing, or None: a meta tensor (no data), an inference
    tensor outside inference mode, a tensor whose elements share memory (``expand``, ``as_strided``)."""
    if not isinstance(tensor, torch.Tensor):
        return None
    if tensor.device.type == "meta":
        return "it is on the 'meta' device, which holds no data (materialise it first, e.g. module.to_empty())"
    if tensor.is_inference() and not torch.is_inference_mode_enabled():
        return "it is an inference tensor (made under torch.inference_mode()); pass a normal tensor"
    if torch._debug_has_internal_overlap(tensor) == 1:  # MemOverlap.Yes
        return "its elements share memory (an expand()ed or as_strided view); pass a tensor of its own (.clone())"
    return None


def _placed_by(place: Callable[..., Any], tensor: torch.Tensor, saved_device: str, where: str | Where) -> torch.Tensor:
    """What a ``map_location`` callable makes of ``tensor``: it must return a tensor of the same shape
    (any device, any dtype) holding data; anything else, or an exception, is a ConfigError naming the tensor."""
    try:
        placed = place(tensor, saved_device)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"{where}: the map_location callable failed for a tensor saved on {saved_device} "
            f"({type(exc).__name__}: {str(exc)[:200]}); it is called as map_location(tensor, saved_device)"
        ) from exc
    if not isinstance(placed, torch.Tensor) or placed.shape != tensor.shape or placed.device.type == "meta":
        got = f"a tensor of shape {list(placed.shape)} on {placed.device}" if isinstance(placed, torch.Tensor) \
            else type(placed).__name__  # fmt: skip
        raise ConfigError(
            f"{where}: the map_location callable returned {got} for a tensor of shape {list(tensor.shape)} "
            f"saved on {saved_device}; it must return that tensor on a device with data (e.g. tensor.to(device))"
        )
    return placed


# --------------------------------------------------------------------------------------------------
# torch memory and files, for the core (which asks here instead of importing torch itself)


def fresh_bytes(nbytes: int) -> np.ndarray:
    """``nbytes`` of freshly allocated torch memory as a uint8 NumPy array (torch's own alignment, 64
    bytes: what a loaded tensor must sit on for bit-exact kernels, see :mod:`savegame.engine.item_decoder`)."""
    out: np.ndarray = torch.empty(nbytes, dtype=torch.uint8).numpy()
    return out


def pinned_bytes(nbytes: int) -> torch.Tensor:
    """``nbytes`` of page-locked host memory (the snapshot buffers of a CUDA background save)."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def synchronize_cuda() -> None:
    """Wait for the non-blocking device-to-host copies of a snapshot."""
    torch.cuda.synchronize()


def save_pt(path: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``tensors`` as a ``.pt`` file (``torch.save`` of a dict of tensors: loads with
    ``weights_only=True``)."""
    with open(path, "wb") as f:
        torch.save(dict(tensors), f)
