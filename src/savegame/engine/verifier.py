"""The one verifier: what "this checkpoint is intact" means, checked in one place.

A checkpoint is intact when its manifest parses (and its format-2+ ``manifest_hash`` matches), and
for every data file the manifest lists: the file exists with exactly the recorded size, its content
hash (chunked, as the manifest's ``hash_chunk_bytes`` says) matches, its safetensors header parses,
and every array node of the items stored in it names one of its tensors and agrees with that header
(:func:`check_array_node`); the skeletons decode with their torch values and item kinds checked
(:mod:`savegame.format.checks`).

Who uses it: :func:`savegame.verify` and :func:`savegame.load` (through :func:`open_file`, which is
the per-file check; ``load`` does not call :func:`check_item`: it makes the same node checks while it
builds each array, in :func:`savegame.format.tree.numpy_from_node` and the torch adapter), the Checkpointer's
resume (:func:`verify_files` for the files ``load`` does not read, so every file is hashed once),
``savegame verify`` and ``savegame ls --verify`` (:func:`verify_checkpoint` with a progress
callback), and the :class:`~savegame.engine.mirror.Mirror` (:func:`verify_checkpoint` on a local candidate;
:func:`copy_checked` when it copies a file to or from the remote side). Everything here works on an
opened :class:`~savegame.storage.base.CheckpointReader`; :mod:`savegame.api` opens paths, URLs and
refs and calls in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from savegame._util.gcpause import gc_paused
from savegame.adapters import framework_decode_tags
from savegame.errors import HashMismatchError, InvalidManifestError, MissingFileError, TruncatedFileError
from savegame.format.checks import check_item_value, tag_checkers
from savegame.format.hashing import FileHasher, hash_buffer, hash_in_background
from savegame.format.manifest import FileEntry, ItemEntry, Manifest, parse_manifest
from savegame.format.tensorfile import ItemTensors, TensorFileReader, TensorInfo
from savegame.format.tree import Decoder, Path, format_path
from savegame.format.tree import check_array_node as tree_check_array_node
from savegame.storage.base import MANIFEST, CheckpointReader, FileSink, ReadBuffer

__all__ = ["Progress", "check_array_node", "check_item", "checked", "copy_checked", "item_reader", "manifest_of",
           "open_file", "prefetch", "read_checked", "run_checks", "verify_checkpoint", "verify_files"]  # fmt: skip

Progress = Callable[[int], None]
"""Called with the number of bytes just hashed (e.g. ``ProgressBar.advance``)."""

DEFER_HASH_BYTES = 1 << 20
"""Files at least this large are hashed on a worker thread when the caller collects deferred checks."""

_PROGRESS_STEP = 16 << 20
"""With a progress callback, files are hashed in steps of this many bytes, reporting each."""


def manifest_of(reader: CheckpointReader) -> Manifest:
    """The checkpoint's manifest, parsed and validated."""
    return parse_manifest(reader.manifest_bytes(), reader.file_where(MANIFEST))


def prefetch(reader: CheckpointReader, files: Iterable[str] | None) -> None:
    """Tell ``reader`` which files are read next (``None``: the manifest and the data files it will
    name; :meth:`CheckpointReader.prefetch`; a reader without the method, e.g. one that does not
    subclass the protocol, gets no hint)."""
    hint = getattr(reader, "prefetch", None)
    if hint is not None:
        hint(files)


def _mismatch(where: str) -> HashMismatchError:
    return HashMismatchError(f"{where}: content hash differs from the manifest (file is corrupted)")


def read_checked(reader: CheckpointReader, entry: FileEntry, file: str) -> ReadBuffer:
    """The whole of data ``file`` after checking it exists with the size its manifest ``entry`` records."""
    where = reader.file_where(file)
    try:
        size = reader.file_size(file)
    except FileNotFoundError:
        raise MissingFileError(f"{where}: listed in the manifest but missing (or not a regular file)") from None
    if size != entry.bytes:
        raise TruncatedFileError(f"{where}: {size} bytes, the manifest says {entry.bytes}")
    try:
        return reader.read_file(file, size)
    except FileNotFoundError:
        raise MissingFileError(f"{where}: listed in the manifest but vanished while being read") from None


