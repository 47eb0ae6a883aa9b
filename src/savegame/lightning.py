"""Lightning integration: ``Trainer(plugins=[savegame.lightning.SavegameIO()])``.

:class:`SavegameIO` is a ``lightning.pytorch`` ``CheckpointIO`` plugin. With it, Lightning's own
``ModelCheckpoint`` (``monitor``, ``save_top_k``, ``every_n_train_steps``, ``save_last``, filename
templates), ``trainer.save_checkpoint`` and ``trainer.fit(ckpt_path="last" | path)`` write and read
savegame checkpoints instead of ``torch.save`` pickles: each ``epoch=1-step=20.ckpt`` is a checkpoint
*directory*, committed atomically and durably by :func:`savegame.save`, verified on load, and nothing in
it is a pickle. Lightning's whole checkpoint dict is stored: every top-level key is one savegame item
(``state_dict``, ``optimizer_states``, ``lr_schedulers``, ``loops``, ``callbacks``, ``hyper_parameters``,
``pytorch-lightning_version``...). Config objects in it (``AttributeDict``, ``argparse.Namespace``,
dataclasses, ``pathlib`` paths) are stored as plain data and come back as the same types
(:mod:`savegame.plain_values`); anything else raises :class:`~savegame.errors.UnsupportedTypeError`
naming its key, never a pickle fallback. The process RNGs (Python, NumPy, torch) are saved with every
checkpoint and restored when Lightning loads one, so a resumed ``fit`` continues with the numbers an
uninterrupted run would have drawn.

``LightningModule.load_from_checkpoint`` reads files with ``torch.load`` and cannot be redirected to a
plugin: use :func:`load_from_checkpoint` (``savegame.lightning.load_from_checkpoint(MyModule, path)``).
A pickled ``.ckpt`` written by Lightning's default plugin is refused (savegame never unpickles); convert
it once where you trust it: ``SavegameIO().save_checkpoint(torch.load(old, weights_only=True), new)``.

Lightning is imported by this module only (``import savegame`` does not import it); without it,
importing this module raises :class:`~savegame.errors.MissingExtraError` with the install hint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from savegame._util.logs import warn
from savegame.adapters.registry import adapter_for
from savegame.adapters.rng import RNGState
from savegame.api import load, read_manifest, save
from savegame.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    ForeignCheckpointError,
    InvalidManifestError,
    MissingExtraError,
    NotACheckpointError,
    UnsupportedFormatError,
    UnsupportedTypeError,
)
from savegame.plain_values import from_plain, to_plain
from savegame.storage import is_url, locate
from savegame.storage.base import MANIFEST

try:
    from lightning.fabric.utilities.data import AttributeDict
    from lightning.pytorch.plugins.io import CheckpointIO
except ImportError as _exc:  # pragma: no cover - exercised in a subprocess without lightning
    raise MissingExtraError(
        f"savegame.lightning needs the lightning package ({_exc}): pip install 'savegame[lightning]'"
    ) from _exc

__all__ = ["INTEGRATION", "RNG_ITEM", "SavegameIO", "load_from_checkpoint", "read_checkpoint"]

INTEGRATION = "lightning"
"""The ``metadata["integration"]`` value of every checkpoint this module writes."""
FORMAT = 1
RNG_ITEM = "savegame_rng"
"""The item holding the process RNG states (:class:`savegame.RNGState`), next to Lightning's keys."""
_MAPPINGS = {f"{AttributeDict.__module__}:{AttributeDict.__qualname__}": AttributeDict}
_MAX_DEPTH = 200  # deeper nesting is refused by the tree codec
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch's zip container, a bare pickle (protocol >= 2)


