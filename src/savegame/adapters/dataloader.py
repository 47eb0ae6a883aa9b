"""A plain ``torch.utils.data.DataLoader`` that resumes mid-epoch at the next unseen batch.

``loader = savegame.data.resumable(loader)`` wraps the loader once; put the wrapper in the checkpoint
state (``state["loader"] = loader``) and iterate it as before. Why a wrapper rather than the plain
loader in the state: a ``DataLoader`` does not know how far the training loop got. Its iterator is a
new object each epoch (kept only with ``persistent_workers``), and with ``num_workers > 0`` it has
already asked the workers for batches the loop has not seen. The wrapper sits between the loader and
the loop, so it counts the batches the loop *received*; and it owns the stream of batch indices the
loader's iterator pulls from, so a resume skips the consumed batches *there*, before any worker or
``__getitem__`` sees them: skipped batches are never loaded. The user's loader object is left as it
was (the wrapper iterates a copy built with the same settings around that index stream).

How the interrupted epoch's order comes back: a shuffling sampler draws its permutation from the
loader's ``generator`` or, without one, from torch's global generator, when the epoch's first index
is pulled (``RandomSampler`` draws a seed with ``torch.empty((), dtype=torch.int64).random_()``). The
wrapper records, at that moment, the state of every generator involved (the global one, the loader's,
each sampler's) and the ``state_dict()`` of any sampler that has one. On a mid-epoch resume it puts
them back just for the draw, pulls the consumed batches' indices and throws them away, then gives the
global generator back the state the checkpoint restored (the loop's dropout and augmentations
continue their own stream); private generators end where the uninterrupted run's were. Later epochs
draw from the same states as an uninterrupted run, so they match too.

What cannot be restored is said once, with a :class:`~savegame.ResumeWarning` at the first mid-epoch
restore naming the state key: an ``IterableDataset`` (its position lives in the dataset; the epoch
restarts from its first batch), or a sampler savegame does not know (its order may depend on state
savegame cannot see; the consumed batches are still skipped). Loaders that carry their own state,
such as torchdata's ``StatefulDataLoader``, need no wrapper: put them in the state as they are
(``resumable`` returns them unchanged; give a ``StatefulDataLoader`` ``generator=torch.Generator()``,
else its resumed iterator takes one draw from the global generator that an uninterrupted run did not).

Limits: random draws made *inside* workers (augmentations) follow each worker's own generator, and a
resumed iterator hands the batches to the workers in another rotation; seed such augmentations from
the sample index for a bit-identical resume with ``num_workers > 0`` (the sample order is exact either
way). A checkpoint taken inside the loop's body counts the batch in hand as consumed.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)
from torch.utils.data.distributed import DistributedSampler

from savegame._util.logs import warn
from savegame.adapters.registry import is_stateful
from savegame.errors import ConfigError, ResumeWarning, StateMismatchError

__all__ = ["ResumableLoader", "plain_loader_message", "resumable"]

_STATE_VERSION = 1
_GLOBAL = "global"
_KNOWN_SAMPLERS = (SequentialSampler, RandomSampler, SubsetRandomSampler, WeightedRandomSampler, BatchSampler,
                   DistributedSampler)  # fmt: skip
"""Samplers whose order is a function of their settings and the generators they draw from."""


def resumable(loader: Any) -> Any:
    """``loader`` wrapped so that its position is part of the checkpoint (see the module docstring).

    A loader that already has ``state_dict()``/``load_state_dict()`` (torchdata's
    ``StatefulDataLoader``, a wrapper made before) is returned unchanged: put it in the state as it is.
    Raises :class:`ConfigError` for anything else that is not a plain ``torch.utils.data.DataLoader``
    (a subclass cannot be rebuilt around the index stream without losing what it adds).
    """
    if is_stateful(loader):
        return loader
    if type(loader) is not DataLoader:
        name = f"{type(loader).__module__}.{type(loader).__qualname__}"
        raise ConfigError(
            f"savegame.data.resumable: expected a torch.utils.data.DataLoader, got {name}; a DataLoader subclass "
            "cannot be rebuilt around the resumable index stream: give it state_dict()/load_state_dict() (as "
            "torchdata.stateful_dataloader.StatefulDataLoader does) and put it in the state as it is"
        )
    return ResumableLoader(loader)


def plain_loader_message(obj: object) -> str | None:
    """What to do with a plain ``DataLoader`` found in a state to save (None for anything else)."""
    if not isinstance(obj, DataLoader) or is_stateful(obj):
        return None
    return (
        "a torch DataLoader has no state of its own (it does not know which batches the loop consumed): wrap it "
        "once, `loader = savegame.data.resumable(loader)`, iterate the wrapper and put it in the state; it then "
        "resumes mid-epoch at the next unseen batch"
    )




def holds_data_position(value: object) -> bool:
    """Whether a state item carries where the data loop is: a :class:`ResumableLoader`, a loader or
    sampler with its own state (torchdata's ``StatefulDataLoader``, ``savegame.data.ResumableRandomSampler``,
    any torch ``Sampler`` with ``state_dict``), or a dict / list / tuple holding one."""
    if isinstance(value, ResumableLoader):
        return True
    if isinstance(value, (DataLoader, Sampler)) and is_stateful(value):
        return True
    if isinstance(value, Mapping):
        return any(holds_data_position(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(holds_data_position(v) for v in value)
    return False


@dataclass(frozen=True)
class _Replay:
    """A restored mid-epoch position: batches to skip and the generator/sampler states at the epoch's first pull."""

    batches: int
    start: Mapping[str, Any]