def _hash(buffer: ReadBuffer, size: int, chunk_bytes: int | None, progress: Progress | None) -> str:
    """The file hash of ``buffer``: on the worker threads, or in steps reported to ``progress``."""
    if progress is None:
        return hash_buffer(buffer, size, chunk_bytes)
    hasher = FileHasher(chunk_bytes)
    with memoryview(buffer) as view:
        for start in range(0, size, _PROGRESS_STEP):
            hasher.update(view[start : start + _PROGRESS_STEP])
            progress(min(_PROGRESS_STEP, size - start))
    return hasher.hexdigest()


def open_file(
    reader: CheckpointReader, manifest: Manifest, file: str, *, verify: bool,
    deferred: list[Callable[[], None]] | None = None, progress: Progress | None = None,
) -> TensorFileReader:  # fmt: skip
    """Open a data file of a checkpoint: exists, exact size, hash (if ``verify``), valid header.

    The whole file is one buffer: a copy-on-write memory map for a local file (pages are read when
    touched), a downloaded buffer for a remote one. The hash is computed on that same buffer, so what
    was verified is exactly what is decoded.

    ``deferred``: when given, the hash of a large file is computed on a worker thread while the caller
    decodes, and a check that raises :class:`HashMismatchError` is appended to it; the caller must run
    every check (:func:`run_checks`, or the :func:`checked` block) before it uses or returns anything
    decoded from the file. A header that does not parse is reported as the hash mismatch it is, if it is
    one. ``progress``: told the bytes hashed as it goes (the hash is then computed in this thread).
    """
    entry = manifest.files[file]
    buffer = read_checked(reader, entry, file)
    where, size = reader.file_where(file), entry.bytes
    if verify and deferred is not None and progress is None and size >= DEFER_HASH_BYTES:
        pending = hash_in_background(buffer, size, manifest.hash_chunk_bytes)
        expected = entry.hash

        def check() -> None:
            if pending.result() != expected:
                raise _mismatch(where)

        deferred.append(check)
        try:
            return TensorFileReader.from_buffer(buffer, where=where)
        except BaseException:
            check()  # a damaged header is a hash mismatch: report that
            raise
    if verify and _hash(buffer, size, manifest.hash_chunk_bytes, progress) != entry.hash:
        raise _mismatch(where)
    return TensorFileReader.from_buffer(buffer, where=where)


class _Checked:
    """The block of :func:`checked` (a plain context manager: entered on every load, small ones too)."""

    __slots__ = ("checks",)

    def __init__(self, checks: list[Callable[[], None]]) -> None:
        self.checks = checks

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        run_checks(self.checks)  # raising here replaces the block's own error (which stays its __context__)


def checked(checks: list[Callable[[], None]]) -> _Checked:
    """Run every deferred hash check when the block ends, before its results are used; when the block
    fails, a hash mismatch found meanwhile is what is reported (the damage explains the failure)."""
    return _Checked(checks)


def run_checks(checks: list[Callable[[], None]]) -> None:
    """Wait for every deferred hash check (none keeps running behind an error); raise the first failure."""
    first: BaseException | None = None
    for check in checks:
        try:
            check()
        except BaseException as exc:  # re-raised below, once every check finished
            first = first or exc
    checks.clear()
    if first is not None:
        raise first


@gc_paused()
def verify_files(
    reader: CheckpointReader, manifest: Manifest, files: Iterable[str] | None = None, *,
    progress: Progress | None = None,
) -> dict[str, TensorFileReader]:  # fmt: skip
    """Check the data ``files`` of a checkpoint (default: all of them): each file's size, hash and
    header, and the array nodes of the items stored in them (and the items without a file) against
    those headers. Returns the checked files, opened (``decode_opened`` reads items from them without
    reading them again). Files are checked one at a time, in order. ``progress``: told the bytes hashed.

    ``load(..., verify=True)`` checks the files it reads the same way; together they check a whole
    checkpoint in one pass over each file (what the Checkpointer's resume does).
    """
    wanted = list(manifest.files) if files is None else list(files)
    prefetch(reader, wanted)
    readers = {file: open_file(reader, manifest, file, verify=True, progress=progress) for file in wanted}
    for name, entry in manifest.items.items():
        if all(file in readers for file in entry.files):
            check_item(entry, item_reader(entry, readers), name)
    return readers


