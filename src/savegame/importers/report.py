"""What an import found and did: :class:`ImportReport`, and :class:`Found`, what a reader hands back.

A reader (one module per source format) turns a source into :class:`Found`: the items to save (plain
nested data of tensors and arrays, the way ``savegame.save`` takes it), the progress and metadata to
record, and notes on what it converted or left out. :func:`savegame.convert` saves it and returns the
:class:`ImportReport`, which the command line prints (names escaped) or writes as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Found", "ImportReport", "ItemSummary"]


@dataclass
class Found:
    """What a reader read from a source, before it is saved.

    ``items``: ``{item name: value}`` for ``savegame.save``; ``progress``: ``epoch``, ``step``,
    ``metrics`` found in the source (recorded in the manifest, shown by ``savegame ls``); ``metadata``:
    JSON-like facts about the source (its format, library versions); ``converted`` / ``skipped``: one
    line each on what was changed on the way (``model_state_dict -> item 'model'``) or left out, and why.
    """

    format: str
    items: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    """Where each item came from in the source (a key, a file), for the report."""


@dataclass(frozen=True)
class ItemSummary:
    """One saved item: its name, what it holds (``tensors`` arrays of ``bytes`` bytes) and where it came from."""

    name: str
    source: str
    tensors: int
    bytes: int


@dataclass(frozen=True)
class ImportReport:
    """What :func:`savegame.convert` wrote.

    ``source`` / ``dest``: the paths; ``format``: the source format (``torch``, ``lightning``,
    ``huggingface``, ``keras-weights``, ``keras``, ``safetensors``, ``run-directory``); ``items``: one
    :class:`ItemSummary` per saved item; ``checkpoints``: the checkpoint names written (one, or one per
    file of a run directory); ``progress``: the epoch, step and metrics recorded; ``converted`` /
    ``skipped``: what was changed on the way or left out, and why.
    """

    source: str
    dest: str
    format: str
    items: tuple[ItemSummary, ...]
    checkpoints: tuple[str, ...]
    progress: dict[str, Any]
    converted: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()

    @property
    def tensors(self) -> int:
        """Arrays saved, over all items."""
        return sum(i.tensors for i in self.items)

    @property
    def bytes(self) -> int:
        """Bytes of array data saved, over all items."""
        return sum(i.bytes for i in self.items)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-like data (``savegame import --json``)."""
        return {
            "source": self.source, "dest": self.dest, "format": self.format, "tensors": self.tensors,
            "bytes": self.bytes, "checkpoints": list(self.checkpoints), "progress": self.progress,
            "items": [{"name": i.name, "source": i.source, "tensors": i.tensors, "bytes": i.bytes} for i in self.items],
            "converted": list(self.converted), "skipped": list(self.skipped),
        }  # fmt: skip