class ResumableLoader:
    """A ``DataLoader`` whose position (epoch and batches the loop received) is saved and restored.

    Made by :func:`resumable`. Iterates exactly like the wrapped loader (same batches, same draws from
    the generators); ``len()`` and attributes (``dataset``, ``batch_size``, ``sampler``...) are the
    wrapped loader's. ``state_dict()`` holds plain ints and the generator states as uint8 tensors.
    """

    def __init__(self, loader: DataLoader[Any]) -> None:
        self.loader = loader
        self.epochs_completed = 0
        self.batches = 0
        self._start: dict[str, Any] | None = None
        self._pending: _Replay | None = None
        self._replay: _Replay | None = None
        self._warned = False
        self._iterable = isinstance(loader.dataset, IterableDataset)
        self._inner: DataLoader[Any] = loader if self._iterable else _rebuild(loader, _IndexStream(self, loader))

    def __getattr__(self, name: str) -> Any:
        """The wrapped loader's attributes (``dataset``, ``batch_size``, ``sampler``, ...)."""
        if name.startswith("__") or name in ("loader", "_inner"):
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __len__(self) -> int:
        """Batches per epoch (the whole epoch, also when resuming in the middle of one)."""
        return len(self.loader)

    def __repr__(self) -> str:
        return f"savegame.data.resumable({self.loader!r}) (epoch {self.epochs_completed}, batch {self.batches})"

    def __iter__(self) -> Iterator[Any]:
        """The batches of one epoch: the rest of a restored epoch, else a whole new one."""
        replay, self._pending = self._pending, None
        self._replay = None if self._iterable else replay
        self.batches = replay.batches if replay is not None and not self._iterable else 0
        self._start = None
        before = torch.get_rng_state() if self._replay is not None else None
        iterator = iter(self._inner)  # draws the workers' base seed (and, with workers, pulls indices)
        if before is not None:
            torch.set_rng_state(before)  # the resumed loop's global stream is the checkpoint's
        for batch in iterator:
            self.batches += 1
            yield batch
        self.epochs_completed += 1
        self.batches = 0
        self._start = None

    def _start_epoch(self, sampler: Any) -> Iterator[Any]:
        """The index stream of one epoch, at its first pull (by the loader's iterator, in the main
        process): a restored epoch's draw replayed and its consumed batches skipped, the snapshot taken."""
        replay, self._replay = self._replay, None
        before = None
        if replay is not None:
            before = torch.get_rng_state()
            _put_back(self.loader, replay.start)
        self._start = _snapshot(self.loader)
        indices: Iterator[Any] = iter(sampler)
        if replay is not None and before is not None:
            for _ in range(replay.batches):  # indices only: nothing is loaded
                if next(indices, _END) is _END:
                    break
            torch.set_rng_state(before)
        return indices

    def state_dict(self) -> dict[str, Any]:
        """Completed epochs, batches received in the current one, batches per epoch, and the generator
        and sampler states of the current epoch's first draw (mid-epoch), or between epochs those the next
        epoch's order will draw from (the loader's and samplers' own generators, Stateful samplers)."""
        start: Mapping[str, Any] = self._start if self.batches and self._start is not None else {}
        if self._pending is not None:  # restored, not iterated yet: the restored position, unchanged
            start = dict(self._pending.start)
        elif not self.batches and not self._iterable:  # between epochs: what the next epoch draws from
            start = _private(self._start if self._start is not None else _snapshot(self.loader))
        return {
            "version": _STATE_VERSION,
            "epochs_completed": self.epochs_completed,
            "batches": self.batches,
            "length": _length(self.loader),
            "start": start,
        }

    def load_state_dict(self, state: Mapping[str, Any], *, where: str = "loader") -> None:
        """Restore the position; the next iteration continues the interrupted epoch at its next batch.

        ``where``: the state key of this loader, named in errors and in the warning (savegame passes it).
        """
        epochs, batches, length, start = _parse(state, where)
        if length != _length(self.loader):
            raise StateMismatchError(
                f"{where}: the checkpoint was taken with {length} batches per epoch, this loader has "
                f"{_length(self.loader)}; the data position cannot be resumed (same dataset, batch_size and "
                "drop_last as the interrupted run?)"
            )
        self.epochs_completed, self.batches, self._start = epochs, batches, None
        self._pending = None
        if batches == 0:
            if start and not self._iterable:  # the next epoch's private generators and samplers (none before 0.1)
                _check_generators(self.loader, start, where, include_global=False)
                _put_back(self.loader, start, include_global=False)
            return
        problem = self._why_not_exact()
        if problem is not None:
            self._warn(where, batches, problem)
        if not self._iterable:
            _check_generators(self.loader, start, where)
            self._pending = _Replay(batches, start)

    def _why_not_exact(self) -> str | None:
        """Why a mid-epoch position cannot be restored exactly (None: it can)."""
        if self._iterable:
            dataset = type(self.loader.dataset).__name__
            return (
                f"its dataset ({dataset}) is an IterableDataset, whose position savegame cannot set without loading "
                "the batches; this epoch restarts from its first batch. To resume exactly, use torchdata's "
                "StatefulDataLoader with a dataset that has state_dict()/load_state_dict(), and put the loader "
                "in the state unwrapped"
            )
        for path, sampler in _samplers(self.loader):
            if not _known(sampler):
                return (
                    f"its {path} ({type(sampler).__name__}) is not a sampler savegame knows, so the skipped batches "
                    "may not be the ones the interrupted run saw. To resume exactly, give the sampler "
                    "state_dict()/load_state_dict() (its state at the epoch's start is then restored), or use "
                    "savegame.data.ResumableRandomSampler or a torch sampler"
                )
        return None

    def _warn(self, where: str, batches: int, problem: str) -> None:
        if self._warned:
            return
        self._warned = True
        warn(
            f"{where}: the data loader's position ({batches} batches into the epoch) cannot be restored exactly: "
            f"{problem}",
            ResumeWarning,
            stacklevel=4,
        )


