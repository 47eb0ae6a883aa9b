"""Ranks and the collectives savegame needs (:class:`RankContext`, :func:`current_context`), plus the
layout constants every multi-process checkpoint shares. No pickle: lengths and bytes travel as uint8 tensors.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from savegame._util.logs import get_logger
from savegame.errors import (
    CheckpointError,
    CorruptCheckpointError,
)

log = get_logger("savegame.distributed")

LAYOUT_ITEM = "savegame.distributed"
"""Plain item of every multi-process checkpoint: world size and which items are per-rank or sharded."""

LAYOUT_VERSION = 1
RANK_SUFFIX = re.compile(r"\.rank[0-9]+$")
NO_DIST_WARNING = ".*torch.distributed is disabled, unavailable or uninitialized.*"


class DistributedWarning(UserWarning):
    """A per-rank item could not be restored (resumed at a larger world size) or similar partial restores."""


# ---------------------------------------------------------------------------------------------------
# Ranks and the collectives savegame needs (no pickle: lengths and bytes travel as tensors)


@dataclass(frozen=True)
class RankContext:
    """Who this process is in a ``torch.distributed`` job, and the few collectives savegame issues.

    ``rank`` / ``world_size`` are within ``group`` (None: the default group); ``coordinator`` is the
    global rank of the group's rank 0, which commits, runs retention and decides names. Outside a process
    group (a single process) this is rank 0 of 1 and every collective returns at once.
    Bytes travel as a length tensor followed by a uint8 tensor, so nothing is pickled.
    """

    rank: int = 0
    world_size: int = 1
    group: Any = None
    coordinator: int = 0
    device: str = "cpu"
    initialized: bool = False

    @property
    def is_coordinator(self) -> bool:
        """True on the rank that begins and commits transactions and runs retention."""
        return self.rank == 0

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """The coordinator's ``data`` on every rank (others pass None)."""
        if self.world_size == 1:
            return data or b""
        payload = (data or b"") if self.is_coordinator else b""
        size = torch.tensor([len(payload)], dtype=torch.int64, device=self.device)
        dist.broadcast(size, src=self.coordinator, group=self.group)
        n = int(size.item())
        if n == 0:
            return b""
        if self.is_coordinator:
            buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.device)
        else:
            buf = torch.empty(n, dtype=torch.uint8, device=self.device)
        dist.broadcast(buf, src=self.coordinator, group=self.group)
        return payload if self.is_coordinator else bytes(buf.cpu().numpy().tobytes())

    def broadcast_json(self, obj: Any) -> Any:
        """The coordinator's JSON-serializable ``obj`` on every rank."""
        raw = json.dumps(obj, allow_nan=False).encode() if self.is_coordinator else None
        return json.loads(self.broadcast_bytes(raw).decode())

    def broadcast_text(self, text: str | None) -> str:
        """The coordinator's string on every rank (e.g. the checkpoint name it chose)."""
        return self.broadcast_bytes(text.encode() if text is not None else None).decode()

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order, on every rank."""
        if self.world_size == 1:
            return [data]
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.empty_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.group)
        lengths = [int(s.item()) for s in sizes]
        longest = max(lengths)
        if longest == 0:
            return [b""] * self.world_size
        buf = torch.zeros(longest, dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        buf = buf.to(self.device)
        bufs = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(bufs, buf, group=self.group)
        return [bytes(b[:n].cpu().numpy().tobytes()) for b, n in zip(bufs, lengths)]

    def all_gather_json(self, obj: Any) -> list[Any]:
        """Every rank's JSON-serializable ``obj``, in rank order, on every rank."""
        raw = json.dumps(obj, allow_nan=False).encode()
        return [json.loads(b.decode()) for b in self.all_gather_bytes(raw)]

    def barrier(self) -> None:
        """Wait until every rank got here (a no-op in a single process)."""
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def run_on_coordinator(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only and return its JSON-serializable result on every rank.

        For decisions one rank must take for all (which checkpoint to resume from, after verifying and
        quarantining): if ``fn`` raises, rank 0 re-raises its error and the others a
        :class:`CheckpointError` (a :class:`CorruptCheckpointError` if it was one) with its message.
        """
        reply: dict[str, Any] | None = None
        error: BaseException | None = None
        if self.is_coordinator:
            try:
                reply = {"value": fn()}
            except BaseException as exc:
                error = exc
                reply = {"error": describe(exc), "corrupt": isinstance(exc, CorruptCheckpointError)}
        reply = self.broadcast_json(reply)
        if error is not None:
            raise error
        assert reply is not None
        if "error" in reply:
            kind = CorruptCheckpointError if reply.get("corrupt") else CheckpointError
            raise kind(f"rank 0 failed: {reply['error']}")
        return reply["value"]


def current_context(group: Any = None) -> RankContext:
    """The :class:`RankContext` of this process (rank 0 of 1 when no process group is initialized)."""
    if not (dist.is_available() and dist.is_initialized()):
        return RankContext()
    backend = str(dist.get_backend(group))
    device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu"
    coordinator = dist.get_global_rank(group, 0) if group is not None else 0
    return RankContext(
        rank=dist.get_rank(group), world_size=dist.get_world_size(group), group=group,
        coordinator=coordinator, device=device, initialized=True,
    )  # fmt: skip


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def agree(ctx: RankContext, error: BaseException | None, what: str) -> None:
    """All ranks learn whether any rank failed ``what``; a failing rank re-raises its own error.

    The others raise a :class:`CheckpointError` naming the failed ranks, a
    :class:`CorruptCheckpointError` when one of them found the checkpoint damaged (so every rank can
    react alike, e.g. the Checkpointer falling back to an older checkpoint).
    """
    mine = None
    if error is not None:
        mine = {"message": describe(error), "corrupt": isinstance(error, CorruptCheckpointError)}
    reports = ctx.all_gather_json(mine)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(reports) if m is not None]
    if failed:
        text = f"{what} failed on another rank: " + "; ".join(f"rank {r}: {m['message']}" for r, m in failed)
        if any(m.get("corrupt") for _, m in failed):
            raise CorruptCheckpointError(text)
        raise CheckpointError(text)


@contextmanager
def dcp_call(what: str) -> Iterator[None]:
    """Around a call into torch DCP (``save`` / ``load``) on every rank: DCP's warning about running
    without a process group silenced; a savegame error that a rank raised inside DCP (DCP wraps it in
    a ``CheckpointException``, a BaseException, the same on every rank) raised as itself; anything else
    as ``CheckpointError(f"{what} failed: ...")``. Ctrl-C and ``SystemExit`` pass through."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=NO_DIST_WARNING)
            yield
    except (CheckpointError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        cause = checkpoint_cause(exc)
        if cause is not None:
            raise cause from exc
        raise CheckpointError(f"{what} failed: {exc}") from exc


def checkpoint_cause(exc: BaseException) -> CheckpointError | None:
    """The savegame error one rank raised inside DCP (DCP wraps it in a CheckpointException)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, Mapping):
        for failure in failures.values():
            inner = failure[0] if isinstance(failure, tuple) and failure else failure
            if isinstance(inner, CheckpointError):
                return inner
    return None
