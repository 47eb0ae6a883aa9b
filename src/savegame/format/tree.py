"""Nested state <-> (JSON skeleton, named arrays): the exact, pickle-free tree codec.

A state is any nesting of dicts, lists, tuples, scalars, strings, bytes and arrays. Encoding splits it
into a JSON *skeleton* (kept in the manifest) and the arrays (written to a tensor file, referenced from
the skeleton by name). Decoding puts them back together with the same types, keys and bits.

Skeleton nodes (JSON)::

    null / true / false / "str" / 12 / 1.5    themselves (ints up to 2**53, finite floats)
    [ ... ]                                    a list
    {"k": node, ...}                           a dict whose keys are all strings, none of them "$"
    {"$": "dict", "k": [nodes], "v": [nodes]}  any other dict (int, tuple, ... keys)
    {"$": "tuple", "v": [nodes]}
    {"$": "int", "v": "123456789012345678901"} an int beyond 2**53 (decimal string)
    {"$": "float", "bits": "7ff8000000000000"} nan / inf / -inf with their exact bit pattern
    {"$": "bytes", "v": "<base64>"}
    {"$": "odict", "k": [...], "v": [...]}     a collections.OrderedDict
    {"$": "ndarray" | "npscalar" | "tensor", "key": "name", ...}   an array stored in the tensor file
    {"$": "torch.dtype" | "torch.Size" | "torch.device", "v": ...}

Only exact built-in types are accepted (a ``str`` subclass is refused rather than silently turned into
a ``str``); anything else raises :class:`UnsupportedTypeError` naming its path in the state. Live objects
with a ``state_dict()`` (modules, optimizers, :class:`savegame.Stateful`) are captured by
:mod:`savegame.engine.capture` before they get here.

Decoding treats the skeleton as untrusted: unknown tags, wrong shapes of nodes, nesting deeper than
:data:`MAX_DEPTH`, more than :data:`MAX_NODES` nodes or oversized strings raise
:class:`InvalidManifestError`.
"""

from __future__ import annotations

import base64
import math
import re
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from savegame._util.copyqueue import CopyQueue
from savegame.errors import InvalidManifestError, UnsupportedTypeError
from savegame.format.checks import check_tensor_node
from savegame.format.dtypes import NUMPY_VIEW_TYPES, logical_itemsize, logical_numpy_dtype, numpy_code, numpy_dtype
from savegame.format.tensorfile import MAX_DIM, MAX_NAME_CHARS, MAX_NDIM, RESERVED_NAME, TensorData

MAX_DEPTH = 200
"""The one nesting limit of every recursive walk over state or skeletons: saving (the encoder), loading
and verifying (the decoder), export and diff, DCP state and the helpers that look for live objects,
torch values or DTensors. Deeper state is refused at save time, so nothing saved is unreadable."""


def too_deep(where: str, what: str) -> str:
    """The one message for ``what`` (state, skeleton) at ``where`` nested deeper than :data:`MAX_DEPTH`."""
    return f"{where}: {what} nested deeper than {MAX_DEPTH} levels"