_END = object()


class _IndexStream(Sampler[Any]):
    """The loader's index sampler seen through a :class:`ResumableLoader` (which can skip and replay it)."""

    def __init__(self, owner: ResumableLoader, loader: DataLoader[Any]) -> None:
        # weak: no reference cycle, so a dropped wrapper's persistent workers stop at once, not at a later
        # garbage collection (the stream is only iterated from the owner's __iter__, which holds the owner)
        self._owner = weakref.ref(owner)
        self._sampler: Any = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler

    def __len__(self) -> int:
        return len(self._sampler)

    def __iter__(self) -> Iterator[Any]:
        return _lazy_indices(self._owner, self._sampler)


def _lazy_indices(owner_ref: weakref.ref[ResumableLoader], sampler: Any) -> Iterator[Any]:
    """The epoch's indices, started at the first pull (when the sampler draws its order, as unwrapped).

    Holds the wrapper only while starting: a persistent iterator keeps this generator, and a strong
    reference would make a cycle whose collection stops the workers late and slowly."""
    owner = owner_ref()
    if owner is None:
        return
    indices = owner._start_epoch(sampler)
    del owner
    yield from indices


def _rebuild(loader: DataLoader[Any], stream: _IndexStream) -> DataLoader[Any]:
    """A DataLoader with ``loader``'s settings whose batches come from ``stream``."""
    settings: dict[str, Any] = {
        "num_workers": loader.num_workers, "collate_fn": loader.collate_fn, "pin_memory": loader.pin_memory,
        "timeout": loader.timeout, "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context, "generator": loader.generator,
        "prefetch_factor": loader.prefetch_factor, "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
    }  # fmt: skip
    if hasattr(loader, "in_order"):  # torch >= 2.6
        settings["in_order"] = loader.in_order
    if loader.batch_sampler is not None:
        return DataLoader(loader.dataset, batch_sampler=stream, **settings)
    return DataLoader(loader.dataset, sampler=stream, batch_size=None, **settings)


def _length(loader: DataLoader[Any]) -> int | None:
    try:
        return len(loader)
    except TypeError:  # an IterableDataset without __len__
        return None


def _samplers(loader: DataLoader[Any]) -> list[tuple[str, Any]]:
    """The samplers the loader's index stream is made of, outermost first, with their attribute paths."""
    found: list[tuple[str, Any]] = []
    sampler: Any = loader.batch_sampler if loader.batch_sampler is not None else loader.sampler
    path = "batch_sampler" if loader.batch_sampler is not None else "sampler"
    while sampler is not None and len(found) < 8:
        found.append((path, sampler))
        inner = getattr(sampler, "sampler", None)
        path, sampler = f"{path}.sampler", (inner if inner is not sampler else None)
    return found


