"""The parts of an ``Accelerator``'s state that are not torch objects, and the order of a resumed epoch.

Private to :mod:`savegame.accelerate`: ``accelerator.step`` and ``save_iteration`` (:class:`Counters`), a
prepared dataloader's position and generators (:class:`LoaderPosition`), both applied only once a whole
restore succeeded (:class:`Deferred`); the loader that skips the batches of the resumed epoch
(:class:`SkippingEpoch`); and the warnings for what no checkpoint can hold (a plain shuffled loader's
order mid-epoch, gradients mid-accumulation, accelerate's own save/load hooks).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from accelerate.data_loader import SeedableRandomSampler, get_sampler  # type: ignore[import-untyped]

from savegame._util.logs import warn
from savegame.run.resume import ResumeWarning

FORMAT = 1
"""The version of the ``accelerate`` item's layout (:class:`Counters`)."""


class Deferred:
    """A Stateful of this module whose ``load_state_dict`` only records the state; :func:`apply_deferred`
    applies it once the whole restore succeeded.

    savegame restores the items one after the other and a strict mismatch found in a later item (a model
    whose shapes differ) raises after the earlier ones were restored: ``accelerator.step`` and the loader
    positions (saved before the model) would then have changed although the load failed.
    """

    pending: Mapping[str, Any] | None = None

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pending = state

    def apply(self, state: Mapping[str, Any]) -> None:
        raise NotImplementedError


def apply_deferred(state: Mapping[str, Any]) -> None:
    """Apply what the restore recorded in the :class:`Deferred` items of ``state``."""
    for obj in state.values():
        if isinstance(obj, Deferred) and obj.pending is not None:
            pending, obj.pending = obj.pending, None
            obj.apply(pending)


class Counters(Deferred):
    """``accelerator.step`` (the gradient-accumulation counter) and ``save_iteration``, as a Stateful."""

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def state_dict(self) -> dict[str, Any]:
        acc = self.accelerator
        return {
            "format": FORMAT,
            "step": int(acc.step),
            # the value after this save, as Accelerator.save_state leaves it (it counts saves made)
            "save_iteration": int(acc.project_configuration.iteration) + 1,
            "num_processes": int(acc.num_processes),
        }

    def apply(self, state: Mapping[str, Any]) -> None:
        self.accelerator.step = int(state["step"])
        self.accelerator.project_configuration.iteration = int(state["save_iteration"])


class LoaderPosition(Deferred):
    """A prepared dataloader's position and the generators that decide its order, as a Stateful.

    ``iteration`` is ``DataLoaderShard.iteration`` (the epoch it is in, which it passes to
    ``set_epoch``); ``Accelerator.save_state`` does not save it, so a stock resume replays epoch 0's
    order. The generators are the sampler's, the synchronised one (several processes) and the
    ``DataLoader(generator=...)`` one; ``sampler_epoch``/``initial_seed`` a ``SeedableRandomSampler``'s.
    """

    def __init__(self, dataloader: Any) -> None:
        self.dataloader = dataloader
        self.lost: list[str] = []
        """What the last :meth:`apply` could not put back (this loader has no such sampler or generator)."""

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

    def apply(self, state: Mapping[str, Any]) -> None:
        dl = self.dataloader
        if hasattr(dl, "iteration"):
            dl.iteration = int(state["iteration"])
        sampler = get_sampler(dl)
        self.lost = []
        if "sampler_epoch" in state and not isinstance(sampler, SeedableRandomSampler):
            self.lost.append(f"the SeedableRandomSampler (this loader's sampler is a {type(sampler).__name__})")
        if isinstance(sampler, SeedableRandomSampler) and "sampler_epoch" in state:
            sampler.epoch = int(state["sampler_epoch"])
            sampler.initial_seed = int(state["initial_seed"])
        saved = state.get("generators", {})
        live = self._generators()
        for key, gen in live.items():
            if isinstance(gen, torch.Generator) and key in saved:
                gen.set_state(saved[key])
        # A SeedableRandomSampler makes its generator on its first pass and reseeds it from initial_seed + epoch
        # on every pass: not having one yet loses nothing.
        reseeded = {"sampler"} if isinstance(sampler, SeedableRandomSampler) else set()
        self.lost += [
            f"the {key} generator"
            for key in saved
            if key not in reseeded and not isinstance(live.get(key), torch.Generator)
        ]


