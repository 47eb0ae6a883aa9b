"""savegame for Hugging Face accelerate: ``save_state`` / ``load_state`` without pickle.

One-line change for an accelerate user::

    import savegame.accelerate as sga
    sga.save_state(accelerator, "ckpt/step-500", epoch=epoch, batches_seen=b, step=global_step)
    resumed = sga.load_state(accelerator, "ckpt/step-500")       # instead of accelerator.load_state(...)
    for epoch in range(resumed.epoch, num_epochs):
        for batch in resumed.dataloader(accelerator, train_dl, epoch):   # skips the batches already done
            ...

What a checkpoint holds is what ``Accelerator.save_state`` covers, as savegame items: every prepared
model (its unwrapped state dict: ``model``, ``model_1``...), optimizer (``optimizer``...), scheduler
(``scheduler``...), the ``GradScaler`` (``scaler``), the global RNGs of every rank (``rng``: Python,
NumPy, torch, CUDA), each prepared dataloader's position and generators (``dataloader``...: its
``iteration`` counter, a ``SeedableRandomSampler``'s epoch and seed, the sampler's and the
synchronised generator's state), the objects of ``accelerator.register_for_checkpointing``
(``custom_0``...), ``accelerator.step`` and ``save_iteration`` (``accelerate``) and the training
position the caller passes (``position``: ``epoch``, ``batches_seen``, ``step``). The checkpoint is an
ordinary savegame directory: committed atomically, hash-verified on load, no pickle anywhere (accelerate
itself ``torch.save``-s the optimizer, scheduler, sampler and RNG state).

Run-root mode: :class:`Checkpoints` names, keeps and resumes the checkpoints of one directory with
:class:`savegame.Checkpointer` (``keep_last``, ``monitor``... ; the newest and the best are never deleted,
nothing it did not write is ever deleted, a damaged newest checkpoint is quarantined and the previous one
resumed) -- the counterpart of accelerate's ``ProjectConfiguration(automatic_checkpoint_naming,
total_limit)``.

Exact resume: at an epoch boundary (``batches_seen=0``) always. Mid-epoch, the interrupted epoch's order
must be a function of the saved state: true for unshuffled loaders and for shuffled ones built with
``DataLoaderConfiguration(use_seedable_sampler=True)``; a plain ``RandomSampler`` draws its order from
a generator that has moved on since the epoch started, so ``save_state`` warns (:class:`ResumeWarning`).

With several processes (``accelerate launch``, torch.distributed) every rank calls the same function:
rank 0 writes the replicated items, every rank its own ``rng``, and one checkpoint is committed.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from savegame.errors import (
    ConfigError,
    CorruptCheckpointError,
    ForeignCheckpointError,
    IntegrationMismatchError,
    MissingExtraError,
)

try:
    import accelerate as _accelerate  # type: ignore[import-untyped]

    # (imported here so that a missing or broken accelerate is this error, not one from the submodules)
    import accelerate.data_loader  # type: ignore[import-untyped]
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test with accelerate hidden
    raise MissingExtraError(
        f"savegame.accelerate needs Hugging Face accelerate ({exc}): pip install 'savegame[accelerate]'"
    ) from exc

from savegame import distributed as _dist
from savegame.accelerate._checks import POSITION as _POSITION
from savegame.accelerate._checks import check_accelerator, check_items, check_structure, check_supported
from savegame.accelerate._position import (
    Counters,
    LoaderPosition,
    SkippingEpoch,
    apply_deferred,
    warn_if_generators_lost,
    warn_if_hooks_skipped,
    warn_if_order_lost,
)
from savegame.adapters.rng import RNGState
from savegame.api import read_manifest
from savegame.format.manifest import Manifest
from savegame.format.tree import decode_plain
from savegame.run.checkpointer import Checkpointer, SaveResult
from savegame.run.resume import ResumeWarning
from savegame.storage.base import SavedAt

__all__ = [
    "INTEGRATION",
    "Checkpoints",
    "ForeignCheckpointError",
    "IntegrationMismatchError",
    "ResumeWarning",
    "Resumed",
    "accelerator_state",
    "load_state",
    "save_state",
]

INTEGRATION = "accelerate"
"""The value of ``metadata["savegame.integration"]`` in the manifests this module writes."""
_MARK = "savegame.integration"
_COUNTERS = "accelerate"

STOCK_FILES = (
    "optimizer.bin", "scheduler.bin", "pytorch_model.bin", "random_states_0.pkl", "scaler.pt",
    "sampler.bin", "custom_checkpoint_0.pkl", "dl_state_dict.bin",
)  # fmt: skip
"""Files ``Accelerator.save_state`` writes (with ``torch.save``, i.e. pickle)."""


# --------------------------------------------------------------------------------------------------
# The state of an Accelerator as savegame items


def _numbered(base: str, index: int) -> str:
    """accelerate's own numbering: ``model``, ``model_1``, ``model_2``..."""
    return base if index == 0 else f"{base}_{index}"


