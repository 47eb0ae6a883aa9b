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
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from savegame.errors import (
    ConfigError,
    CorruptCheckpointError,
    ForeignCheckpointError,
    IntegrationMismatchError,
    MissingExtraError,
    StateMismatchError,
)

try:
    import accelerate as _accelerate  # type: ignore[import-untyped]
    from accelerate.data_loader import SeedableRandomSampler, get_sampler  # type: ignore[import-untyped]
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test with accelerate hidden
    raise MissingExtraError(
        f"savegame.accelerate needs Hugging Face accelerate ({exc}): pip install 'savegame[accelerate]'"
    ) from exc

import torch

from savegame import distributed as _dist
from savegame.adapters.rng import RNGState
from savegame.api import read_manifest
from savegame.format.manifest import Manifest
from savegame.run.checkpointer import Checkpointer, SaveResult
from savegame.run.resume import ResumeWarning
from savegame.storage.base import SavedAt

__all__ = [
    "INTEGRATION",
    "Checkpoints",
    "ForeignCheckpointError",
    "IntegrationMismatchError",
    "Resumed",
    "accelerator_state",
    "load_state",
    "save_state",
]

INTEGRATION = "accelerate"
"""The value of ``metadata["savegame.integration"]`` in the manifests this module writes."""
_MARK = "savegame.integration"
_FORMAT = 1
_COUNTERS = "accelerate"
_POSITION = "position"

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


class _Counters:
    """``accelerator.step`` (the gradient-accumulation counter) and ``save_iteration``, as a Stateful."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def state_dict(self) -> dict[str, Any]:
        acc = self.accelerator
        return {
            "format": _FORMAT,
            "step": int(acc.step),
            # the value after this save, as Accelerator.save_state leaves it (it counts saves made)
            "save_iteration": int(acc.project_configuration.iteration) + 1,
            "num_processes": int(acc.num_processes),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.accelerator.step = int(state["step"])
        self.accelerator.project_configuration.iteration = int(state["save_iteration"])


class _LoaderPosition:
    """A prepared dataloader's position and the generators that decide its order, as a Stateful.

    ``iteration`` is ``DataLoaderShard.iteration`` (the epoch it is in, which it passes to
    ``set_epoch``); ``Accelerator.save_state`` does not save it, so a stock resume replays epoch 0's
    order. The generators are the sampler's, the synchronised one (several processes) and the
    ``DataLoader(generator=...)`` one; ``sampler_epoch``/``initial_seed`` a ``SeedableRandomSampler``'s.
    """

    def __init__(self, dataloader: Any) -> None:
        self.dataloader = dataloader

    def _generators(self) -> dict[str, Any]:
        dl = self.dataloader
        sampler = get_sampler(dl)
        return {
            "sampler": getattr(sampler, "generator", None),
            "synchronized": getattr(dl, "synchronized_generator", None),
            "loader": getattr(dl, "generator", None),
        }

    def state_dict(self) -> dict[str, Any]:
        sampler = get_sampler(self.dataloader)
        state: dict[str, Any] = {"iteration": int(getattr(self.dataloader, "iteration", 0))}
        if isinstance(sampler, SeedableRandomSampler):
            state["sampler_epoch"] = int(sampler.epoch)
            state["initial_seed"] = int(sampler.initial_seed)
        gens = self._generators().items()
        state["generators"] = {k: g.get_state() for k, g in gens if isinstance(g, torch.Generator)}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        dl = self.dataloader
        if hasattr(dl, "iteration"):
            dl.iteration = int(state["iteration"])
        sampler = get_sampler(dl)
        if isinstance(sampler, SeedableRandomSampler) and "sampler_epoch" in state:
            sampler.epoch = int(state["sampler_epoch"])
            sampler.initial_seed = int(state["initial_seed"])
        saved = state.get("generators", {})
        for key, gen in self._generators().items():
            if isinstance(gen, torch.Generator) and key in saved:
                gen.set_state(saved[key])


def accelerator_state(accelerator: Any) -> dict[str, Any]:
    """The savegame items (name -> live object) of everything ``Accelerator.save_state`` saves.

    Models are unwrapped (``accelerator.unwrap_model``: no ``module.`` prefix, so a checkpoint of a
    2-process DDP run loads into one process), optimizers and schedulers are the torch objects inside
    accelerate's wrappers. Shared by :func:`save_state`, :func:`load_state` and :class:`Checkpoints`;
    other integrations built on an ``Accelerator`` may reuse it (it has no side effects).
    """
    _check_supported(accelerator)
    items: dict[str, Any] = {_COUNTERS: _Counters(accelerator)}
    for i, model in enumerate(accelerator._models):
        items[_numbered("model", i)] = accelerator.unwrap_model(model)
    for i, opt in enumerate(accelerator._optimizers):
        items[_numbered("optimizer", i)] = getattr(opt, "optimizer", opt)
    for i, sched in enumerate(accelerator._schedulers):
        items[_numbered("scheduler", i)] = getattr(sched, "scheduler", sched)
    for i, loader in enumerate(accelerator._dataloaders):
        items[_numbered("dataloader", i)] = _LoaderPosition(loader)
    for i, obj in enumerate(accelerator._custom_objects):
        items[f"custom_{i}"] = obj
    if accelerator.scaler is not None:
        items["scaler"] = accelerator.scaler
    items["rng"] = RNGState()
    return items


_ENGINES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")
"""Distributed types whose engines shard or own the model and optimizer state (not covered here)."""


def _check_supported(accelerator: Any) -> None:
    kind = str(getattr(accelerator.distributed_type, "name", accelerator.distributed_type))
    if kind in _ENGINES:
        raise ConfigError(
            f"savegame.accelerate does not cover distributed_type={kind} (its engine writes its own sharded "
            "files); use Accelerator.save_state for it, or savegame.distributed for FSDP2 models"
        )


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

        The skipping loader hands its epoch counter back to ``dataloader`` when it is exhausted, so the
        next epoch draws the next order (``skip_first_batches`` alone leaves the original one behind and
        replays the resumed epoch's order).
        """
        if epoch != self.epoch or self.batches_seen == 0:
            return dataloader
        return _SkippingEpoch(dataloader, accelerator.skip_first_batches(dataloader, self.batches_seen))


