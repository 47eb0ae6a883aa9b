"""Incremental checkpoints: arrays whose bytes did not change since a previous checkpoint are not written again.

Every checkpoint directory stays complete. An unchanged array is not written into the item's own file;
instead the file of the previous checkpoint that physically holds it is brought into the new checkpoint
(:meth:`Transaction.link <savegame.storage.base.Transaction.link>`: a hard link locally, where the link
count keeps the data alive for as long as any checkpoint uses it), listed in the new manifest's ``files``
with the hash recorded when it was written, and named in the item's ``linked`` field with the keys it
serves (:class:`~savegame.format.manifest.ItemEntry`). So ``verify``, ``load``, ``export``, the CLI,
retention, quarantine and the mirror see a complete checkpoint, and deleting one checkpoint never deletes
data another one uses. A linked file is always one that holds the bytes itself (the previous checkpoint's
own file or one it linked in turn), so chains never grow, and only one the item still uses at least half
of (:data:`MIN_LINKED_SHARE`), so stale bytes kept alive never outgrow the used ones.

"Unchanged" is decided by content: every array's XXH3-128 over its dtype, shape and bytes
(:func:`~savegame.format.hashing.array_hash`), compared with the hash the previous checkpoint recorded for
the same key (``array_hashes``; recorded by every incremental save). Torch's version counters are not used:
writes through ``.data`` or a NumPy view bypass them. The hashing runs where the write runs (the writer
thread for a background save), never in the training thread of a background save.

Before a file is linked, the previous checkpoint must still be committed with the same manifest entry for
that file, and a local file is verified (size, content hash, header; each linked key with the dtype and
shape the new array has) and the link must be that very file (its inode: a base overwritten between the
check and the link gives another one), so what the new checkpoint refers to is exactly the bytes the new
state holds. A remote file is copied on the server (``RemoteTransaction.link``) without being downloaded: the recorded
hash goes into the new manifest, so ``verify`` or ``load`` of the new checkpoint checks it. That hash is
only the one the new manifest's ``hash_chunk_bytes`` gives if the base hashed in the same chunks or the
file fits in one chunk: other files of a base of format 1 or 2 (whole-file hashes) or of other chunks are
not linked. Where a
file cannot be linked (another filesystem, a storage without links, any ``OSError``) or fails that check,
its arrays are written into the item's own file as in a full save: an incremental save never fails, nor
writes different bytes, because of its base.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from savegame._util.logs import get_logger
from savegame.engine.verifier import manifest_of, open_file
from savegame.engine.write_loop import EncodedItem
from savegame.errors import CheckpointError
from savegame.format.hashing import HASH_CHUNK_BYTES, array_hash
from savegame.format.manifest import FileEntry, ItemEntry, Manifest
from savegame.format.tensorfile import TensorData, TensorFileReader
from savegame.format.tree import ArrayRecord
from savegame.storage.base import Storage, Transaction
from savegame.storage.local import LocalStorage
from savegame.storage.local.read import LocalCheckpointReader

__all__ = ["MAX_LINKED_PER_ITEM", "Base", "Incremental", "Prepared", "prepare"]

log = get_logger("savegame")

MAX_LINKED_PER_ITEM = 8
"""Most previous files one item links; the arrays of any further ones are written again (bounded fan-out)."""
MIN_LINKED_SHARE = 0.5
"""Least share of a previous file's bytes an item must still use for the file to be linked; the unchanged
arrays of a file that is mostly stale (a small frozen layer next to a large head that kept training) are
written again instead, so the files a checkpoint links hold at most as many stale bytes as used ones and
an incremental checkpoint never takes more than twice the room of a full one (linking every holder took
9x the disk of a full save with layers frozen one after another)."""


@dataclass(frozen=True)
class Base:
    """A committed checkpoint that a save may link unchanged arrays from: its storage, name and manifest
    (as read or written when it was committed; checked again against the storage at link time)."""

    storage: Storage
    name: str
    manifest: Manifest


@dataclass(frozen=True)
class Incremental:
    """Write incrementally: record every array's hash and, with a ``base``, link what did not change."""

    base: Base | None = None


@dataclass
class Prepared:
    """What an incremental save writes and records: the items with only their changed arrays, the linked
    files' manifest entries, and every item's manifest entry (with ``linked`` and ``array_hashes``)."""

    items: list[EncodedItem]
    files: dict[str, FileEntry] = field(default_factory=dict)
    entries: dict[str, ItemEntry] = field(default_factory=dict)

    @property
    def linked_bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())


def _holder(prev: ItemEntry, key: str) -> str | None:
    """The file of the previous checkpoint that physically holds ``key`` of item ``prev``."""
    for file, keys in prev.linked.items():
        if key in keys:
            return file
    return prev.file


