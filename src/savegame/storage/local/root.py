"""A directory of checkpoints: :class:`LocalStorage` (the :class:`~savegame.storage.base.Storage` of a path).

It begins and joins transactions (:mod:`savegame.storage.local.write`), opens readers
(:mod:`savegame.storage.local.read`), and manages the root: listing committed and quarantined
checkpoints, deleting (rename away, then remove), quarantining (rename aside, never delete) and
cleaning up what crashed writers left (:func:`staging_is_live`, the local reading of
:mod:`savegame.storage.liveness`; ``savegame gc`` asks it too). Used through
:func:`savegame.storage.storage_for` / :func:`savegame.storage.locate` by the api, the Checkpointer,
the run index, the CLI and the mirror.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
import time
import uuid

import savegame.storage.local.ops as local_ops
from savegame._util.logs import get_logger
from savegame.errors import InvalidNameError, StorageError
from savegame.format.naming import check_checkpoint_name, validate_name
from savegame.storage.base import MANIFEST, QUARANTINE_PREFIX, STAGING_PREFIX, TRASH_PREFIX, CheckpointRef
from savegame.storage.liveness import FOREIGN_WRITER_GRACE_SECONDS, writer_is_live
from savegame.storage.local.occupancy import check_save_target
from savegame.storage.local.ops import FileOps, _io_error
from savegame.storage.local.read import LocalCheckpointReader, open_local_checkpoint
from savegame.storage.local.write import JoinedTransaction, LocalTransaction

log = get_logger("savegame")

STALE_FOREIGN_SECONDS = FOREIGN_WRITER_GRACE_SECONDS  # the one grace period (storage.liveness)


class LocalStorage:
    """A directory of checkpoints on a local filesystem."""

    def __init__(self, root: str | os.PathLike[str], *, ops: FileOps | None = None, create: bool = True) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.ops = ops or local_ops.DEFAULT_OPS  # looked up now: tests swap the module's default
        if create:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise _io_error(exc, f"cannot create checkpoint root {self.root}") from exc

    def path(self, name: str) -> str:
        return os.path.join(self.root, check_checkpoint_name(name))

    def url(self, name: str) -> str:
        """The checkpoint's directory path (the same as :meth:`path`)."""
        return self.path(name)

    def exists(self, name: str) -> bool:
        """Whether ``name`` is a committed checkpoint (a directory with a manifest)."""
        path = self.path(name)
        return os.path.isdir(path) and _is_regular_file(os.path.join(path, MANIFEST))

    def reader(self, name: str) -> LocalCheckpointReader:
        """Open committed checkpoint ``name`` for reading (files are memory-mapped)."""
        return open_local_checkpoint(self.path(name))

    def ref(self, name: str) -> CheckpointRef:
        """A handle on checkpoint ``name`` for ``savegame.load/verify/read_manifest``."""
        return CheckpointRef(self, check_checkpoint_name(name))

    def check_target(self, name: str, *, overwrite: bool) -> None:
        """Raise now what saving ``name`` would raise at its commit because of what is at ``ROOT/NAME``:
        :class:`OccupiedPathError` (not a checkpoint) or :class:`CommitError` (a checkpoint, and not
        ``overwrite``). Changes nothing."""
        path = self.path(name)
        try:
            check_save_target(path, overwrite=overwrite)
        except OSError as exc:
            if isinstance(exc, StorageError):
                raise
            raise _io_error(exc, f"cannot inspect {path}") from exc

    def begin(self, name: str, *, overwrite: bool = False) -> LocalTransaction:
        """Start writing checkpoint ``name`` into a staging directory (the protocol: :mod:`savegame.storage.local`).

        Refuses at once (:class:`OccupiedPathError`), before anything is written, when ``ROOT/NAME`` holds
        something a checkpoint must not replace; the commit checks again.
        """
        validate_name(name)  # a new checkpoint gets a portable name, whichever save path chose it
        self.check_target(name, overwrite=True)  # an existing checkpoint without overwrite: at the commit
        staging = os.path.join(
            self.root, f"{STAGING_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        )
        try:
            self.ops.mkdir(staging)
        except OSError as exc:
            raise _io_error(exc, f"cannot create staging directory in {self.root}") from exc
        return LocalTransaction(self, name, staging, overwrite)

    def join(self, name: str, token: str, *, timeout: float = 60.0) -> JoinedTransaction:
        """Write into the transaction another process began with ``begin(name)`` (``token`` = its ``txn.token``).

        Waits up to ``timeout`` seconds for the staging directory to become visible (on a shared
        filesystem another host's new directory can show up late). The token must name a staging
        directory directly inside this root, so a token received from elsewhere cannot point outside it.
        """
        check_checkpoint_name(name)
        if not token.startswith(STAGING_PREFIX) or "/" in token or "\\" in token or "\0" in token or len(token) > 255:
            raise InvalidNameError(f"{token[:80]!r} does not name a staging directory of {self.root}")
        staging = os.path.join(self.root, token)
        deadline = time.monotonic() + timeout
        while not os.path.isdir(staging):
            if time.monotonic() >= deadline:
                raise StorageError(errno.ENOENT, f"staging directory {staging} did not appear within {timeout} s")
            time.sleep(0.02)
        return JoinedTransaction(self, name, staging)

    def committed(self) -> list[str]:
        """Names of committed checkpoints (folders with a manifest that is a regular file), sorted by name."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        names = []
        for e in entries:
            if e.name.startswith(".") or not e.is_dir(follow_symlinks=False):
                continue
            if _is_regular_file(os.path.join(e.path, MANIFEST)):
                names.append(e.name)
        return sorted(names)

    def quarantined(self) -> list[str]:
        """Folder names of quarantined checkpoints (kept for inspection, never loaded as latest)."""
        try:
            return sorted(n for n in os.listdir(self.root) if n.startswith(QUARANTINE_PREFIX))
        except FileNotFoundError:
            return []

    def delete(self, name: str) -> None:
        """Remove a checkpoint: it disappears atomically (rename), then its files are removed."""
        path = self.path(name)
        trash = os.path.join(self.root, f"{TRASH_PREFIX}del-{name}-{uuid.uuid4().hex[:8]}")
        try:
            self.ops.rename(path, trash)
            self.ops.fsync_dir(self.root)
        except OSError as exc:
            raise _io_error(exc, f"cannot delete checkpoint {path}") from exc
        self.ops.rmtree(trash)

    def quarantine(self, name: str) -> str:
        """Move a damaged checkpoint out of the way without deleting it; return its new folder name."""
        path = self.path(name)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        new = f"{QUARANTINE_PREFIX}{name}-{stamp}-{uuid.uuid4().hex[:6]}"
        try:
            self.ops.rename(path, os.path.join(self.root, new))
            self.ops.fsync_dir(self.root)
        except OSError as exc:
            raise _io_error(exc, f"cannot quarantine {path}") from exc
        return new

    def remove_dead_staging(self) -> list[str]:
        """Remove the staging folders of writers that are gone (this host's dead processes; other hosts'
        after a day: :func:`staging_is_live`); return their names. Only those: a folder of a live writer,
        and everything else in the root, is left alone, so this is safe in a directory other processes
        write to as well (what :func:`savegame.save` does before its first save into a root)."""
        removed: list[str] = []
        host = socket.gethostname()
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return removed
        for e in entries:
            if leftover_kind(e) == "staging" and not staging_is_live(e.name[len(STAGING_PREFIX) :], host, e):
                self.ops.rmtree(e.path)
                removed.append(e.name)
        return removed

    def cleanup(self) -> list[str]:
        """Remove what crashed writers left behind; return the removed folder names.

        Staging folders of live processes on this host are kept; those of dead processes are removed;
        those of other hosts (shared filesystems) only after a day. A ``.trash-NAME-*`` folder whose
        checkpoint NAME is missing (a crash mid-overwrite) is renamed back instead of removed.
        """
        removed = self.remove_dead_staging()
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return removed
        for e in entries:
            if leftover_kind(e) == "trash":
                rest = e.name[len(TRASH_PREFIX) :]
                original = rest.rsplit("-", 1)[0]
                if not rest.startswith("del-") and original and not os.path.lexists(os.path.join(self.root, original)):
                    if not e.is_symlink() and os.path.isfile(os.path.join(e.path, MANIFEST)):  # a link: not ours
                        self.ops.rename(e.path, os.path.join(self.root, original))
                        continue
                self.ops.rmtree(e.path)
                removed.append(e.name)
        return removed


_TIDIED: set[str] = set()
"""Roots whose dead writers' staging folders this process already removed (once per root is enough: a
writer that dies later is this process's own concern no more than before)."""


def remove_dead_staging_once(storage: LocalStorage) -> list[str]:
    """:meth:`LocalStorage.remove_dead_staging`, the first time this process saves into ``storage``'s root;
    a failure is logged, never raised (the save it precedes does not depend on it)."""
    root = os.path.realpath(storage.root)
    if root in _TIDIED:
        return []
    _TIDIED.add(root)
    try:
        removed = storage.remove_dead_staging()
    except OSError as exc:
        log.warning("savegame: could not remove a dead writer's staging folder in %s: %s", storage.root, exc)
        return []
    if removed:
        log.info("savegame: removed the unfinished saves of writers that are gone in %s: %s", storage.root, removed)
    return removed


_STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + r".+-\d+-[0-9a-f]+")
_TRASH_NAME = re.compile(re.escape(TRASH_PREFIX) + r".+-[0-9a-f]{8}")


