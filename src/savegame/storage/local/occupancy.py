"""What is at a save path, and whether a save may replace it: the occupied-path rule.

A save replaces only nothing, an empty directory or (asked to overwrite) a committed savegame
checkpoint holding only what savegame wrote into it (:func:`unaccounted`: a note or a plot a user put
into a checkpoint folder would be deleted with the old version, so such a folder is refused too);
anything else (a file, a symlink, another program's directory) raises
:class:`OccupiedPathError` and is left untouched. :class:`~savegame.storage.local.write.LocalTransaction`
asks before and after its swap, :meth:`~savegame.storage.local.root.LocalStorage.check_target` before
anything is written, and :mod:`savegame.storage.remote` uses :func:`starts_like_manifest` for the same
rule on object stores.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Mapping

from savegame.errors import CheckpointError, CommitError, OccupiedPathError
from savegame.format.manifest import MAX_MANIFEST_BYTES, parse_manifest
from savegame.storage.base import MANIFEST

ABSENT = "absent"
EMPTY_DIRECTORY = "empty directory"
CHECKPOINT = "checkpoint"
_SAVEGAME_MANIFEST = re.compile(rb'^\s*\{\s*"format"\s*:\s*"savegame"')
"""How every manifest savegame writes begins (also a damaged one, whose tail no longer parses)."""


def starts_like_manifest(head: bytes) -> bool:
    """Whether ``head`` (the first bytes of a ``manifest.json``) is the start of a savegame manifest,
    as opposed to another program's file of that common name."""
    return _SAVEGAME_MANIFEST.match(head) is not None


def occupant(path: str) -> str:
    """What is at ``path``, as far as saving there goes: :data:`ABSENT`, :data:`EMPTY_DIRECTORY`,
    :data:`CHECKPOINT` (a directory, not a link, whose ``manifest.json`` is a regular file that starts
    like a savegame manifest), or a description of anything else ("a regular file", ...), which a save
    must never replace."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ABSENT
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if stat.S_ISREG(st.st_mode):
        return "a regular file"
    if not stat.S_ISDIR(st.st_mode):
        return "a special file"
    with os.scandir(path) as entries:
        if next(entries, None) is None:
            return EMPTY_DIRECTORY
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(os.path.join(path, MANIFEST), flags)
    except OSError:
        return f"a non-empty directory without a savegame {MANIFEST}"
    try:
        head = os.read(fd, 256) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    finally:
        os.close(fd)
    if starts_like_manifest(head):
        return CHECKPOINT
    return f"a non-empty directory whose {MANIFEST} is not a savegame manifest"


def check_save_target(path: str, *, overwrite: bool) -> str:
    """Refuse to save over anything at ``path`` but a committed checkpoint (and that one only with
    ``overwrite``); return :func:`occupant`'s answer otherwise. Nothing is changed at ``path``.

    Raises :class:`OccupiedPathError` for a file, a link or a non-empty directory that is not a
    checkpoint, and :class:`CommitError` (EEXIST) for a checkpoint when ``overwrite`` is False.
    """
    kind = occupant(path)
    if kind in (ABSENT, EMPTY_DIRECTORY):
        return kind
    if kind == CHECKPOINT:
        if not overwrite:
            raise CommitError(errno.EEXIST, f"{path} already exists")
        foreign = unaccounted(path)
        if foreign:
            raise foreign_files_error(path, foreign)
        return kind
    raise occupied_error(path, kind)


_DATA_SUFFIX = ".safetensors"
_SIDE_FILES_PREFIX = "savegame."


def unaccounted(path: str) -> list[str]:
    """The entries of the checkpoint folder ``path`` its manifest does not account for, sorted.

    Savegame writes regular files only: ``manifest.json``, the data files the manifest lists and the
    side files an integration records in the metadata (``metadata["savegame.<integration>"]["files"]``,
    e.g. a Hugging Face checkpoint's ``config.json``). Anything else (a subfolder, a link, ``notes.txt``)
    was put there by someone else and would be lost with the old version, so an overwrite refuses it.
    When the manifest does not parse (a damaged checkpoint), only ``manifest.json`` and ``*.safetensors``
    are taken as savegame's.
    """
    ours = _accounted(path)

    def is_ours(name: str) -> bool:
        return name in ours if ours is not None else name == MANIFEST or name.endswith(_DATA_SUFFIX)

    with os.scandir(path) as entries:
        return sorted(e.name for e in entries if not (e.is_file(follow_symlinks=False) and is_ours(e.name)))


def _accounted(path: str) -> set[str] | None:
    """The names the manifest of checkpoint ``path`` accounts for, or None when it cannot be read."""
    try:
        with open(os.path.join(path, MANIFEST), "rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
        manifest = parse_manifest(data, os.path.join(path, MANIFEST))
    except (OSError, CheckpointError):
        return None
    names = {MANIFEST, *manifest.files}
    for key, value in manifest.metadata.items():
        side = value.get("files") if key.startswith(_SIDE_FILES_PREFIX) and isinstance(value, Mapping) else None
        if isinstance(side, Mapping):
            names.update(name for name in side if isinstance(name, str))
    return names


def foreign_files_error(path: str, foreign: list[str]) -> OccupiedPathError:
    """The error for an overwrite refused because the checkpoint ``path`` holds ``foreign`` entries."""
    shown = ", ".join(ascii(name) for name in foreign[:3]) + (f" and {len(foreign) - 3} more" * (len(foreign) > 3))
    return OccupiedPathError(
        errno.EEXIST,
        f"{path} is a savegame checkpoint that also holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} "
        f"savegame did not write ({shown}): replacing it would delete them, so nothing was saved and it was left "
        "untouched; move them out of the checkpoint folder, or save to another path",
    )


def occupied_error(path: str, kind: str) -> OccupiedPathError:
    """The error for a save refused because ``path`` holds ``kind`` (see :func:`occupant`)."""
    return OccupiedPathError(
        errno.EEXIST,
        f"{path} is {kind}, not a savegame checkpoint: nothing was saved and it was left untouched "
        "(overwrite=True replaces savegame checkpoints only); save to another path, or move it away first",
    )
