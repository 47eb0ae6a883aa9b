"""Resumable data order: the position in the data stream is part of the checkpoint.

Restoring the model, the optimizer and the RNGs is not enough to continue a run *exactly*: a run
interrupted in the middle of an epoch must also continue with the same batches, in the same order,
starting with the first batch it had not trained on yet. Two ways:

* :func:`resumable` (the usual one): wrap any plain ``torch.utils.data.DataLoader`` once,
  ``loader = savegame.data.resumable(loader)``, and put the wrapper in the state
  (``state["loader"] = loader``). Shuffled or not, ``drop_last``, a ``BatchSampler``, ``num_workers``
  0 or more, ``persistent_workers``: a mid-epoch resume continues at the next batch the loop had not
  received, in the interrupted epoch's order, without loading the skipped batches, and later epochs
  match an uninterrupted run (see :mod:`savegame.adapters.dataloader` for how and for the limits).
  torchdata's ``StatefulDataLoader`` needs no wrapper: it goes in the state as it is (give it
  ``generator=torch.Generator()``: its resumed iterator then draws its worker seed from that generator
  rather than from the global one the loop's dropout uses; rule 4 below).
* :class:`ResumableRandomSampler`: a sampler whose order is a pure function of ``(seed, epoch)``,
  independent of the global RNG; put it in the state (or wrap its loader, which then also counts
  what a prefetching loader has fetched but the loop has not received).

Typical loop (``epoch`` counts completed epochs, as everywhere in savegame)::

    loader = savegame.data.resumable(DataLoader(train_set, batch_size=32, shuffle=True, num_workers=2))
    state = {"model": model, "optimizer": opt, "loader": loader}
    restored = ckpt.restore(state)
    start, step = (restored.epoch or 0, restored.step or 0) if restored else (0, 0)
    for epoch in range(start, num_epochs):
        for x, y in loader:                 # resumes mid-epoch after the last batch the loop received
            ...; step += 1
            ckpt.step(state, epoch=epoch, step=step, epoch_end=False)
        ckpt.step(state, epoch=epoch + 1, step=step, metrics=...)

The same loop with the sampler instead of the wrapper::

    sampler = ResumableRandomSampler(train_set, seed=0)
    loader = DataLoader(train_set, batch_size=32, sampler=sampler,
                        generator=torch.Generator())        # see rule 4 below
    state = {"model": model, "optimizer": opt, "sampler": sampler}
    ...
    for epoch in range(start, num_epochs):
        sampler.set_epoch(epoch)            # keeps the restored position if it is the same epoch
        for x, y in loader:
            ...

What a custom pipeline must do to resume exactly (:func:`resumable` does 2 to 5 for you):

1. **Every source of randomness is in the state.** :class:`savegame.RNGState` covers the global
   Python, NumPy and torch (CPU and CUDA) generators; a ``torch.Generator`` or
   ``numpy.random.Generator`` you created yourself must be saved too (or re-derived from a seed and
   the position, as this sampler does).
2. **The position is in the state**: epoch and the number of samples (or batches) consumed in it.
   Record what the training loop actually *consumed*, not what a prefetching loader has *fetched*.
3. **The order is reproducible from the state alone**: derive each epoch's shuffle from
   ``(seed, epoch)`` instead of a generator that advanced an unknown number of times, then skip the
   consumed part on resume.
4. **Nothing else draws from the global RNGs between the checkpoint and the next batch.** Creating a
   ``DataLoader`` iterator draws a worker base seed from the global torch generator unless the loader
   has its own ``generator=``; pass ``generator=torch.Generator()`` (as above), otherwise the
   resumed run's dropout and augmentations see a different random stream.
5. **Prefetching loaders** (``num_workers > 0``) pull indices ahead of the training loop: by
   ``num_workers * prefetch_factor`` batches. The sampler then reports a position ahead of what was
   trained on. Either use ``num_workers=0`` for exact resume, or count consumed samples in the loop
   and call :meth:`ResumableRandomSampler.set_position` with that count before each save. Random
   augmentations in workers must be seeded from ``(seed, epoch, index)`` rather than from the
   workers' own generators.
6. Deterministic kernels: ``torch.use_deterministic_algorithms(True)`` and a fixed thread count;
   bit-identical results are only promised on the same hardware and library versions.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

from savegame.adapters.dataloader import ResumableLoader, resumable
from savegame.errors import ConfigError, StateMismatchError

__all__ = ["ResumableLoader", "ResumableRandomSampler", "resumable"]

_STATE_VERSION = 1


def _check_int(name: str, value: object, *, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (bool refused), else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"ResumableRandomSampler: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ConfigError(f"ResumableRandomSampler: {name} must be >= {minimum}, got {value}")
    return value


class ResumableRandomSampler(Sampler[int]):
    """Random (or sequential) sampling whose position survives a checkpoint.

    Args:
        data_source: the dataset (anything with ``len``); only its length is used.
        seed: base seed of the shuffle. Epoch ``e`` uses the permutation drawn by a private
            ``torch.Generator`` seeded with ``seed + e`` (modulo 2**64), so the order never depends on the global
            RNG or on how many epochs this process has run.
        shuffle: False gives ``0, 1, ..., n-1`` every epoch (still resumable mid-epoch).

    The sampler counts the indices it hands out. When an epoch is exhausted it moves on to the next
    epoch by itself, so loops that never call :meth:`set_epoch` still get a new order each epoch and a
    checkpoint taken after the epoch's last batch resumes at the start of the next one. Iterating
    again after breaking out of an epoch continues where the previous iteration stopped.
    """

    def __init__(self, data_source: Sized, *, seed: int = 0, shuffle: bool = True) -> None:
        self._size = len(data_source)
        self.seed = _check_int("seed", seed, minimum=0)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        """Samples per epoch (the whole epoch, also when resuming in the middle of one)."""
        return self._size

    def order(self, epoch: int) -> list[int]:
        """The full index order of ``epoch`` (a pure function of ``seed``, ``epoch`` and the size)."""
        if not self.shuffle:
            return list(range(self._size))
        generator = torch.Generator()
        generator.manual_seed((self.seed + epoch) % (1 << 64))  # the generator takes 64 bits; any int seed works
        return [int(i) for i in torch.randperm(self._size, generator=generator)]

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``; a no-op when the sampler is already in it (keeps a restored position).

        Call it at the top of each epoch as with ``DistributedSampler``. Moving to another epoch
        resets the position to 0.
        """
        epoch = _check_int("epoch", epoch, minimum=0)
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def set_position(self, position: int) -> None:
        """Set how many samples of the current epoch were consumed (for prefetching loaders)."""
        self.position = min(_check_int("position", position, minimum=0), self._size)

    def __iter__(self) -> Iterator[int]:
        """Yield the rest of the current epoch, then advance to the next epoch."""
        epoch = self.epoch
        indices = self.order(epoch)
        while self.epoch == epoch and self.position < len(indices):
            index = indices[self.position]
            self.position += 1
            yield index
        if self.epoch == epoch and self.position >= len(indices):
            self.epoch = epoch + 1
            self.position = 0

    def state_dict(self) -> dict[str, Any]:
        """Epoch, position within it, seed, shuffle flag and dataset size (plain ints)."""
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "size": self._size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the position; the dataset size must match (else the order would differ)."""
        try:
            size = int(state["size"])
            epoch = _check_int("epoch", int(state["epoch"]), minimum=0)
            position = _check_int("position", int(state["position"]), minimum=0)
            seed = _check_int("seed", int(state["seed"]), minimum=0)
            shuffle = bool(state["shuffle"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateMismatchError(f"ResumableRandomSampler: invalid state {dict(state)!r} ({exc})") from None
        if size != self._size:
            raise StateMismatchError(
                f"ResumableRandomSampler: the checkpoint was taken with a dataset of {size} samples, "
                f"this one has {self._size}; the data order cannot be resumed"
            )
        if position > size:
            raise StateMismatchError(f"ResumableRandomSampler: position {position} beyond {size} samples")
        self.seed, self.shuffle, self.epoch, self.position = seed, shuffle, epoch, position