class SavegameIO(CheckpointIO):  # type: ignore[misc]
    """Lightning ``CheckpointIO`` that writes savegame checkpoints (directories, pickle-free, atomic).

    ``background=True``: ``save_checkpoint`` returns once the state is copied to host memory; the write
    and commit happen on a thread (Lightning's ``AsyncCheckpointIO`` contract: a failure is raised by the
    next ``save_checkpoint`` / ``load_checkpoint`` / ``remove_checkpoint``, ``teardown`` waits for the
    last save). ``remove_checkpoint`` first waits for the save in flight, so an older checkpoint is
    never deleted before the newer one is committed.
    ``rng=False``: do not save the process RNG states; ``restore_rng=False``: do not restore them when
    Lightning loads a checkpoint (``fit``/``validate``/``test`` with ``ckpt_path``). Under DDP Lightning
    writes on rank 0 only, so every rank gets rank 0's RNG state back.
    """

    def __init__(self, *, background: bool = False, rng: bool = True, restore_rng: bool = True) -> None:
        super().__init__()
        for option, value in (("background", background), ("rng", rng), ("restore_rng", restore_rng)):
            if not isinstance(value, bool):  # rng="false" is truthy: it saved the RNGs it was told not to
                raise ConfigError(f"SavegameIO: {option} must be True or False, got {value!r}")
        self.background = background
        self.rng = rng
        self.restore_rng = restore_rng
        self._pending: Any = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Commit ``checkpoint`` (Lightning's dict) as the savegame checkpoint directory ``path``.

        An existing checkpoint of this plugin at ``path`` (``last.ckpt``) is replaced atomically; a file or
        folder savegame did not write is never replaced (:class:`~savegame.errors.OccupiedPathError`), nor is
        another writer's savegame checkpoint (:class:`~savegame.errors.ForeignCheckpointError`). A
        symbolic link to a checkpoint of this plugin (``save_last="link"``: after a resume Lightning saves a
        real ``last.ckpt`` where its link is) loses the link only, and the checkpoint is saved in its place;
        the linked checkpoint is left as it is."""
        self._settle()
        state, metadata = encode_checkpoint(checkpoint, rng=self.rng)
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise ConfigError(f"storage_options must be a dict for fsspec, not {type(storage_options)}")
        if isinstance(path, (str, os.PathLike)):
            where = os.fspath(path)
            if not is_url(where) and os.path.islink(where) and _links_to_own_checkpoint(where):
                os.unlink(where)
            elif not is_url(where) and os.path.isfile(os.path.join(where, MANIFEST)):
                _refuse_foreign(where)  # another writer's savegame checkpoint is never replaced
        try:
            result = save(path, state, metadata=metadata, progress=_progress(checkpoint), background=self.background,
                          storage_options=storage_options)  # fmt: skip
        except UnsupportedTypeError as exc:
            raise UnsupportedTypeError(
                f"{exc}. Lightning checkpoints written by SavegameIO are pickle-free: hyper-parameters and other "
                "saved values must be numbers, strings, lists, dicts, tensors, or dataclasses / Namespaces of them "
                "(leave an object out with self.save_hyperparameters(ignore=[...]))"
            ) from None
        if self.background:
            self._pending = result

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        """Read a checkpoint :meth:`save_checkpoint` wrote (every file verified) back into Lightning's dict.

        ``map_location`` as in :func:`savegame.load` (default ``"cpu"``, as Lightning's own plugin);
        ``weights_only`` is accepted for Lightning's signature: nothing is ever unpickled anyway."""
        self._settle()
        checkpoint, rng = read_checkpoint(path, map_location=map_location or "cpu")
        if rng is not None and self.restore_rng:
            RNGState().load_state_dict(rng)
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the savegame checkpoint at ``path`` that this plugin wrote (nothing if it is gone).

        A file or folder that is not such a checkpoint is never deleted (:class:`NotACheckpointError` /
        :class:`ForeignCheckpointError`); a symbolic link to one (``save_last="link"``) loses the link
        only, and so does a dangling link (its target already removed); one whose manifest is damaged is
        quarantined (renamed aside) instead (its data files are not hashed first: deleting needs no read)."""
        self._settle()
        where = os.fspath(path)
        if not is_url(where):
            if os.path.islink(where):
                if not os.path.exists(where):  # dangling (its target was removed, e.g. by save_top_k): the link goes
                    os.unlink(where)
                    return
                _checked_lightning(read_manifest(os.path.realpath(where)), where, "delete")
                os.unlink(where)
                return
            if not os.path.lexists(where):
                return
        storage, name = locate(where)
        if not storage.exists(name):
            if is_url(where):
                return
            raise NotACheckpointError(
                f"refusing to delete {where}: it is not a committed savegame checkpoint (a file or folder savegame "
                "did not write); SavegameIO deletes only its own checkpoints: move or delete it yourself"
            )
        try:
            manifest = read_manifest(storage.ref(name))
        except CorruptCheckpointError as exc:
            moved = storage.quarantine(name)
            warn(f"{where} is damaged ({exc}): moved aside as {moved} instead of deleting it", stacklevel=2)
            return
        _checked_lightning(manifest, where, "delete")
        storage.delete(name)

    def teardown(self) -> None:
        """Wait for a background save still in flight (raising its error)."""
        self._settle()

    def _settle(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


def encode_checkpoint(checkpoint: Mapping[str, Any], *, rng: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Lightning's checkpoint dict -> (savegame state, metadata): one item per top-level key, config
    objects replaced by plain data (their types recorded in the metadata), plus the RNG item."""
    if not isinstance(checkpoint, Mapping):
        raise UnsupportedTypeError(f"a Lightning checkpoint is a dict, not {type(checkpoint).__name__}")
    state: dict[str, Any] = {}
    types: dict[str, Any] = {}
    for key, value in checkpoint.items():
        if type(key) is not str or not key:
            raise UnsupportedTypeError(f"checkpoint key {key!r}: the keys of a Lightning checkpoint must be strings")
        if key == RNG_ITEM:
            raise UnsupportedTypeError(f"checkpoint key {key!r} is reserved by savegame.lightning for the RNG states")
        state[key], records = to_plain(value, mappings=tuple(_MAPPINGS.values()))
        _refuse_live_objects(state[key], (key,), 0)  # after to_plain: inside dataclasses and Namespaces too
        if records:
            types[key] = records
    if rng:
        state[RNG_ITEM] = RNGState()
    section = {"format": FORMAT, "types": types, "rng": rng,
               "epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step")}  # fmt: skip
    return state, {"integration": INTEGRATION, INTEGRATION: _plain_json(section)}


def _refuse_live_objects(value: Any, path: tuple[Any, ...], depth: int) -> None:
    """Raise :class:`UnsupportedTypeError` for a live object (module, optimizer, generator, Stateful...)
    anywhere in ``value``: savegame would store its state, and it would load back as a plain dict."""
    if depth > _MAX_DEPTH:  # the tree codec refuses such nesting with its own message
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            _refuse_live_objects(v, (*path, k), depth + 1)
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _refuse_live_objects(v, (*path, i), depth + 1)
        return
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return
    adapter = adapter_for(value)
    if adapter is not None:
        where = ".".join(map(str, path))
        raise UnsupportedTypeError(
            f"{where}: cannot store a {adapter.kind(value)} ({type(value).__name__}) in a Lightning checkpoint: it "
            "would be saved as its state and load back as a plain dict, not as the object. Store its state "
            "yourself (obj.state_dict(), generator.get_state()) and restore it in on_load_checkpoint; for a "
            "hyper-parameter, leave it out with self.save_hyperparameters(ignore=[...])"
        )


def _progress(checkpoint: Mapping[str, Any]) -> dict[str, int]:
    """Epoch and step for the manifest's progress (what ``savegame ls`` shows)."""
    pairs = (("epoch", checkpoint.get("epoch")), ("step", checkpoint.get("global_step")))
    return {k: v for k, v in pairs if type(v) is int}


def _plain_json(section: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if v is None or type(v) in (int, bool, str, dict)}


def read_checkpoint(
    path: Any, *, map_location: Any = "cpu", storage_options: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(Lightning's checkpoint dict, saved RNG state or None)`` of a checkpoint :class:`SavegameIO`
    wrote; every file is verified first. A pickled torch file, another integration's savegame checkpoint
    and a damaged checkpoint each raise a specific :class:`~savegame.CheckpointError` saying what to do."""
    _refuse_torch_file(path)
    try:
        manifest = read_manifest(path, storage_options=storage_options)
    except CorruptCheckpointError as exc:
        raise type(exc)(f"{exc}\n{_fallback_hint(path)}") from exc
    section = _checked_lightning(manifest, os.fspath(path), "load")
    try:
        state = load(path, map_location=map_location, storage_options=storage_options)
    except CorruptCheckpointError as exc:
        raise type(exc)(f"{exc}\n{_fallback_hint(path)}") from exc
    rng = state.pop(RNG_ITEM, None) if section.get("rng") else None
    types = section.get("types") or {}
    if not isinstance(types, dict):
        raise InvalidManifestError(f"{os.fspath(path)}: metadata.lightning.types must be a dict")
    checkpoint = {k: from_plain(v, types.get(k), mappings=_MAPPINGS, where=k) for k, v in state.items()}
    return checkpoint, rng


def _links_to_own_checkpoint(link: str) -> bool:
    """Whether the symbolic link ``link`` points at a committed checkpoint this plugin wrote."""
    try:
        _checked_lightning(read_manifest(os.path.realpath(link)), link, "replace")
    except (CheckpointError, OSError):
        return False
    return True


def _checked_lightning(manifest: Any, where: str, action: str) -> dict[str, Any]:
    """The ``lightning`` metadata section, or :class:`ForeignCheckpointError` for another writer's checkpoint."""
    metadata = manifest.metadata if isinstance(manifest.metadata, Mapping) else {}
    section = metadata.get(INTEGRATION)
    if metadata.get("integration") != INTEGRATION or not isinstance(section, dict):
        writer = metadata.get("integration") or "savegame.save or a Checkpointer"
        raise ForeignCheckpointError(
            f"refusing to {action} {where}: it is a savegame checkpoint written by {str(writer)[:80]}, not by "
            "savegame.lightning.SavegameIO (its items are not a Lightning checkpoint dict); read it with "
            "savegame.load(path), or pass a checkpoint SavegameIO wrote"
        )
    if section.get("format") != FORMAT:
        raise UnsupportedFormatError(
            f"{where}: Lightning checkpoint layout {section.get('format')!r}; this savegame reads layout {FORMAT}"
        )
    return section


def _refuse_foreign(where: str) -> None:
    """:class:`ForeignCheckpointError` if ``where`` holds a readable savegame checkpoint that this plugin did
    not write (``savegame.save``, a Checkpointer, another integration): replacing it would lose it."""
    try:
        manifest = read_manifest(where)
    except CorruptCheckpointError:
        return  # a damaged one: the save's own rules (a checkpoint may be replaced) apply
    _checked_lightning(manifest, where, "replace")


def _refuse_torch_file(path: Any) -> None:
    """Raise :class:`ForeignCheckpointError` if ``path`` is a pickled torch checkpoint file (never read further)."""
    where = os.fspath(path)
    if is_url(where) or not os.path.isfile(where):
        return
    with open(where, "rb") as f:
        head = f.read(4)
    if head.startswith(_PICKLE_MAGIC):
        raise ForeignCheckpointError(
            f"{where} is a torch checkpoint file (a pickle, e.g. from Lightning's default TorchCheckpointIO), not a "
            "savegame checkpoint; SavegameIO never unpickles. Convert it once, where you trust the file: "
            f"SavegameIO().save_checkpoint(torch.load({where!r}, weights_only=True), NEW_PATH), then pass NEW_PATH "
            "as ckpt_path"
        )


def _fallback_hint(path: Any) -> str:
    """Which other checkpoints sit next to a damaged one (newest first), for the error message."""
    where = os.fspath(path)
    if is_url(where):
        return "pass an older checkpoint as ckpt_path"
    storage, name = locate(where)
    others = [n for n in storage.committed() if n != name]
    others.sort(key=lambda n: _mtime(storage.path(n)), reverse=True)
    if not others:
        return "no other checkpoint is in that directory"
    listed = ", ".join(others[:5])
    return f"nothing was restored; other checkpoints in {storage.root} (newest first, not verified): {listed}; " \
           "pass one of them as ckpt_path"  # fmt: skip


def _mtime(path: str) -> float:
    try:
        return os.path.getmtime(path)
    except OSError:  # deleted meanwhile: last
        return 0.0


def load_from_checkpoint(
    cls: Any, path: Any, *, map_location: Any = None, strict: bool | None = None, **kwargs: Any
) -> Any:
    """``cls.load_from_checkpoint(path, ...)`` for a checkpoint :class:`SavegameIO` wrote.

    ``cls`` is a ``LightningModule`` or ``LightningDataModule`` subclass; it is built from the saved
    hyper-parameters (``kwargs`` override them) and the weights are loaded (``strict`` as in Lightning).
    Lightning's own ``load_from_checkpoint`` opens the path with ``torch.load``, which a checkpoint
    directory (rightly) is not. The RNG states are not touched."""
    import lightning.pytorch as pl
    from lightning.pytorch.core.saving import _load_state
    from lightning.pytorch.utilities.migration.utils import _pl_migrate_checkpoint

    if not (isinstance(cls, type) and issubclass(cls, (pl.LightningModule, pl.LightningDataModule))):
        raise ConfigError(
            f"load_from_checkpoint: cls must be a LightningModule or LightningDataModule subclass (the class, "
            f"not an instance), got {cls!r:.80}"
        )
    checkpoint, _ = read_checkpoint(path, map_location=map_location or "cpu")
    checkpoint = _pl_migrate_checkpoint(checkpoint, checkpoint_path=os.fspath(path))
    checkpoint.setdefault(cls.CHECKPOINT_HYPER_PARAMS_KEY, {})  # type: ignore[attr-defined]
    checkpoint[cls.CHECKPOINT_HYPER_PARAMS_KEY].update(kwargs)  # type: ignore[attr-defined]
    if issubclass(cls, pl.LightningDataModule):
        return _load_state(cls, checkpoint, **kwargs)
    return _load_state(cls, checkpoint, strict=strict, **kwargs)
