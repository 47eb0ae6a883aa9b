"""Turning the array nodes of one item's skeleton into tensors or arrays, read from the item's tensor file.

What :func:`savegame.api.decode_opened` hands the tree decoder: each key is built once (the same node
again gives the same object, so tied weights come back tied), views of the file's buffer where the load
may share it, aligned copies elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from savegame.adapters.registry import ZeroCopy
from savegame.errors import InvalidManifestError
from savegame.format.tensorfile import TensorFileReader, TensorInfo
from savegame.format.tree import Path, Where, format_path, numpy_from_node

__all__ = ["REBUILD_SLACK", "ItemDecoder"]

REBUILD_SLACK = 64 << 20
"""Bytes of arrays built a second time for one key, beyond the item's stored bytes, that a load allows."""


class ItemDecoder:
    """Resolves array nodes of one item against its tensor file; identical keys give the same object."""

    def __init__(
        self, reader: TensorFileReader | None, item: str, *, map_location: Any, as_numpy: bool, zero_copy: ZeroCopy
    ) -> None:
        self.reader = reader
        self.tensors = reader.tensors if reader is not None else {}
        self.item = item
        self.map_location = map_location
        self.as_numpy = as_numpy
        self.zero_copy = zero_copy
        self.cache: dict[tuple[str, str], object] = {}
        self.first_nodes: dict[tuple[str, str], dict[str, Any]] = {}
        """The node each cached array was built for: a later node of the same key with other fields (a
        Parameter's ``param`` flag, another device) is an alias in memory, not the same object."""
        self.rebuilt_bytes = 0
        """Bytes of arrays built again for a key already built (a node of it with other fields): bounded by
        :meth:`_count_rebuild`, so a forged manifest naming one tensor many times cannot make a load
        allocate without bound."""
        self.stored_bytes: int | None = None  # the item's tensor bytes, counted at the first rebuild
        self.make_tensor: Callable[..., object] | None = None
        self.plain_tensor: Callable[[Any, str, tuple[int, ...]], object] | None = None
        if not as_numpy:
            from savegame.adapters.torch import plain_tensor, tensor_from_bytes

            self.make_tensor = tensor_from_bytes
            if map_location is None:  # nodes of just a tag and a key: the adapter's shortcut
                self.plain_tensor = plain_tensor

    def __call__(self, node: dict[str, Any], path: Path) -> object:
        tag, key = node["$"], node["key"]
        cached = self.cache.get((tag, key))
        if cached is not None:
            first = self.first_nodes[(tag, key)]
            if node is first or node == first:
                return cached
            if tag == "tensor" and self.make_tensor is not None and _same_but_grad(node, first):
                from savegame.adapters.torch import grad_variant

                return grad_variant(cached, node)  # e.g. a Parameter and a detached tensor of it: one memory
        info = self.tensors.get(key)
        if info is None or self.reader is None:
            raise InvalidManifestError(f"{format_path(path)}: array {key!r} is not in the item's tensor file")
        if cached is not None:
            self._count_rebuild(key, info.nbytes, path)
        raw = self.reader.raw(key)
        zero_copy = self.zero_copy
        if zero_copy is not True and not (zero_copy == "aligned" and self._may_share(key, info)):
            raw = _aligned_copy(raw, torch_memory=tag == "tensor" and not self.as_numpy)
        value: object = None
        if tag == "tensor" and self.plain_tensor is not None and len(node) == 2:  # {"$": "tensor", "key": key}
            value = self.plain_tensor(raw, info.code, info.shape)
        if value is None:
            value = self._build(node, tag, raw, info, path)
        if cached is None:
            self.cache[(tag, key)] = value
            self.first_nodes[(tag, key)] = node
        return value

    def _count_rebuild(self, key: str, nbytes: int, path: Path) -> None:
        """InvalidManifestError once arrays built a second time (or more) for a key add up to more than
        the item's stored bytes plus :data:`REBUILD_SLACK`: savegame writes another node of one key only
        for another view of it (a byte order, a device), never many."""
        self.rebuilt_bytes += nbytes
        if self.stored_bytes is None:
            self.stored_bytes = sum(t.nbytes for t in self.tensors.values())
        stored = self.stored_bytes
        if self.rebuilt_bytes > stored + REBUILD_SLACK:
            raise InvalidManifestError(
                f"{format_path(path)}: array {key!r} is built again from nodes with other fields, past "
                f"{stored + REBUILD_SLACK} bytes for an item of {stored} stored bytes: the manifest is forged or "
                "damaged (it would make this load allocate far more than the checkpoint holds)"
            )

    def _may_share(self, key: str, info: TensorInfo) -> bool:
        """Whether an ``"aligned"`` load may return a view of the file's buffer for tensor ``key``: it starts
        64-byte aligned, or it is a single value (0-d, e.g. an optimizer's ``step``) aligned to its own size,
        where no kernel splits the work differently by alignment."""
        assert self.reader is not None
        if self.reader.aligned(key):
            return True
        return not info.shape and info.nbytes > 0 and self.reader.aligned(key, info.nbytes)

    def _build(self, node: dict[str, Any], tag: str, raw: Any, info: TensorInfo, path: Path) -> object:
        """The array of ``node`` with every check of its fields (the torch adapter's or NumPy's decoder)."""
        if tag == "tensor" and self.make_tensor is not None:
            return self.make_tensor(node, raw, info.code, info.shape, Where(path), self.map_location)
        return numpy_from_node(node, raw, info.code, info.shape, Where(path))


_GRAD_FIELDS = ("param", "requires_grad")


def _same_but_grad(node: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    """Whether two array nodes differ in nothing but whether they are a Parameter and require grad."""
    keys = (node.keys() | other.keys()) - set(_GRAD_FIELDS)
    return all(node.get(k) == other.get(k) for k in keys)


def _aligned_copy(raw: Any, *, torch_memory: bool) -> Any:
    """Copy mapped bytes into freshly allocated memory.

    Views of the file mapping are only aligned to their element size; vectorised kernels (dot products,
    reductions) can round differently on memory with another alignment, which would break bit-exact
    resume. Fresh allocations have the alignment the framework's own tensors have (64 bytes in torch).
    """
    if torch_memory:
        from savegame.adapters.torch import fresh_bytes

        dest = fresh_bytes(raw.size)
    else:
        import numpy as np

        dest = np.empty(raw.size, dtype=np.uint8)
    dest[...] = raw
    return dest