def accelerator_state(accelerator: Any) -> dict[str, Any]:
    """The savegame items (name -> live object) of everything ``Accelerator.save_state`` saves.

    Models are unwrapped (``accelerator.unwrap_model``: no ``module.`` prefix, so a checkpoint of a
    2-process DDP run loads into one process), optimizers and schedulers are the torch objects inside
    accelerate's wrappers. Shared by :func:`save_state`, :func:`load_state` and :class:`Checkpoints`;
    other integrations built on an ``Accelerator`` may reuse it (it has no side effects).
    """
    check_accelerator(accelerator)
    check_supported(accelerator)
    items: dict[str, Any] = {_COUNTERS: Counters(accelerator)}
    for i, model in enumerate(accelerator._models):
        items[_numbered("model", i)] = accelerator.unwrap_model(model)
    for i, opt in enumerate(accelerator._optimizers):
        items[_numbered("optimizer", i)] = getattr(opt, "optimizer", opt)
    for i, sched in enumerate(accelerator._schedulers):
        items[_numbered("scheduler", i)] = getattr(sched, "scheduler", sched)
    for i, loader in enumerate(accelerator._dataloaders):
        items[_numbered("dataloader", i)] = LoaderPosition(loader)
    for i, obj in enumerate(accelerator._custom_objects):
        items[f"custom_{i}"] = obj
    if accelerator.scaler is not None:
        items["scaler"] = accelerator.scaler
    items["rng"] = RNGState()
    return items


# --------------------------------------------------------------------------------------------------
# The position in training, and where to resume


@dataclass(frozen=True)
class Resumed:
    """Where a restored run continues (a fresh start is ``Resumed(path=None)``: epoch 0, nothing seen).

    ``epoch``: completed epochs = the index of the epoch to continue (``range(resumed.epoch, n)``);
    ``batches_seen``: batches of that epoch already trained on; ``step``: the caller's global step (None
    if it did not pass one); ``path``: the checkpoint restored; ``quarantined``: damaged checkpoints a
    run-root resume moved aside on the way.
    """

    path: str | None = None
    epoch: int = 0
    batches_seen: int = 0
    step: int | None = None
    quarantined: tuple[str, ...] = ()

    def dataloader(self, accelerator: Any, dataloader: Any, epoch: int) -> Any:
        """The loader to iterate in epoch ``epoch``: the resumed epoch skips ``batches_seen`` batches
        (``accelerator.skip_first_batches``), every other epoch gets ``dataloader`` itself.

        When the skipping loader is exhausted, ``dataloader``'s epoch counter moves past the resumed epoch,
        so the next epoch draws the next order (``skip_first_batches`` alone leaves the original one behind
        and replays the resumed epoch's order), also when every batch was skipped (``batches_seen`` =
        ``len(dataloader)``: a checkpoint taken at the last batch of an epoch).
        """
        if epoch != self.epoch or self.batches_seen == 0:
            return dataloader
        check_accelerator(accelerator)
        return SkippingEpoch(dataloader, accelerator.skip_first_batches(dataloader, self.batches_seen))


def _position(epoch: int, batches_seen: int, step: int | None) -> dict[str, Any]:
    """The ``position`` item; ``epoch`` and ``batches_seen`` must be ints (a None would save a checkpoint
    that no resume can continue from), ``step`` may be None."""
    for name, value, optional in (("epoch", epoch, False), ("batches_seen", batches_seen, False),
                                  ("step", step, True)):  # fmt: skip
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            also = " or None" if optional else ""
            raise ConfigError(f"savegame.accelerate: {name} must be an int >= 0{also}, got {value!r}")
    return {"epoch": epoch, "batches_seen": batches_seen, "step": step}