def warn_if_generators_lost(state: Mapping[str, Any], *, batches_seen: int, path: str | None) -> None:
    """A mid-epoch checkpoint whose loader order came from a sampler or generator this accelerator's loader
    lacks (saved with ``use_seedable_sampler=True``, resumed without it): the skipped batches are not the
    ones the interrupted run trained on. Say so instead of resuming another order silently."""
    if batches_seen == 0:
        return
    for name, obj in state.items():
        if isinstance(obj, LoaderPosition) and obj.lost:
            warn(
                f"savegame.accelerate: {path}: {name} was saved mid-epoch (batches_seen="
                f"{batches_seen}) with {', '.join(obj.lost)}, which this accelerator's dataloader does "
                "not have: the resumed epoch skips the right number of batches of a different order. Prepare the "
                "dataloader as the run that saved it did (same DataLoaderConfiguration(use_seedable_sampler=...), "
                "same DataLoader(generator=...)).",
                ResumeWarning,
                stacklevel=3,
            )


_EXHAUSTED = object()


class SkippingEpoch:
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
        before = torch.get_rng_state(), LoaderPosition(self.original).state_dict()
        batches = iter(self.skipping)
        first = next(batches, _EXHAUSTED)
        torch.set_rng_state(before[0])
        LoaderPosition(self.original).apply(before[1])
        if first is not _EXHAUSTED:
            yield first
            yield from batches
        if hasattr(self.original, "iteration"):
            # The epoch is over: the next one is the one after the resumed epoch. (Not the skipping loader's
            # counter: a loader that skips every batch, a checkpoint taken at the last batch of an epoch, ends
            # without counting the epoch, and every later epoch would replay its predecessor's order.)
            self.original.iteration = int(before[1]["iteration"]) + 1


RANDOM_SAMPLERS = (
    torch.utils.data.RandomSampler, torch.utils.data.SubsetRandomSampler, torch.utils.data.WeightedRandomSampler,
)  # fmt: skip
"""torch's samplers that draw an epoch's order from a generator when the epoch starts (accelerate's
``use_seedable_sampler`` replaces only a ``RandomSampler``)."""


def warn_if_order_lost(accelerator: Any, batches_seen: int) -> None:
    """A mid-epoch save of a plain shuffled loader cannot reproduce that epoch's order on resume: say so.
    So for a save between two gradient-synchronisation steps: the gradients accumulated so far live in
    ``.grad``, which no checkpoint holds, and the resumed run would step with part of them."""
    if accelerator.gradient_accumulation_steps > 1 and not accelerator.sync_gradients:
        warn(
            f"savegame.accelerate: saving in the middle of a gradient accumulation (step {accelerator.step}, "
            f"gradient_accumulation_steps={accelerator.gradient_accumulation_steps}): the gradients accumulated "
            "since the last optimizer step are not saved, so a resume from this checkpoint steps with part of "
            "them. Save after a step where accelerator.sync_gradients is True.",
            ResumeWarning,
            stacklevel=3,
        )
    if batches_seen == 0:
        return
    for i, loader in enumerate(accelerator._dataloaders):
        sampler = get_sampler(loader)
        if isinstance(sampler, RANDOM_SAMPLERS) and not isinstance(sampler, SeedableRandomSampler):
            warn(
                f"savegame.accelerate: dataloader {i} shuffles with a plain {type(sampler).__name__}, whose order "
                f"for the current epoch cannot be rebuilt after a mid-epoch save (batches_seen={batches_seen}): a "
                "resume skips the right number of batches of a different order. Use "
                "Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)) for an exact "
                "mid-epoch resume, or save at epoch ends (batches_seen=0).",
                ResumeWarning,
                stacklevel=3,
            )


def warn_if_hooks_skipped(accelerator: Any, which: str) -> None:
    """``register_save_state_pre_hook`` / ``register_load_state_pre_hook`` hooks run inside
    ``Accelerator.save_state`` / ``load_state`` only: what they save themselves (an EMA model written with
    ``save_pretrained``, adapter weights...) is not in a savegame checkpoint. Say so instead of resuming
    without it."""
    hooks = getattr(accelerator, f"_{which}_model_state_pre_hook", None)
    if hooks:
        warn(
            f"savegame.accelerate: this accelerator has {len(hooks)} register_{which}_state_pre_hook hook(s), which "
            f"only Accelerator.{which}_state runs: savegame.accelerate does not call them, so whatever they "
            f"{'save' if which == 'save' else 'load'} beyond the prepared models (an EMA model, files of their "
            "own) is not part of this checkpoint. Register such objects with "
            "accelerator.register_for_checkpointing(obj) instead (they need state_dict/load_state_dict).",
            ResumeWarning,
            stacklevel=3,
        )
