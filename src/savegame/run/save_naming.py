"""How a save is named: the default name (``epoch=004-step=001200``), the user's template, and the
next free name when another writer takes it while the checkpoint is written (:class:`SaveNaming`,
one rule for the sync, background and per-rank saves of :class:`savegame.run.checkpointer.Checkpointer`).

The name *rules* (what a valid name is, ``-v1`` suffixes) live in :mod:`savegame.format.naming`; this module
only decides which name a Checkpointer save gets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import replace as _replace
from typing import Any

from savegame._util.logs import get_logger, warn
from savegame.errors import InvalidNameError
from savegame.format.naming import NameTemplate, unique_name
from savegame.policies import Progress
from savegame.run.index import ALIASES, RecordedBest

__all__ = ["SaveNaming", "default_name", "name_for", "renamed"]

log = get_logger("savegame.run.checkpointer")


@dataclass
class SaveNaming:
    """The name of a save being written, and the next free one should another writer take it meanwhile:
    the ``next_name`` of :func:`savegame.engine.write_loop.retry_on_clash`, one rule for the sync, background
    (called in the writer thread) and per-rank saves."""

    base: str
    taken: set[str]
    first: str
    name: str
    payload: Callable[[str], dict[str, Any]] = lambda name: {}
    """The progress recorded under a name (it names the checkpoint, e.g. as the best)."""

    @classmethod
    def start(cls, base: str, taken: set[str]) -> SaveNaming:
        first = unique_name(base, taken)
        return cls(base, taken, first, first)

    def next(self, clashed: str) -> tuple[str, dict[str, Any]]:
        self.taken.add(clashed)
        self.name = unique_name(self.base, self.taken)
        return self.name, self.payload(self.name)


def renamed(best: RecordedBest | None, old: str, new: str) -> RecordedBest | None:
    """``best`` as computed for a save named ``old``, for the same save named ``new``."""
    if best is not None and best.name == old and new != old:
        return _replace(best, name=new)
    return best


def check_not_alias(name: str, what: str) -> None:
    """:class:`InvalidNameError` for a checkpoint name that is one of the root's aliases (``best``,
    ``latest``): a folder of that name hides the alias, so ``ROOT/best`` would be that checkpoint."""
    if name in ALIASES:
        raise InvalidNameError(
            f"{what} gives the checkpoint name {name!r}, which is reserved: ROOT/{name} means the {name} checkpoint "
            "of the run (savegame inspect ROOT/best, Checkpointer(ROOT).restore(state, 'latest')); choose another name"
        )


def default_name(epoch: int | None, step: int | None, sequence: int) -> str:
    """``epoch=004-step=001200``; the parts that are unknown are left out (``save-000007`` if both)."""
    parts = []
    if epoch is not None:
        parts.append(f"epoch={epoch:03d}")
    if step is not None:
        parts.append(f"step={step:06d}")
    return "-".join(parts) if parts else f"save-{sequence:06d}"


def name_for(template: NameTemplate | None, progress: Progress, sequence: int, explicit: str | None) -> str:
    """The checkpoint name before de-duplication: ``explicit``, else the template filled in (the default
    name, with a warning, when the save lacks a value the template needs), else the default name."""
    if explicit is not None:
        check_not_alias(explicit, "save(name=...)")
        return explicit
    if template is not None:
        try:
            name = template.format(epoch=progress.epoch, step=progress.step, metrics=progress.metrics)
            check_not_alias(name, "the name template")
            return name
        except InvalidNameError as exc:
            message = f"{exc}; using the default name for this checkpoint"
            log.warning(message)
            warn(message, stacklevel=4)
    return default_name(progress.epoch, progress.step, sequence)