def item_reader(entry: ItemEntry, opened: Mapping[str, TensorFileReader]) -> TensorFileReader | None:
    """The arrays of an item, from its opened (and checked) files: its own file's reader, or for an item
    of an incremental checkpoint whose arrays are also in linked files, one view over all of them
    (:class:`~savegame.format.tensorfile.ItemTensors`). None for an item without arrays."""
    if entry.file is None:
        return None
    own = opened[entry.file]
    if not entry.linked:
        return own
    return ItemTensors(own, {file: (opened[file], keys) for file, keys in entry.linked.items()})


def verify_checkpoint(reader: CheckpointReader, *, progress: Progress | None = None) -> Manifest:
    """Check a whole checkpoint (manifest, then :func:`verify_files` on every file); return its manifest
    or raise the :class:`~savegame.CorruptCheckpointError` subclass naming the first problem."""
    manifest = manifest_of(reader)
    verify_files(reader, manifest, progress=progress)
    return manifest


def check_item(entry: ItemEntry, tensors: Mapping[str, Any] | TensorFileReader | None, name: str) -> None:
    """Every array node of an item names a tensor of its file and agrees with its header (what ``load``
    checks before building the array: logical dtype and shape against the stored bytes, scalars 0-d, a
    tensor's device), the skeleton decodes with its torch values checked, and the item's value has the
    structure of its kind (:mod:`savegame.format.checks`)."""
    if isinstance(tensors, TensorFileReader):
        tensors = tensors.tensors

    def check(node: dict[str, Any], path: Path) -> object:
        where = format_path(path)
        key = node["key"]
        if tensors is None or key not in tensors:
            raise InvalidManifestError(f"{where}: array {key[:80]!r} is not in the item's tensor file")
        check_array_node(node, tensors[key], where)
        return None

    tags = tag_checkers(framework_decode_tags)
    value = Decoder(resolve=check, extra_tags=tags).decode(entry.skeleton, (name,))
    check_item_value(entry.kind, value, name)


def check_array_node(node: Mapping[str, Any], info: TensorInfo, where: str) -> None:
    """Check an array node of a skeleton against its tensor's header entry, without building the array
    (the one rule: :func:`savegame.format.tree.check_array_node`)."""
    tree_check_array_node(node, nbytes=info.nbytes, shape=info.shape, where=where)


def copy_checked(
    reader: CheckpointReader, file: str, entry: FileEntry, chunk_bytes: int | None, sink: FileSink, *,
    refusal: str = "content hash differs from the manifest (file is corrupted)",
) -> None:  # fmt: skip
    """Stream data ``file`` of ``reader`` into ``sink`` (not closed here), checking on the way that it
    has the size and hash its manifest ``entry`` records (``chunk_bytes``: the manifest's
    ``hash_chunk_bytes``): the mirror's upload and download, which copy a file without keeping it.
    ``refusal``: the end of the :class:`HashMismatchError` message when the content differs."""
    where = reader.file_where(file)
    actual = reader.file_size(file)
    if actual != entry.bytes:
        raise TruncatedFileError(f"{where}: {actual} bytes, the manifest says {entry.bytes}")
    hasher = FileHasher(chunk_bytes)
    copied = 0
    for chunk in reader.iter_file(file, entry.bytes):
        hasher.update(chunk)
        sink.write(chunk)
        copied += chunk.nbytes
    if copied != entry.bytes:
        raise TruncatedFileError(f"{where}: {copied} bytes read, the manifest says {entry.bytes}")
    if hasher.hexdigest() != entry.hash:
        raise HashMismatchError(f"{where}: {refusal}")