_END = object()


class _SkippingEpoch:
    """One pass over a ``skip_first_batches`` loader that then advances the original's ``iteration``."""

    def __init__(self, original: Any, skipping: Any) -> None:
        self.original = original
        self.skipping = skipping

    def __len__(self) -> int:
        return len(self.skipping)

    def __iter__(self) -> Iterator[Any]:
        # Starting an epoch draws from the generators (the DataLoader's worker base seed, a plain
        # RandomSampler's seed). The interrupted run made those draws before the checkpoint was taken,
        # so the restored generators are already past them: undo the second draw, or every later random
        # number (dropout...) would be shifted by one.
        before = torch.get_rng_state(), _LoaderPosition(self.original).state_dict()
        batches = iter(self.skipping)
        first = next(batches, _END)
        torch.set_rng_state(before[0])
        _LoaderPosition(self.original).load_state_dict(before[1])
        if first is not _END:
            yield first
            yield from batches
        if hasattr(self.original, "iteration"):
            self.original.iteration = self.skipping.iteration


def _position(epoch: int, batches_seen: int, step: int | None) -> dict[str, Any]:
    for name, value in (("epoch", epoch), ("batches_seen", batches_seen), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"savegame.accelerate: {name} must be an int >= 0, got {value!r}")
    return {"epoch": epoch, "batches_seen": batches_seen, "step": step}


def _warn_if_order_lost(accelerator: Any, batches_seen: int) -> None:
    """A mid-epoch save of a plain shuffled loader cannot reproduce that epoch's order on resume: say so."""
    if batches_seen == 0:
        return
    for i, loader in enumerate(accelerator._dataloaders):
        sampler = get_sampler(loader)
        if isinstance(sampler, torch.utils.data.RandomSampler) and not isinstance(sampler, SeedableRandomSampler):
            warnings.warn(
                f"savegame.accelerate: dataloader {i} shuffles with a plain RandomSampler, whose order for the "
                f"current epoch cannot be rebuilt after a mid-epoch save (batches_seen={batches_seen}): a resume "
                "skips the right number of batches of a different order. Use "
                "Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)) for an exact "
                "mid-epoch resume, or save at epoch ends (batches_seen=0).",
                ResumeWarning,
                stacklevel=3,
            )