def _metadata(accelerator: Any, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    if extra is not None and not isinstance(extra, Mapping):
        raise ConfigError(
            f"savegame.accelerate: metadata must be a dict of JSON-like values (or None), got {type(extra).__name__}"
        )
    meta = dict(extra or {})
    meta[_MARK] = INTEGRATION
    meta["accelerate_version"] = _accelerate.__version__
    meta["num_processes"] = int(accelerator.num_processes)
    return meta


# --------------------------------------------------------------------------------------------------
# Explicit directories


def save_state(
    accelerator: Any,
    output_dir: SavedAt,
    *,
    epoch: int = 0,
    batches_seen: int = 0,
    step: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Save everything ``Accelerator.save_state`` saves as the savegame checkpoint ``output_dir``.

    Call it on every process. ``epoch`` (completed epochs), ``batches_seen`` (batches of the current
    epoch already trained on) and ``step`` (your global step) come back from :func:`load_state`.
    ``metadata``: JSON-like data for the manifest. ``overwrite``: replace an existing savegame
    checkpoint atomically (never anything else: :class:`savegame.OccupiedPathError`). ``output_dir``
    may be an fsspec URL (``storage_options`` go to fsspec). Returns the committed manifest; when it
    returns, the checkpoint is durable on every rank's behalf. Increments ``save_iteration`` as
    accelerate does.
    """
    position = _position(epoch, batches_seen, step)
    if not isinstance(overwrite, bool):  # "no" would be true: an existing checkpoint replaced against the wish
        raise ConfigError(f"savegame.accelerate: overwrite must be True or False, got {overwrite!r}")
    state = {**accelerator_state(accelerator), _POSITION: position}
    meta = _metadata(accelerator, metadata)
    warn_if_order_lost(accelerator, batches_seen)
    warn_if_hooks_skipped(accelerator, "save")
    manifest = _dist.save(
        output_dir, state, metadata=meta, progress=position, overwrite=overwrite,
        storage_options=storage_options,
    )  # fmt: skip
    accelerator.project_configuration.iteration += 1
    return manifest


def load_state(
    accelerator: Any,
    input_dir: SavedAt,
    *,
    strict: bool = True,
    verify: bool = True,
    map_location: Any = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Resumed:
    """Restore a checkpoint of :func:`save_state` into the accelerator's objects, on every process.

    Every file's hash is checked before anything changes; models, optimizers, schedulers, scaler,
    registered objects, dataloader positions, ``accelerator.step`` and each rank's RNGs are restored in
    place. Returns the :class:`Resumed` position (``resumed.dataloader(...)`` skips what was done).
    ``strict``: the checkpoint must hold exactly this accelerator's items (same number of models,
    optimizers, registered objects...) and matching keys: :class:`StateMismatchError` otherwise, before
    anything is changed. A directory of ``Accelerator.save_state`` raises :class:`ForeignCheckpointError`;
    a savegame checkpoint written otherwise :class:`IntegrationMismatchError`.
    """
    state = accelerator_state(accelerator)
    warn_if_hooks_skipped(accelerator, "load")
    check_loadable(input_dir, storage_options=storage_options)
    manifest = read_manifest(input_dir, storage_options=storage_options)
    check_items(manifest, state, where=str(input_dir), strict=strict)
    resumed = _resumed(_saved_position(manifest), path=str(input_dir))  # a bad position: refused before any change
    # keys, shapes and parameter groups of every item: checked by the core's strict load before it restores
    # any (savegame.engine.capture.restore_items), from the one read of each file
    _dist.restore(input_dir, {**state, _POSITION: None}, strict=strict, verify=verify,
                  map_location=map_location, storage_options=storage_options)  # fmt: skip
    apply_deferred(state)
    warn_if_generators_lost(state, batches_seen=resumed.batches_seen, path=resumed.path)
    return resumed


def _saved_position(manifest: Manifest) -> Any:
    """The ``position`` item as saved (plain data in the manifest), or None."""
    entry = manifest.items.get(_POSITION)
    return None if entry is None else decode_plain(entry.skeleton)


def _resumed(position: Any, *, path: str, quarantined: tuple[str, ...] = ()) -> Resumed:
    if not isinstance(position, Mapping):
        raise IntegrationMismatchError(f"{path}: the checkpoint has no {_POSITION!r} item of savegame.accelerate")
    try:
        epoch, seen, step = position["epoch"], position["batches_seen"], position.get("step")
        _position(epoch, seen, step)
    except (KeyError, ConfigError) as exc:
        raise IntegrationMismatchError(
            f"{path}: the {_POSITION!r} item {dict(position)!r} is not a position of savegame.accelerate.save_state "
            f"({exc}); it cannot say where to resume"
        ) from None
    return Resumed(path=path, epoch=epoch, batches_seen=seen, step=step, quarantined=quarantined)


def check_loadable(path: SavedAt, *, storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise a specific error unless ``path`` is a committed checkpoint written by this module.

    A directory of ``Accelerator.save_state`` (``optimizer.bin``, ``random_states_0.pkl``...):
    :class:`ForeignCheckpointError`; a savegame checkpoint of another integration or of plain
    ``savegame.save``: :class:`IntegrationMismatchError`; anything else: the error
    :func:`savegame.read_manifest` raises (not found, not a checkpoint, corrupt manifest).
    """
    if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
        stock = stock_files(os.fspath(path))
        if stock and not os.path.exists(os.path.join(path, "manifest.json")):
            raise ForeignCheckpointError(
                f"{os.fspath(path)} was written by accelerate's own Accelerator.save_state ({', '.join(stock)}: "
                "torch.save pickles, which savegame never loads). If you trust it, load it once with "
                "accelerator.load_state(path) and save it again with savegame.accelerate.save_state(accelerator, "
                "new_dir)."
            )
    manifest = read_manifest(path, storage_options=storage_options)
    writer = manifest.metadata.get(_MARK) if isinstance(manifest.metadata, Mapping) else None
    if writer != INTEGRATION:
        by = f"the savegame {writer} integration" if writer else "savegame.save (no integration)"
        raise IntegrationMismatchError(
            f"{path}: this checkpoint was written by {by}, not by savegame.accelerate.save_state; "
            "savegame.accelerate.load_state cannot restore an Accelerator from it. Read it with the function of "
            "the integration that wrote it, or with savegame.load(path)."
        )


def _precheck(path: str, state: Mapping[str, Any], *, strict: bool, ignored: Collection[str] = ()) -> None:
    """Refuse the checkpoint a run-root resume tries first (the newest, the best or the one named) before
    loading if another writer or another accelerator setup wrote it (or its position is unusable); damage
    is left to the Checkpointer's resume, which falls back past it."""
    try:
        check_loadable(path)
        manifest = read_manifest(path)
        check_items(manifest, state, where=path, strict=strict, ignored=ignored)
        _resumed(_saved_position(manifest), path=path)
        if strict:
            check_structure(path, manifest, state)
    except CorruptCheckpointError:
        return


def stock_files(directory: str) -> list[str]:
    """The files of ``Accelerator.save_state`` present in ``directory`` (empty if none)."""
    try:
        names = set(os.listdir(directory))
    except OSError:
        return []
    return [name for name in STOCK_FILES if name in names]


# --------------------------------------------------------------------------------------------------
# A run root: automatic names, retention, resume with fallback


class Checkpoints:
    """The checkpoints of one run directory for an ``Accelerator``, through :class:`savegame.Checkpointer`.

    ``options`` are the Checkpointer's (``keep_last=3``, ``monitor="val_loss"``, ``every_n_steps=500``,
    ``name="step{step}"``...)::

        ckpts = savegame.accelerate.Checkpoints(accelerator, "runs/exp", keep_last=2)
        resumed = ckpts.resume()                         # Resumed(path=None) on a fresh start
        ...
        ckpts.save(epoch=epoch, batches_seen=b, step=global_step)   # or ckpts.step(...) by policy
        ckpts.close()

    Every process constructs it and makes the same calls. Retention deletes only committed checkpoints
    this run wrote, after a newer one is committed, never the newest or the best. ``resume`` tries the
    newest first and falls back past damaged ones (quarantined, with a :class:`ResumeWarning`); a
    directory holding only ``Accelerator.save_state`` checkpoints raises :class:`ForeignCheckpointError`
    instead of starting over.
    """

    def __init__(self, accelerator: Any, root: str | os.PathLike[str], **options: Any) -> None:
        check_accelerator(accelerator)
        if not isinstance(root, (str, os.PathLike)):
            raise ConfigError(f"savegame.accelerate.Checkpoints: root must be a directory path, got {root!r}")
        if options.get("weights_only"):
            raise ConfigError(
                "savegame.accelerate.Checkpoints saves the whole training state to resume from; weights_only=True "
                "would save the models alone, which no resume can continue from. For weights, use "
                "accelerator.save_model(model, dir) or savegame.save(dir, {'model': accelerator.unwrap_model(model)})"
            )
        warn_if_hooks_skipped(accelerator, "save")
        warn_if_hooks_skipped(accelerator, "load")
        self.accelerator = accelerator
        self.root = os.fspath(root)
        self.checkpointer = Checkpointer(self.root, **options)

    def _state(self, position: Mapping[str, Any] | None) -> dict[str, Any]:
        state = {**accelerator_state(self.accelerator), _POSITION: position}
        if not self.checkpointer.rng:  # Checkpointer(rng=False): the RNGs are neither saved nor restored
            del state["rng"]
        return state

    def save(
        self, *, epoch: int, batches_seen: int = 0, step: int | None = None,
        metrics: Mapping[str, object] | None = None, metadata: Mapping[str, Any] | None = None,
    ) -> SaveResult:  # fmt: skip
        """Save now (same position arguments as :func:`save_state`; ``metrics`` for ``monitor``)."""
        position = _position(epoch, batches_seen, step)
        warn_if_order_lost(self.accelerator, batches_seen)
        result = self.checkpointer.save(
            self._state(position), epoch=epoch, step=step, metrics=metrics, epoch_end=batches_seen == 0,
            metadata=_metadata(self.accelerator, metadata),
        )  # fmt: skip
        self.accelerator.project_configuration.iteration += 1
        return result

    def step(
        self, *, epoch: int, batches_seen: int = 0, step: int | None = None,
        metrics: Mapping[str, object] | None = None, final: bool = False,
    ) -> SaveResult | None:  # fmt: skip
        """Report the position; save if the Checkpointer's save policy says so (see ``Checkpointer.step``)."""
        position = _position(epoch, batches_seen, step)
        result = self.checkpointer.step(
            self._state(position), epoch=epoch, step=step, metrics=metrics, epoch_end=batches_seen == 0,
            final=final, metadata=_metadata(self.accelerator, None),
        )  # fmt: skip
        if result is not None:
            warn_if_order_lost(self.accelerator, batches_seen)
            self.accelerator.project_configuration.iteration += 1
        return result

    def resume(self, which: str = "latest", *, strict: bool = True, map_location: Any = None) -> Resumed:
        """Restore the newest loadable checkpoint (or ``"best"``, or a name); ``Resumed()`` if there is none."""
        chosen = self._chosen(which)
        state = self._state(None)
        ignored = set() if self.checkpointer.rng else {"rng"}
        if chosen is not None:
            _precheck(chosen, state, strict=strict, ignored=ignored)
        restored = self.checkpointer.restore(state, which, strict=strict, map_location=map_location)
        if restored is None:
            self._refuse_stock_only()
            return Resumed()
        apply_deferred(state)
        resumed = _resumed(restored.data.get(_POSITION), path=restored.path, quarantined=restored.quarantined)
        warn_if_generators_lost(state, batches_seen=resumed.batches_seen, path=resumed.path)
        return resumed

    def _chosen(self, which: str) -> str | None:
        """The path of the checkpoint ``resume(which)`` tries first (None if there is none): the newest, the
        best or the one named, each checked by :func:`_precheck` before anything is restored."""
        if which == "latest":
            record = self.checkpointer.latest
        elif which == "best":
            record = self.checkpointer.best
        else:
            record = next((r for r in self.checkpointer.list() if r.name == which), None)
        return None if record is None else record.path

    def _refuse_stock_only(self) -> None:
        """Nothing to resume: make sure the root does not hold accelerate's own checkpoints instead."""
        found = []
        for base in (self.root, os.path.join(self.root, "checkpoints")):
            try:
                entries = sorted(os.listdir(base))
            except OSError:
                continue
            found += [os.path.join(base, e) for e in entries if stock_files(os.path.join(base, e))]
        if found:
            raise ForeignCheckpointError(
                f"{self.root} holds no savegame checkpoint but Accelerator.save_state checkpoints ({found[0]}...): "
                "resuming would start over. Convert one (accelerator.load_state(path) in a trusted environment, "
                "then Checkpoints.save(...)) or use an empty directory for a fresh run."
            )

    def close(self) -> None:
        """Finish a save in flight and release the directory (``Checkpointer.close``)."""
        self.checkpointer.close()