def leftover_kind(entry: os.DirEntry[str]) -> str | None:
    """``"staging"`` or ``"trash"`` for a folder named as savegame names its staging folders
    (``.staging-HOST-PID-ID``) and trash (``.trash-NAME-XXXXXXXX``); None for anything else, which clean-up
    never touches: a user's ``.trash-photos`` folder, a file called ``.staging-notes``. A symlink of such
    a name counts (clean-up removes the link itself, never what it points to)."""
    if not (entry.is_dir(follow_symlinks=False) or entry.is_symlink()):
        return None
    if _STAGING_NAME.fullmatch(entry.name):
        return "staging"
    if _TRASH_NAME.fullmatch(entry.name):
        return "trash"
    return None


def staging_is_live(tag: str, host: str, entry: os.DirEntry[str], *, now: float | None = None) -> bool:
    """Whether the staging folder ``entry`` (``.staging-HOST-PID-ID``; ``tag`` without the prefix) may
    still be written, by :func:`savegame.storage.liveness.writer_is_live`: this host's writer process
    is running (this process's own: another thread's save), or another host's folder was touched within
    :data:`STALE_FOREIGN_SECONDS` (its owner cannot be checked from here)."""
    parts = tag.rsplit("-", 2)
    if len(parts) != 3:
        return False
    owner_host, pid_text, _ = parts
    if owner_host == host:
        try:
            pid = int(pid_text)
        except ValueError:
            return False
        return writer_is_live(host=socket.gethostname(), pid=pid, touched=None)
    try:
        mtime = entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return False
    return writer_is_live(host=None, pid=None, touched=mtime, now=now)


def _is_regular_file(path: str) -> bool:
    """Whether ``path`` is a regular file itself (a symlink to one is not: readers refuse it)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