def _metadata(accelerator: Any, extra: Mapping[str, Any] | None) -> dict[str, Any]:
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
    _warn_if_order_lost(accelerator, batches_seen)
    state = {**accelerator_state(accelerator), _POSITION: position}
    manifest = _dist.save(
        output_dir, state, metadata=_metadata(accelerator, metadata), progress=position, overwrite=overwrite,
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
    check_loadable(input_dir, storage_options=storage_options)
    manifest = read_manifest(input_dir, storage_options=storage_options)
    state = accelerator_state(accelerator)
    _check_items(manifest, state, where=str(input_dir), strict=strict)
    report = _dist.restore(input_dir, {**state, _POSITION: None}, strict=strict, verify=verify,
                           map_location=map_location, storage_options=storage_options)  # fmt: skip
    return _resumed(report.state.get(_POSITION), path=str(input_dir))


def _resumed(position: Any, *, path: str, quarantined: tuple[str, ...] = ()) -> Resumed:
    if not isinstance(position, Mapping):
        raise IntegrationMismatchError(f"{path}: the checkpoint has no {_POSITION!r} item of savegame.accelerate")
    step = position.get("step")
    return Resumed(path=path, epoch=int(position["epoch"]), batches_seen=int(position["batches_seen"]),
                   step=None if step is None else int(step), quarantined=quarantined)  # fmt: skip


def _check_items(manifest: Manifest, state: Mapping[str, Any], *, where: str, strict: bool) -> None:
    """The checkpoint must hold this accelerator's items: a second model or a registered object too many
    or too few would otherwise be skipped without a word."""
    saved = _dist.item_names(manifest) - {_POSITION}
    wanted = set(state) - {_POSITION}
    if saved == wanted or (not strict and wanted <= saved):
        return
    raise StateMismatchError(
        f"{where}: the checkpoint holds {sorted(saved)} but this accelerator has {sorted(wanted)}; prepare the "
        "same models, optimizers, schedulers and dataloaders (and register the same objects with "
        "register_for_checkpointing) as the run that saved it"
    )


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


def _precheck(path: str, state: Mapping[str, Any], *, strict: bool) -> None:
    """Refuse the newest checkpoint of a run root before loading if another writer or another accelerator
    setup wrote it; damage is left to the Checkpointer's resume, which falls back past it."""
    try:
        check_loadable(path)
        _check_items(read_manifest(path), state, where=path, strict=strict)
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
    ``name_template``...)::

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
        self.accelerator = accelerator
        self.root = os.fspath(root)
        self.checkpointer = Checkpointer(self.root, **options)

    def _state(self, position: Mapping[str, Any] | None) -> dict[str, Any]:
        return {**accelerator_state(self.accelerator), _POSITION: position}

    def save(
        self, *, epoch: int, batches_seen: int = 0, step: int | None = None,
        metrics: Mapping[str, object] | None = None, metadata: Mapping[str, Any] | None = None,
    ) -> SaveResult:  # fmt: skip
        """Save now (same position arguments as :func:`save_state`; ``metrics`` for ``monitor``)."""
        position = _position(epoch, batches_seen, step)
        _warn_if_order_lost(self.accelerator, batches_seen)
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
            _warn_if_order_lost(self.accelerator, batches_seen)
            self.accelerator.project_configuration.iteration += 1
        return result

    def resume(self, which: str = "latest", *, strict: bool = True, map_location: Any = None) -> Resumed:
        """Restore the newest loadable checkpoint (or ``"best"``, or a name); ``Resumed()`` if there is none."""
        latest = self.checkpointer.latest if which == "latest" else None
        state = self._state(None)
        if latest is not None:
            _precheck(latest.path, state, strict=strict)
        restored = self.checkpointer.restore(state, which, strict=strict, map_location=map_location)
        if restored is None:
            self._refuse_stock_only()
            return Resumed()
        return _resumed(restored.data.get(_POSITION), path=restored.path, quarantined=restored.quarantined)

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
