"""The one report of how a checkpoint matched the live objects it was loaded into.

Every loader fills a :class:`LoadReport`: ``savegame.load`` into a target (``capture.restore_items``),
the torch adapter's module restore, Keras's ``KerasState.load_state_dict`` and distributed loads.
Before, there were three types with three spellings of the same fields (``missing_keys`` /
``missing``, ``loaded`` / ``loaded_keys``); the old names stay as aliases
(:class:`savegame.adapters.torch.ModuleReport`, :class:`savegame.adapters.keras.KerasLoadReport`, and
the ``missing`` / ``unexpected`` / ``mismatched`` / ``loaded_keys`` attributes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LoadReport"]


@dataclass
class LoadReport:
    """The result of loading into live objects.

    ``state``: the decoded values of the items that hold no live object: those of the checkpoint that were
    not in the target (e.g. ``epoch``) and the plain items of the target, which were also updated in place
    (see :func:`savegame.engine.capture.restore_items`), by item.
    ``missing_keys`` / ``unexpected_keys``: qualified names (``model.fc.bias``; Keras: ``section/path``)
    only in the target / only in the checkpoint. ``mismatched_keys``: ``(name, checkpoint shape, target
    shape)`` (a list's shape is its length). ``mismatched_types``: ``(name, checkpoint type, target type)``
    where the checkpoint holds something that cannot go into the target (a number where the target has a
    dict); only non-strict loads get that far. ``loaded``: what was restored. ``manifest``: the
    checkpoint's manifest. Keras only: ``by_structure``, sections whose paths differed only by automatic
    name suffixes and were paired in order; ``notes``, anything else worth knowing.
    """

    state: dict[str, Any] = field(default_factory=dict)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    manifest: Any = field(default=None, repr=False)
    mismatched_types: list[tuple[str, str, str]] = field(default_factory=list)
    by_structure: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """True when everything in the target was found and matched."""
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_keys or self.mismatched_types)

    def describe(self, where: str = "") -> str:
        """A human-readable summary of what differs (empty when clean), after ``where: `` if given."""
        parts = []
        if self.missing_keys:
            parts.append(f"missing from the checkpoint: {_short(self.missing_keys)}")
        if self.unexpected_keys:
            parts.append(f"not in the model: {_short(self.unexpected_keys)}")
        if self.mismatched_keys:
            shapes = [f"{k} (checkpoint {list(a)} vs model {list(b)})" for k, a, b in self.mismatched_keys]
            parts.append(f"shape mismatch: {_short(shapes)}")
        if self.mismatched_types:
            types = [f"{k} (checkpoint {a} vs target {b})" for k, a, b in self.mismatched_types]
            parts.append(f"type mismatch: {_short(types)}")
        text = "; ".join(parts)
        return f"{where}: {text}" if where else text

    # The Keras report's and the module report's old field names.

    @property
    def missing(self) -> list[str]:
        """Alias of :attr:`missing_keys` (the old Keras report's name)."""
        return self.missing_keys

    @missing.setter
    def missing(self, value: list[str]) -> None:
        self.missing_keys = value

    @property
    def unexpected(self) -> list[str]:
        """Alias of :attr:`unexpected_keys` (the old Keras report's name)."""
        return self.unexpected_keys

    @unexpected.setter
    def unexpected(self, value: list[str]) -> None:
        self.unexpected_keys = value

    @property
    def mismatched(self) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
        """Alias of :attr:`mismatched_keys` (the old Keras report's name)."""
        return self.mismatched_keys

    @mismatched.setter
    def mismatched(self, value: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> None:
        self.mismatched_keys = value

    @property
    def loaded_keys(self) -> list[str]:
        """Alias of :attr:`loaded` (the old module report's name)."""
        return self.loaded

    @loaded_keys.setter
    def loaded_keys(self, value: list[str]) -> None:
        self.loaded = value


def _short(names: Sequence[str], n: int = 8) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more