class _Linker:
    """Links files of the base into the transaction, each at most once, verifying each before use."""

    def __init__(self, txn: Transaction, base: Base, used: set[str]) -> None:
        self.txn = txn
        self.base = base
        self.used = used
        self.linked: dict[str, str] = {}  # base file -> its name in the new checkpoint
        self.readers: dict[str, TensorFileReader] = {}  # verified local base files
        self.identities: dict[str, tuple[int, int]] = {}  # their (st_dev, st_ino): the very files linked
        self.usable: dict[str, bool] = {}  # base files checked: may be linked
        self._current: Manifest | None = None
        self._read = False  # whether _current was read (None then: the base is gone or unreadable)

    def _base_now(self) -> Manifest | None:
        if not self._read:
            self._read = True
            try:
                reader = self.base.storage.reader(self.base.name)
                try:
                    self._current = manifest_of(reader)
                finally:
                    reader.close()
            except (CheckpointError, OSError) as exc:
                log.info("incremental save: base %s is not usable (%s); writing every array", self.base.name, exc)
        return self._current

    def _verified(self, file: str) -> bool:
        """Whether the base still holds ``file`` as recorded; a local one is also opened and verified
        (size, hash, header: :attr:`readers`). A remote one is not downloaded (the point of a server-side
        copy): its hash is carried into the new manifest, so ``verify`` of the new checkpoint checks it."""
        if file in self.usable:
            return self.usable[file]
        reader: TensorFileReader | None = None
        current = self._base_now()
        recorded = self.base.manifest.files.get(file)
        usable = current is not None and recorded is not None and current.files.get(file) == recorded
        if usable and recorded is not None and not _same_hash_rule(self.base.manifest.hash_chunk_bytes, recorded.bytes):
            log.info("incremental save: %s of base %s was hashed in other chunks (%s); writing its arrays again",
                     file, self.base.name, self.base.manifest.hash_chunk_bytes)  # fmt: skip
            usable = False
        if usable and current is not None and not isinstance(self.base.storage, LocalStorage):
            self.usable[file] = True
            return True
        if usable and current is not None:
            try:
                checkpoint = self.base.storage.reader(self.base.name)
                try:
                    reader = open_file(checkpoint, current, file, verify=True)
                    if isinstance(checkpoint, LocalCheckpointReader):
                        st = os.stat(file, dir_fd=checkpoint.dir_fd(), follow_symlinks=False)
                        self.identities[file] = (st.st_dev, st.st_ino)  # in the directory version verified
                finally:
                    checkpoint.close()
            except (CheckpointError, OSError) as exc:
                log.warning("incremental save: %s of base %s failed verification (%s); writing its arrays again",
                            file, self.base.name, exc)  # fmt: skip
        if reader is not None:
            self.readers[file] = reader
        self.usable[file] = reader is not None
        return reader is not None

    def link(self, file: str, stem: str) -> str | None:
        """The name under which the base's ``file`` is in the new checkpoint, linking it now if needed;
        None when it cannot be linked (its arrays are then written)."""
        if file in self.linked:
            return self.linked[file]
        if not self._verified(file):
            return None
        name = _free_name(stem, self.used)
        link = getattr(self.txn, "link", None)  # optional member of the Transaction protocol
        identity = self.identities.get(file)  # local: link only the very file verified
        recorded = self.base.manifest.files[file]
        extra: dict[str, object] = {"identity": identity} if identity is not None else {}
        if not isinstance(self.base.storage, LocalStorage):
            extra = {"expect_hash": recorded.hash}  # remote: copy only from a version listing that hash
        try:
            done = link is not None and bool(link(name, source_checkpoint=self.base.name, source_file=file, **extra))
        except OSError as exc:
            log.info("incremental save: linking %s of %s failed (%s); writing its arrays", file, self.base.name, exc)
            done = False
        if not done:
            self.usable[file] = False  # do not try this file again in this save
            return None
        self.used.add(name)
        self.linked[file] = name
        return name

    def file_bytes(self, file: str) -> int:
        """The size of the base's ``file`` as its manifest records it."""
        return self.base.manifest.files[file].bytes

    def hashes_of(self, prev: ItemEntry) -> dict[str, str]:
        """The array hashes of a base item that recorded none (a base saved without ``incremental``),
        computed from its verified files; empty when one of them is not usable."""
        out: dict[str, str] = {}
        for file in prev.files:
            reader = self.readers.get(file) if self._verified(file) else None
            if reader is None:  # gone, damaged, or remote (not downloaded): nothing to compare with
                return {}
            keys = prev.linked.get(file, reader.tensors.keys() if file == prev.file else ())
            for key in keys:
                info = reader.tensors.get(key)
                if info is not None:
                    out[key] = array_hash(info.code, info.shape, reader.raw(key))
        return out

    def matches(self, file: str, data: TensorData) -> bool:
        """Whether the verified base file holds ``data``'s key with its dtype and shape (for a remote base
        without a downloaded header: what the recorded hash, which covers dtype and shape, says)."""
        reader = self.readers.get(file)
        if reader is None:
            return self.usable.get(file, False)
        info = reader.tensors.get(data.name)
        return info is not None and info.code == data.code and info.shape == data.shape \
            and info.nbytes == len(data.data)  # fmt: skip