def _known(sampler: object) -> bool:
    """Whether the sampler's order comes back from its settings, its state and the generators."""
    if is_stateful(sampler) or isinstance(sampler, (list, tuple, range)):
        return True
    iterate = getattr(type(sampler), "__iter__", None)
    return any(iterate is known.__iter__ for known in _KNOWN_SAMPLERS)


def _generators(loader: DataLoader[Any]) -> dict[str, torch.Generator]:
    """The generators an epoch's order can draw from, by role: the global one, the loader's, each sampler's."""
    found: dict[str, torch.Generator] = {_GLOBAL: torch.default_generator}
    if isinstance(loader.generator, torch.Generator):
        found["loader"] = loader.generator
    for path, sampler in _samplers(loader):
        generator = getattr(sampler, "generator", None)
        if isinstance(generator, torch.Generator) and all(generator is not g for g in found.values()):
            found[f"{path}.generator"] = generator
    return found


def _snapshot(loader: DataLoader[Any]) -> dict[str, Any]:
    """The generator states and Stateful samplers' states the epoch's order is drawn from (taken at its first pull)."""
    generators = {role: generator.get_state() for role, generator in _generators(loader).items()}
    samplers = {path: dict(s.state_dict()) for path, s in _samplers(loader) if is_stateful(s)}
    return {"generators": generators, "samplers": samplers}


def _private(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """A :func:`_snapshot` without the global generator: what the state holds between epochs (the global
    generator is the checkpoint's RNG state's to restore, as the loop's dropout draws from it too)."""
    generators = {role: state for role, state in snapshot["generators"].items() if role != _GLOBAL}
    return {"generators": generators, "samplers": dict(snapshot["samplers"])}


def _put_back(loader: DataLoader[Any], start: Mapping[str, Any], *, include_global: bool = True) -> None:
    """Give the generators and Stateful samplers the states they had at the interrupted epoch's first pull
    (``include_global=False``: all but the global generator)."""
    for role, generator in _generators(loader).items():
        if role == _GLOBAL and not include_global:
            continue
        generator.set_state(torch.as_tensor(start["generators"][role], dtype=torch.uint8).cpu())
    for path, sampler in _samplers(loader):
        if is_stateful(sampler):
            sampler.load_state_dict(start["samplers"][path])


def _check_generators(
    loader: DataLoader[Any], start: Mapping[str, Any], where: str, *, include_global: bool = True
) -> None:
    """The saved snapshot covers exactly the generators and Stateful samplers this loader has (all but the
    global generator with ``include_global=False``)."""
    saved = start.get("generators")
    samplers = start.get("samplers")
    if not isinstance(saved, Mapping) or not isinstance(samplers, Mapping):
        raise StateMismatchError(f"{where}: invalid data loader state (no generator states for the epoch's order)")
    live = set(_generators(loader)) - (set() if include_global else {_GLOBAL})
    stateful = {path for path, s in _samplers(loader) if is_stateful(s)}
    if set(saved) != live or set(samplers) != stateful:
        raise StateMismatchError(
            f"{where}: the loader draws its order from {sorted(live | stateful)}, the checkpoint's from "
            f"{sorted(set(saved) | set(samplers))}; build the loader as the interrupted run did (same sampler, "
            "shuffle and generator= arguments)"
        )
    for role, generator in _generators(loader).items():
        if role not in saved:
            continue
        try:
            state = torch.as_tensor(saved[role], dtype=torch.uint8)
        except (TypeError, ValueError, RuntimeError):
            state = None
        if state is None or state.shape != generator.get_state().shape:
            raise StateMismatchError(f"{where}: invalid data loader state (the {role} generator's state is not one "
                                     f"of a {generator.device} torch.Generator)")  # fmt: skip


def _parse(state: Mapping[str, Any], where: str) -> tuple[int, int, int | None, Mapping[str, Any]]:
    """The fields of a :meth:`ResumableLoader.state_dict`, checked."""
    try:
        version = state["version"]
        epochs, batches, length, start = (state["epochs_completed"], state["batches"], state["length"],
                                          state["start"])  # fmt: skip
    except (KeyError, TypeError) as exc:
        raise StateMismatchError(f"{where}: not a resumable data loader state (missing {exc})") from None
    ints = (epochs, batches) + (() if length is None else (length,))
    if version != _STATE_VERSION or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in ints):
        raise StateMismatchError(f"{where}: invalid resumable data loader state {dict(state)!r}")
    if not isinstance(start, Mapping) or (length is not None and batches > length):
        raise StateMismatchError(f"{where}: invalid resumable data loader state (batch {batches} of {length})")
    return int(epochs), int(batches), None if length is None else int(length), start
