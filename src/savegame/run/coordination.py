"""Who decides: one process, or rank 0 of a ``torch.distributed`` job speaking for every rank.

The Checkpointer takes a handful of decisions that all processes of a job must share: whether this
call saves (a wall-clock policy can disagree between ranks by a millisecond), whether any rank was
preempted, which checkpoint to resume from, what retention deletes. A :class:`Coordinator` answers
them: :class:`Solo` in a single process (every answer is the local one), :class:`Ranks` in a process
group (rank 0's answer, broadcast; see :class:`savegame.distributed.RankContext`). The Checkpointer
never imports ``torch.distributed`` unless a process group is running.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from savegame.adapters import torch_if_imported

__all__ = ["Coordinator", "Ranks", "Solo", "coordinator_for"]

T = TypeVar("T")


class Coordinator(Protocol):
    """The decisions one process takes for all (see the module docstring)."""

    @property
    def distributed(self) -> bool:
        """True when several processes take part."""
        ...

    @property
    def is_coordinator(self) -> bool:
        """True on the process whose answers count (rank 0)."""
        ...

    def agree(self, value: Any) -> Any:
        """The coordinator's JSON-serializable ``value`` on every process."""
        ...

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is True on at least one."""
        ...

    def on_coordinator(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the coordinator only; its JSON-serializable result (or error) everywhere."""
        ...


class Solo:
    """A single process: every decision is its own."""

    distributed = False
    is_coordinator = True

    def agree(self, value: T) -> T:
        return value

    def any(self, flag: bool) -> bool:
        return bool(flag)

    def on_coordinator(self, fn: Callable[[], T]) -> T:
        return fn()


class Ranks:
    """The ranks of a process group; rank 0 decides (``context`` is a ``RankContext``)."""

    distributed = True

    def __init__(self, context: Any) -> None:
        self.context = context

    @property
    def is_coordinator(self) -> bool:
        return bool(self.context.is_coordinator)

    def agree(self, value: Any) -> Any:
        return self.context.broadcast_json(value)

    def any(self, flag: bool) -> bool:
        return any(self.context.all_gather_json(bool(flag)))

    def on_coordinator(self, fn: Callable[[], Any]) -> Any:
        return self.context.run_on_coordinator(fn)


def coordinator_for(group: Any = None) -> Coordinator:
    """:class:`Ranks` when a ``torch.distributed`` process group with more than one rank is running
    (``group``: which one; None: the default group), :class:`Solo` otherwise."""
    torch = torch_if_imported()
    if torch is None or group is False:
        return Solo()
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return Solo()
    from savegame.distributed import current_context

    context = current_context(group)
    return Ranks(context) if context.world_size > 1 else Solo()