def _same_hash_rule(chunk_bytes: int | None, size: int) -> bool:
    """Whether a file of ``size`` bytes whose hash a manifest with ``hash_chunk_bytes = chunk_bytes`` records
    (None: formats 1 and 2, whole files) has that same hash in the manifest this save writes (chunks of
    :data:`~savegame.format.hashing.HASH_CHUNK_BYTES`): the same chunk size, or the file fits in one chunk
    of both (one chunk's hash is the plain hash of the file)."""
    if chunk_bytes == HASH_CHUNK_BYTES:
        return True
    return size <= min(HASH_CHUNK_BYTES, chunk_bytes if chunk_bytes is not None else HASH_CHUNK_BYTES)


def _free_name(stem: str, used: set[str]) -> str:
    n = 1
    while f"{stem}.link{n}.safetensors" in used:
        n += 1
    return f"{stem}.link{n}.safetensors"


def _hashes(item: EncodedItem) -> dict[str, str]:
    return {r.data.name: array_hash(r.data.code, r.data.shape, r.data.data) for r in item.records}


def prepare(txn: Transaction, storage: Storage, items: list[EncodedItem], incremental: Incremental) -> Prepared:
    """Hash every array, link the base's files that hold unchanged ones into ``txn`` (of ``storage``) and
    return what to write (see the module docstring). Runs in the thread that writes the checkpoint. A base
    in another storage root is not linked from (links name their source within the transaction's root)."""
    used = {i.file for i in items if i.file is not None}
    base = incremental.base
    if base is not None and base.storage.root != storage.root:
        log.info("incremental save: base %s is not in %s; writing every array", base.name, storage.root)
        base = None
    linker = _Linker(txn, base, used) if base is not None else None
    prepared = Prepared(items=[])
    for item in items:
        hashes = _hashes(item) if item.file is not None else None
        prev = base.manifest.items.get(item.name) if base is not None else None
        keep = item.records
        linked: dict[str, list[str]] = {}
        if linker is not None and prev is not None and hashes and item.file:
            keep, linked = _link_unchanged(linker, item, prev, hashes)
        prepared.items.append(EncodedItem(item.name, item.kind, item.skeleton, keep, item.file))
        prepared.entries[item.name] = ItemEntry(
            kind=item.kind, file=item.file, skeleton=item.skeleton,
            linked={f: tuple(keys) for f, keys in linked.items()}, array_hashes=hashes,
        )  # fmt: skip
    if linker is not None:
        assert base is not None
        prepared.files = {new: base.manifest.files[old] for old, new in linker.linked.items()}
    return prepared


def _link_unchanged(
    linker: _Linker, item: EncodedItem, prev: ItemEntry, hashes: Mapping[str, str]
) -> tuple[list[ArrayRecord], dict[str, list[str]]]:
    """Split ``item``'s arrays into those to write and those linked (by their new file name)."""
    assert item.file is not None
    recorded = prev.array_hashes if prev.array_hashes is not None else linker.hashes_of(prev)
    groups: dict[str, list[int]] = {}
    for index, record in enumerate(item.records):
        key = record.data.name
        if recorded.get(key) == hashes[key]:
            holder = _holder(prev, key)
            if holder is not None:
                groups.setdefault(holder, []).append(index)
    used = {f: sum(len(item.records[i].data.data) for i in indices) for f, indices in groups.items()}
    worth = [f for f in groups if used[f] >= MIN_LINKED_SHARE * linker.file_bytes(f)]
    by_size = sorted(worth, key=lambda f: -used[f])
    stem = item.file.removesuffix(".safetensors")
    linked_at: set[int] = set()
    linked: dict[str, list[str]] = {}
    for holder in by_size[:MAX_LINKED_PER_ITEM]:
        name = linker.link(holder, stem)
        if name is None:
            continue
        for index in groups[holder]:
            data = item.records[index].data
            if linker.matches(holder, data):
                linked.setdefault(name, []).append(data.name)
                linked_at.add(index)
    keep = [r for i, r in enumerate(item.records) if i not in linked_at]
    return keep, linked