def contains(value: object, predicate: Callable[[object], bool], depth: int = 0) -> bool:
    """Whether ``value`` or anything inside its dicts, lists and tuples satisfies ``predicate``.

    The one walk behind "does this state hold a live object / a tensor / a DTensor" questions; it
    looks no deeper than :data:`MAX_DEPTH` (deeper state cannot be saved anyway)."""
    if predicate(value):
        return True
    if depth > MAX_DEPTH:
        return False
    if isinstance(value, Mapping):
        return any(contains(v, predicate, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(contains(v, predicate, depth + 1) for v in value)
    return False

MAX_NODES = 50_000_000
MAX_STRING = 64 * 1024 * 1024
MAX_INT_DIGITS = 4000
MAX_KEY_CHARS = 1024
"""Longest tensor file entry name the encoder writes (well under what readers accept, leaving room for the
``#n`` suffix of duplicates and keeping headers small)."""
assert MAX_KEY_CHARS + 32 <= MAX_NAME_CHARS
_SAFE_INT = 2**53
_BIG_INT = re.compile(r"-?[0-9]+")  # used with fullmatch: ASCII digits only, no "--5", "²" or newline

Path = tuple[object, ...]


def tensor_key(path: Path) -> str:
    """The tensor file entry name for an array at ``path``: its dotted path, made safe for any reader.

    Lone surrogates (which UTF-8 cannot encode) are written as ``\\udc80`` escapes, and a name longer
    than :data:`MAX_KEY_CHARS` is cut to that length, so that every reader (ours with its
    :data:`~savegame.format.tensorfile.MAX_NAME_CHARS` limit, ``safetensors`` itself) accepts the header.
    Uniqueness is the caller's job (:meth:`Encoder.add_array`).
    """
    return safe_key(".".join(map(str, path)) or "_")


def safe_key(name: str) -> str:
    """:func:`tensor_key` of a path already joined with dots (``name`` non-empty)."""
    if not name.isascii():
        name = name.encode("utf-8", "backslashreplace").decode("utf-8")
    return name[:MAX_KEY_CHARS]


def format_path(path: Path) -> str:
    """``("optimizer", "state", 3, "foo")`` -> ``optimizer.state.3.foo``."""
    return ".".join(str(p) for p in path) if path else "<root>"


class Where:
    """A position in a state that is formatted (:func:`format_path`) only when a message uses it.

    Decoding visits every node of a skeleton; building each node's dotted path up front cost more than
    the rest of the decode. ``f"{where}: ..."`` and ``str(where)`` give the formatted path.
    """

    __slots__ = ("path",)

    def __init__(self, path: Path) -> None:
        self.path = path

    def __str__(self) -> str:
        return format_path(self.path)

    def __format__(self, spec: str) -> str:
        return format(format_path(self.path), spec)


class ArrayRecord(NamedTuple):
    """An array found while encoding: the tensor-file entry plus what keeps its memory alive (a named
    tuple: one per array, made while a snapshot's caller waits; see :class:`TensorData`)."""

    data: TensorData
    keepalive: object


ArrayHook = Callable[[object, Path, "Encoder"], "dict[str, Any] | None"]
"""Framework hook: return a skeleton node for ``obj`` (registering its bytes), or None if not ours."""


@dataclass
class Encoder:
    """Walks one item's state, producing its skeleton and the arrays to write.

    ``copy``: snapshot array bytes into fresh host memory (for background saves, so later changes to the
    live tensors cannot change what is written). Otherwise arrays are referenced without copying.
    ``allocate``: where copies go: ``allocate(nbytes, pinned) -> buffer`` (a uint8 NumPy array, or a
    pinned uint8 torch tensor when ``pinned``); reused snapshot buffers in background saves.
    ``allow_arrays``: False for metadata, which must be plain JSON-like data.
    """

    copy: bool = False
    allocate: Callable[[int, bool], Any] | None = None
    needs_sync: bool = False  # set by hooks that started asynchronous device-to-host copies
    allow_arrays: bool = True
    copies: CopyQueue | None = None  # where host copies of a snapshot go (run on a worker; None: inline)
    key_skip: int = 0  # leading path components left out of array keys (the item name)
    array_hooks: list[ArrayHook] = field(default_factory=list)
    records: list[ArrayRecord] = field(default_factory=list)
    _names: set[str] = field(default_factory=set)
    _seen: dict[tuple[object, ...], str] = field(default_factory=dict)
    holds: list[object] = field(default_factory=list)
    """What owns the memory of the identities in the alias table (the arrays, or the dict holding them),
    kept alive until :meth:`finish`: an identity is an address, and a tensor a ``state_dict()`` made on
    the fly and that was freed once copied would leave its address to the next one of the same shape,
    which would then be taken for an alias of it and stored as the first one's bytes. A hook that puts
    an identity in the table (:meth:`reserve_name`, :meth:`note_identities`, :meth:`alias_table`) appends
    its owner here."""
    _unseen: list[tuple[list[tuple[object, ...]], list[str]]] = field(default_factory=list)
    """Identities taken with :meth:`note_identities`, entered into ``_seen`` when it is next read."""
    finishers: list[Callable[[], None]] = field(default_factory=list)
    """Run by :meth:`finish` once the walk is done: hooks that batch work over many arrays (one copy of
    every small tensor of a snapshot) register here and fill in their records' bytes then."""
    hook_state: dict[str, Any] = field(default_factory=dict)
    """Per-walk state of the hooks (e.g. that batch), by a name of the hook's choosing."""
    defer_records: bool = False
    """Let hooks build records later (:meth:`add_records_later`): the caller reads :attr:`deferred` too
    (a background snapshot builds its many small records on the writer thread, not the caller's)."""
    deferred: list[Callable[[], list[ArrayRecord]]] = field(default_factory=list)
    """Builders of records not made yet (only with :attr:`defer_records`); each returns its records."""

    # -- array registration (used by the hooks) ----------------------------------------------------
    def alias_of(self, identity: tuple[object, ...]) -> str | None:
        """The key already stored for an identical view of the same memory (tied weights), if any."""
        if self._unseen:
            self._enter_unseen()
        return self._seen.get(identity)

    def add_array(
        self, path: Path, code: str, shape: tuple[int, ...], data: memoryview, keepalive: object,
        identity: tuple[object, ...] | None = None,
    ) -> str:
        """Register bytes to store under a fresh key derived from ``path``; return the key.

        The key is only a reference from the skeleton to the tensor file (the skeleton keeps the real
        keys), so it is made safe for the file rather than exact: see :func:`tensor_key`. Keys that
        come out equal (``{"a.b": x, "a": {"b": y}}``, or two long keys with a common prefix) get a
        ``#2``, ``#3``... suffix; ``__metadata__`` is reserved by the format, so it always does.
        """
        key = self.reserve_key(path, identity)
        self.records.append(ArrayRecord(TensorData(key, code, shape, data), keepalive))
        return key

    def reserve_key(self, path: Path, identity: tuple[object, ...] | None = None) -> str:
        """The fresh key :meth:`add_array` would give ``path`` (taken now; the hook appends the record
        itself later, e.g. once a batched copy gave it its bytes)."""
        return self.reserve_name(tensor_key(path[self.key_skip :]), identity)

    def reserve_name(self, base: str, identity: tuple[object, ...] | None = None) -> str:
        """:meth:`reserve_key` for a path already turned into its key (:func:`tensor_key`): hooks that
        name many arrays under one prefix join the prefix once."""
        key = base
        n = 1
        while key in self._names or key == RESERVED_NAME:
            n += 1
            key = f"{base}#{n}"
        self._names.add(key)
        if identity is not None:
            if self._unseen:
                self._enter_unseen()
            self._seen[identity] = key
        return key

    def alias_table(self) -> dict[tuple[object, ...], str]:
        """The table behind :meth:`alias_of` (identity -> key), for a hook that names 10,000s of arrays in
        one loop: a dict lookup and store per array instead of two method calls (it must store an
        identity whenever it takes a key for it, as :meth:`reserve_name` does)."""
        if self._unseen:
            self._enter_unseen()
        return self._seen

    def note_identities(self, identities: list[tuple[object, ...]], keys: list[str]) -> None:
        """Record that ``identities[i]`` is stored under ``keys[i]``, as :meth:`reserve_name` does, without
        building the table entries unless the walk asks :meth:`alias_of` (or :meth:`alias_table`) again:
        most items are one module whose walk found no alias among its own tensors (hashing 10,000 identity
        tuples nobody looks up costs as much as the rest of that walk). The caller guarantees that none of
        ``identities`` is in the table yet and that they are distinct; the lists are owned from now on."""
        if identities:
            self._unseen.append((identities, keys))

    def _enter_unseen(self) -> None:
        pending, self._unseen = self._unseen, []
        for identities, keys in pending:
            for identity, key in zip(identities, keys):
                self._seen.setdefault(identity, key)

    def names_free(self, names: Collection[str]) -> bool:
        """Whether :meth:`reserve_name` would give each of ``names`` (distinct) exactly itself: none is
        empty, taken already or the format's reserved name, and each is what :func:`safe_key` makes of it
        (ASCII, at most :data:`MAX_KEY_CHARS`). A hook that checked this for the names of its arrays (one
        set operation) may then use them as they are and :meth:`claim_names` the ones it used, provided
        nothing it reserves in between can take one of them (its other arrays have other names)."""
        if RESERVED_NAME in names or "" in names or not self._names.isdisjoint(names):
            return False
        return "".join(names).isascii() and max(map(len, names), default=0) <= MAX_KEY_CHARS

    def claim_names(self, names: Iterable[str]) -> None:
        """Take ``names`` (checked with :meth:`names_free`) for arrays that use them as they are."""
        self._names.update(names)

    def add_records_later(self, build: Callable[[], list[ArrayRecord]]) -> None:
        """Records whose bytes are already final, built by ``build`` now or, with :attr:`defer_records`,
        when the caller asks (keys must have been reserved already: the skeleton refers to them)."""
        if self.defer_records:
            self.deferred.append(build)
        else:
            self.records += build()

    def host_buffer(self, nbytes: int) -> np.ndarray:
        """A uint8 host buffer of ``nbytes`` for a copy (from the snapshot pool when there is one)."""
        if self.allocate is not None and nbytes > 0:
            buf: np.ndarray = self.allocate(nbytes, False)
            return buf
        return np.empty(nbytes, dtype=np.uint8)

    def host_copy_numpy(self, arr: np.ndarray) -> np.ndarray:
        """A C-contiguous copy of ``arr`` in a host buffer."""
        dest = self.host_buffer(arr.nbytes).view(arr.dtype).reshape(arr.shape)
        np.copyto(dest, arr)
        return dest

    def finish(self) -> None:
        """Complete what the hooks deferred (see :attr:`finishers`); call once after :meth:`encode`,
        before reading :attr:`records`."""
        finishers, self.finishers = self.finishers, []
        try:
            for done in finishers:
                done()
        finally:
            self.hook_state.clear()  # the hooks' objects refer back to the encoder: no cycle left behind
            self.holds.clear()  # the walk is over: no identity is looked up any more

    # -- the walk -------------------------------------------------------------------------------------
    def encode(self, obj: object, path: Path = ()) -> Any:
        if len(path) > MAX_DEPTH:
            raise UnsupportedTypeError(too_deep(f"{format_path(path[:20])}...", "state"))
        t = type(obj)
        if obj is None or t is bool or t is str:
            return obj
        if t is int:
            assert isinstance(obj, int)
            if -_SAFE_INT < obj < _SAFE_INT:
                return obj
            return {"$": "int", "v": str(obj)}
        if t is float:
            assert isinstance(obj, float)
            if math.isfinite(obj):
                return obj
            return {"$": "float", "bits": struct.pack(">d", obj).hex()}
        if t is list:
            assert isinstance(obj, list)
            return [self.encode(v, (*path, i)) for i, v in enumerate(obj)]
        if t is tuple:
            assert isinstance(obj, tuple)
            return {"$": "tuple", "v": [self.encode(v, (*path, i)) for i, v in enumerate(obj)]}
        if t is dict or t is OrderedDict:
            assert isinstance(obj, dict)
            return self._encode_dict(obj, path, ordered=t is OrderedDict)
        if t is bytes:
            assert isinstance(obj, bytes)
            return {"$": "bytes", "v": base64.b64encode(obj).decode("ascii")}
        if isinstance(obj, (np.ndarray, np.generic)):
            return self._encode_numpy(obj, path)
        for hook in self.array_hooks:
            node = hook(obj, path, self)
            if node is not None:
                return node
        raise UnsupportedTypeError(f"{format_path(path)}: cannot store {t!r}")

    def _encode_dict(self, obj: dict[Any, Any], path: Path, *, ordered: bool) -> Any:
        if not ordered and all(type(k) is str for k in obj) and "$" not in obj:
            return {k: self.encode(v, (*path, k)) for k, v in obj.items()}
        keys = []
        for k in obj:
            if type(k) not in (str, int, bool, float, tuple, bytes) and k is not None:
                raise UnsupportedTypeError(f"{format_path(path)}: cannot store dict key of {type(k)!r}")
            keys.append(self.encode(k, (*path, "<key>")))
        values = [self.encode(v, (*path, k)) for k, v in obj.items()]
        return {"$": "odict" if ordered else "dict", "k": keys, "v": values}

    def _encode_numpy(self, obj: np.ndarray | np.generic, path: Path) -> Any:
        if not self.allow_arrays:
            raise UnsupportedTypeError(f"{format_path(path)}: arrays are not allowed here (metadata is JSON-like)")
        if isinstance(obj, np.ndarray) and type(obj) is not np.ndarray and not isinstance(obj, np.memmap):
            # a MaskedArray would come back without its mask, an np.matrix as an ndarray: refused, as other
            # subclasses are. (An np.memmap is plain data: it comes back as an ndarray with the same bytes.)
            raise UnsupportedTypeError(
                f"{format_path(path)}: cannot store {type(obj)!r} (a subclass of numpy.ndarray: what it adds, "
                "such as a mask, would be lost); store np.asarray(x) and what else it holds (x.mask) explicitly"
            )
        arr = np.asarray(obj)
        try:
            code, logical = numpy_code(arr.dtype)
        except KeyError:
            raise UnsupportedTypeError(
                f"{format_path(path)}: cannot store numpy dtype {arr.dtype!s} (object, string, structured and "
                "extended-precision arrays have no exact pickle-free form)"
            ) from None
        node: dict[str, Any] = {"$": "npscalar" if isinstance(obj, np.generic) else "ndarray"}
        identity = None
        if isinstance(obj, np.ndarray) and obj.size > 0:
            identity = ("np", obj.__array_interface__["data"][0], obj.shape, obj.strides, obj.dtype.str)
            alias = self.alias_of(identity)
            if alias is not None:
                node["key"] = alias
                return _numpy_node_extras(node, arr, logical)
            self.holds.append(obj)  # its address stays its own while the walk may look it up
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        elif self.copy or not arr.flags.c_contiguous:
            arr = self.host_copy_numpy(arr)
        trailing = NUMPY_VIEW_TYPES[logical].trailing if logical is not None else 1
        shape = arr.shape if trailing == 1 else (*arr.shape, trailing)
        flat = arr.reshape(-1).view(np.uint8) if arr.size else np.empty(0, np.uint8)
        data = memoryview(flat).cast("B")  # type: ignore[arg-type]
        node["key"] = self.add_array(path, code, tuple(shape), data, arr, identity)
        return _numpy_node_extras(node, np.asarray(obj), logical)


def _numpy_node_extras(node: dict[str, Any], arr: np.ndarray, logical: str | None) -> dict[str, Any]:
    if logical is not None:
        node["dtype"] = logical
        node["shape"] = list(arr.shape)
    if arr.dtype.byteorder == ">":
        node["byteorder"] = ">"
    return node


# ---------------------------------------------------------------------------------------------------
# Decoding


_SCALARS = frozenset({type(None), bool, int, float})
"""Leaf types of a skeleton returned as they are."""

ArrayResolver = Callable[[dict[str, Any], Path], object]
"""Builds the array for a ``tensor``/``ndarray``/``npscalar`` node (the reader supplies it)."""


@dataclass
class Decoder:
    """Rebuilds a state from an untrusted skeleton; arrays come from ``resolve``."""

    resolve: ArrayResolver | None
    extra_tags: dict[str, Callable[[Any], object]] = field(default_factory=dict)
    _count: int = 0

    def decode(self, node: Any, path: Path = ()) -> Any:
        self._count += 1
        if self._count > MAX_NODES:
            raise InvalidManifestError(f"skeleton has more than {MAX_NODES} nodes")
        if len(path) > MAX_DEPTH:
            raise InvalidManifestError(too_deep(f"{format_path(path[:20])}...", "skeleton"))
        t = type(node)
        if t is dict and "$" in node:  # the most common node passed here (leaves mostly take _plain_leaf)
            tag = node["$"]
            if (tag == "tensor" or tag == "ndarray") and self.resolve is not None and type(node.get("key")) is str:
                return self.resolve(node, path)  # an array with a valid key: what _decode_tagged would do
            return self._decode_tagged(tag, node, path)
        if node is None or t is bool or t is int or t is float:
            return node
        if t is str:
            if len(node) > MAX_STRING:
                raise InvalidManifestError(f"{format_path(path)}: string longer than {MAX_STRING}")
            return node
        if t is list:
            leaves_ok = len(path) < MAX_DEPTH  # children are one level deeper
            items: list[Any] = []
            for i, v in enumerate(node):
                if leaves_ok and self._plain_leaf(v):
                    items.append(v)
                else:
                    items.append(self.decode(v, (*path, i)))
            return items
        if t is not dict:
            raise InvalidManifestError(f"{format_path(path)}: unexpected skeleton node {t.__name__}")
        leaves_ok = len(path) < MAX_DEPTH  # a plain dict (tagged ones were handled above)
        out = {}
        for k, v in node.items():
            if len(k) > MAX_STRING:
                raise InvalidManifestError(f"{format_path(path)}: dict key longer than {MAX_STRING}")
            out[k] = v if leaves_ok and self._plain_leaf(v) else self.decode(v, (*path, k))
        return out

    def _plain_leaf(self, v: object) -> bool:
        """Whether child ``v`` is a leaf :meth:`decode` would return as it is (None, bool, int, float, a
        string within :data:`MAX_STRING`), counted as decode counts it; False for anything else (and
        for a node past :data:`MAX_NODES`), which the caller passes to :meth:`decode`. Saves the path
        tuple and the call per leaf; the depth check stays with the caller."""
        t = type(v)
        if (t in _SCALARS or (t is str and len(v) <= MAX_STRING)) and self._count < MAX_NODES:  # type: ignore[arg-type]
            self._count += 1
            return True
        return False

    def _decode_tagged(self, tag: object, node: dict[str, Any], path: Path) -> Any:
        if tag == "tensor" or tag == "ndarray" or tag == "npscalar":  # the most common tagged nodes first
            if self.resolve is None:
                raise InvalidManifestError(f"{Where(path)}: arrays are not allowed here")
            if type(node.get("key")) is not str:
                _field(node, "key", str, Where(path))  # raises, naming the field
            return self.resolve(node, path)
        where = Where(path)
        if tag == "tuple":
            return tuple(self.decode(v, (*path, i)) for i, v in enumerate(_field(node, "v", list, where)))
        if tag in ("dict", "odict"):
            keys = _field(node, "k", list, where)
            values = _field(node, "v", list, where)
            if len(keys) != len(values):
                raise InvalidManifestError(f"{where}: dict node with {len(keys)} keys and {len(values)} values")
            out: dict[Any, Any] = OrderedDict() if tag == "odict" else {}
            leaves_ok = len(path) < MAX_DEPTH  # keys and values are one level deeper
            for k, v in zip(keys, values):
                key = k if leaves_ok and self._plain_leaf(k) else self.decode(k, (*path, "<key>"))
                try:
                    out[key] = v if leaves_ok and self._plain_leaf(v) else self.decode(v, (*path, key))
                except TypeError:
                    raise InvalidManifestError(f"{where}: unhashable dict key") from None
            return out
        if tag == "int":
            digits = _field(node, "v", str, where)
            if len(digits) > MAX_INT_DIGITS or not _BIG_INT.fullmatch(digits):
                raise InvalidManifestError(f"{where}: invalid big int {digits[:40]!r}")
            return int(digits)
        if tag == "float":
            bits = _field(node, "bits", str, where)
            try:
                raw = bytes.fromhex(bits)
            except ValueError:
                raw = b""
            if len(raw) != 8:
                raise InvalidManifestError(f"{where}: invalid float bits {bits[:40]!r}")
            return struct.unpack(">d", raw)[0]
        if tag == "bytes":
            data = _field(node, "v", str, where)
            if len(data) > MAX_STRING:
                raise InvalidManifestError(f"{where}: bytes longer than {MAX_STRING}")
            try:
                return base64.b64decode(data, validate=True)
            except ValueError:
                raise InvalidManifestError(f"{where}: invalid base64 bytes") from None
        if isinstance(tag, str) and tag in self.extra_tags:
            try:
                return self.extra_tags[tag](node.get("v"))
            except InvalidManifestError as exc:
                raise InvalidManifestError(f"{where}: {exc}") from None
        raise InvalidManifestError(f"{where}: unknown skeleton tag {str(tag)[:40]!r}")


def _field(node: dict[str, Any], name: str, kind: type, where: str | Where) -> Any:
    value = node.get(name)
    if type(value) is not kind:
        raise InvalidManifestError(f"{where}: skeleton node field {name!r} must be {kind.__name__}")
    return value


def check_array_node(
    node: Mapping[str, Any], *, nbytes: int, shape: Sequence[int], where: str | Where
) -> tuple[int, ...]:
    """The one rule for an array node of a skeleton against its tensor's header entry (``nbytes`` stored
    bytes of header ``shape``); returns the shape the value has.

    A logical dtype must be known (NumPy view types; for ``tensor`` nodes torch's too) and its logical
    shape valid and exactly as large as the stored bytes; a NumPy scalar has shape ``()``; a ``tensor``
    node's own fields are valid (:func:`savegame.format.checks.check_tensor_node`). The verifier asks it
    without building the array, the decoders (:func:`numpy_from_node`, ``adapters.torch.tensor_from_bytes``)
    before they build it: one rule, so ``verify``, ``load`` and the CLI agree on every forged node."""
    tag = node["$"]
    logical = node.get("dtype")
    if logical is not None:
        itemsize = logical_itemsize(logical, tensor=tag == "tensor")
        if itemsize is None:
            raise InvalidManifestError(f"{where}: unknown logical dtype {str(logical)[:40]!r}")
        lshape = node.get("shape")
        if not valid_shape(lshape, itemsize):
            raise InvalidManifestError(f"{where}: invalid logical shape {str(lshape)[:100]}")
        assert isinstance(lshape, list)
        if math.prod(lshape) * itemsize != nbytes:
            raise InvalidManifestError(
                f"{where}: logical shape {lshape} x {logical} does not match the stored {nbytes} bytes"
            )
        shape = lshape
    if tag == "npscalar" and len(shape) != 0:
        raise InvalidManifestError(f"{where}: a numpy scalar must have shape (), not {list(shape)[:8]}")
    if tag == "tensor":
        check_tensor_node(node, where)
    return tuple(shape)


def numpy_from_node(
    node: dict[str, Any], raw: np.ndarray, code: str, shape: tuple[int, ...], where: str | Where
) -> Any:
    """Build the NumPy value of an array node from its stored bytes (checked by :func:`check_array_node`)."""
    logical = node.get("dtype")
    if logical is not None and logical not in NUMPY_VIEW_TYPES:  # not a NumPy view type (a torch-only one)
        raise InvalidManifestError(f"{where}: unknown logical dtype {str(logical)[:40]!r}")
    shape = check_array_node(node, nbytes=raw.size, shape=shape, where=where)
    dtype = logical_numpy_dtype(logical) if logical is not None else numpy_dtype(code)
    arr = raw.view(dtype).reshape(shape)
    if node.get("byteorder") == ">":
        arr = arr.astype(arr.dtype.newbyteorder(">"))
    return arr[()] if node["$"] == "npscalar" else arr


def valid_shape(shape: object, itemsize: int) -> bool:
    """Whether ``shape`` (untrusted JSON) is a list of at most :data:`MAX_NDIM` non-negative ints whose
    size in bytes fits an array, counting only the non-zero dimensions (an empty array with a giant
    dimension is refused by NumPy)."""
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM:
        return False
    if not all(type(d) is int and 0 <= d < MAX_DIM for d in shape):
        return False
    return bool(math.prod(d for d in shape if d) * itemsize <= MAX_DIM)


def iter_array_nodes(node: Any, depth: int = 0) -> Iterator[dict[str, Any]]:
    """Every array-reference node of a skeleton (for inspection and validation)."""
    if depth > MAX_DEPTH:
        return
    if isinstance(node, list):
        for v in node:
            yield from iter_array_nodes(v, depth + 1)
    elif isinstance(node, dict):
        if node.get("$") in ("ndarray", "npscalar", "tensor"):
            yield node
            return
        for v in node.values():
            yield from iter_array_nodes(v, depth + 1)


def encode_plain(obj: object, what: str) -> Any:
    """Encode JSON-like data (no arrays), e.g. user metadata; errors are prefixed with ``what``."""
    try:
        return Encoder(allow_arrays=False).encode(obj)
    except UnsupportedTypeError as exc:
        raise UnsupportedTypeError(f"{what}: {exc}") from None


def decode_plain(node: Any) -> Any:
    return Decoder(resolve=None).decode(node)


sys.setrecursionlimit(max(sys.getrecursionlimit(), 4 * MAX_DEPTH + 1000))
