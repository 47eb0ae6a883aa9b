"""What the crash harnesses share: state digests, the writer's event log, and the checks after a crash.

The writer (a killed child, or the power-loss replay) appends one line per event to a log it never
rewrites:

* ``S <name> <digest>`` -- a save of the state with this digest to checkpoint ``name`` is starting;
* ``C <name>`` -- that save returned (committed and durable, per savegame's contract);
* ``D <name>`` -- the writer starts deleting ``name`` (retention);
* ``R <step> <name>`` -- a (re)started writer resumed from ``name`` at ``step`` (``-`` for none).

:func:`check_root` compares a checkpoint root after a crash with that history. Nothing committed may
be lost, nothing visible may be partial or a mix of two saves, and cleanup must leave no debris.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

import savegame
from savegame.storage.base import STAGING_PREFIX, TRASH_PREFIX
from savegame.storage.local import LocalStorage


def _walk(obj: Any, h: Any) -> None:
    torch = _torch()
    if torch is not None and isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, np.ndarray | np.generic):
        a = np.ascontiguousarray(obj)
        h.update(f"A{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            _walk(k, h)
            _walk(obj[k], h)
    elif isinstance(obj, list | tuple):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for v in obj:
            _walk(v, h)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r};".encode())


def _torch() -> Any:
    import sys

    return sys.modules.get("torch")


def digest(state: Any) -> str:
    """A hash of nested state (dicts, lists, tensors, arrays, scalars) that ignores container classes.

    ``digest({"model": model.state_dict(), ...})`` in the writer equals ``digest(savegame.load(path))``
    when the checkpoint holds exactly that state.
    """
    h = xxhash.xxh3_128()
    _walk(state, h)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# The event log


class EventLog:
    """Append-only log of a writer's events; each line is one ``write(2)`` so a kill cannot tear it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def event(self, *fields: object) -> None:
        os.write(self._fd, (" ".join(str(f) for f in fields) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


def read_events(path: str) -> list[tuple[str, ...]]:
    """The complete lines of a log (a line cut by a kill cannot exist: lines are single writes)."""
    try:
        with open(path) as f:
            return [tuple(line.split()) for line in f.read().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


@dataclass
class NameHistory:
    """What the writer did to one checkpoint name."""

    saves: list[str] = field(default_factory=list)  # digests of S events, in order
    committed_digest: str | None = None  # digest of the save of the last C
    after_commit: list[str] = field(default_factory=list)  # S digests after the last C (in flight)
    deleted_after_commit: bool = False

    @property
    def must_exist(self) -> bool:
        return self.committed_digest is not None and not self.deleted_after_commit

    @property
    def allowed(self) -> set[str]:
        """Digests a visible checkpoint of this name may have: the last committed or a later one."""
        if self.committed_digest is None:
            return set(self.saves)
        return {self.committed_digest, *self.after_commit}


def histories(events: Iterable[tuple[str, ...]]) -> dict[str, NameHistory]:
    """Per checkpoint name, the saves, the last committed content and deletions."""
    out: dict[str, NameHistory] = {}
    pending: dict[str, str] = {}  # name -> digest of its S without C yet
    for ev in events:
        kind = ev[0]
        if kind == "S":
            name, dig = ev[1], ev[2]
            h = out.setdefault(name, NameHistory())
            h.saves.append(dig)
            h.after_commit.append(dig)
            pending[name] = dig
        elif kind == "C":
            name = ev[1]
            h = out.setdefault(name, NameHistory())
            dig = pending.pop(name, None)
            if dig is None:
                raise AssertionError(f"log: C {name} without a preceding S")
            h.committed_digest = dig
            h.after_commit = []
            h.deleted_after_commit = False
        elif kind == "D":
            h = out.setdefault(ev[1], NameHistory())
            h.deleted_after_commit = True
    return out


# ---------------------------------------------------------------------------------------------------
# The checks


@dataclass
class CheckResult:
    """What :func:`check_root` found. ``problems`` empty means nothing was lost or broken."""

    problems: list[str] = field(default_factory=list)
    visible: int = 0  # committed checkpoints found (before cleanup)
    verified: int = 0  # of which verified and matched a logged save
    in_flight_committed: int = 0  # visible checkpoints whose save had not returned yet (allowed)
    cleaned: int = 0  # debris folders cleanup removed
    restored: int = 0  # checkpoints cleanup put back (crash mid-overwrite without renameat2)
    newest_ok: bool = False
    previous_ok: bool | None = None  # None: there was no previous checkpoint


def hidden_debris(root: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(root) if n.startswith((STAGING_PREFIX, TRASH_PREFIX)))
    except FileNotFoundError:
        return []


def _check_visible(root: str, name: str, hist: NameHistory | None, result: CheckResult) -> bool:
    path = os.path.join(root, name)
    try:
        savegame.verify(path)
        dig = digest(savegame.load(path))
    except savegame.CheckpointError as exc:
        result.problems.append(f"{name}: visible but does not verify: {type(exc).__name__}: {exc}")
        return False
    if hist is None:
        result.problems.append(f"{name}: visible but the writer never saved this name")
        return False
    if dig not in hist.allowed:
        result.problems.append(
            f"{name}: content {dig[:12]} is neither its last committed save nor one in flight "
            f"(committed {str(hist.committed_digest)[:12]}, in flight {[d[:12] for d in hist.after_commit]})"
        )
        return False
    if dig != hist.committed_digest:
        result.in_flight_committed += 1
    return True


def check_root(root: str, events: list[tuple[str, ...]], *, cleanup: bool = True,
               expect_clean: bool = True) -> CheckResult:  # fmt: skip
    """Check a checkpoint root after a crash against the writer's log (see the module docstring).

    1. every committed checkpoint verifies and holds exactly a save the writer asked for under that
       name: its last committed one, or one still in flight (never an older one, never a mix);
    2. ``LocalStorage.cleanup()`` (what the next writer runs) removes all debris (``expect_clean``) and
       may only *restore* checkpoints, never remove one;
    3. every checkpoint whose save returned and that the writer did not start deleting is present.
    """
    result = CheckResult()
    hist = histories(events)
    storage = LocalStorage(root, create=False)
    before = storage.committed()
    result.visible = len(before)
    ok = {name: _check_visible(root, name, hist.get(name), result) for name in before}
    if cleanup:
        result.cleaned = len(storage.cleanup())
        after = storage.committed()
        gone = sorted(set(before) - set(after))
        if gone:
            result.problems.append(f"cleanup removed committed checkpoints {gone}")
        for name in sorted(set(after) - set(before)):
            result.restored += 1
            ok[name] = _check_visible(root, name, hist.get(name), result)
        debris = hidden_debris(root)
        if expect_clean and debris:
            result.problems.append(f"cleanup left debris {debris}")
    else:
        after = before
    for name, h in sorted(hist.items()):
        if h.must_exist and name not in after:
            result.problems.append(f"{name}: LOST: its save returned, but it is gone after the crash")
    result.verified = sum(ok.values())
    committed_names = sorted(n for n, h in hist.items() if h.must_exist)
    if committed_names:
        newest, previous = committed_names[-1], committed_names[-2] if len(committed_names) > 1 else None
        result.newest_ok = ok.get(newest, False)
        result.previous_ok = None if previous is None else ok.get(previous, False)
    else:
        result.newest_ok = True
    return result


def tree_bytes(root: str) -> tuple[int, int]:
    """(bytes in regular files, number of entries) under ``root``: the disk usage the tests compare."""
    total = entries = 0
    for dirpath, dirnames, filenames in os.walk(root):
        entries += len(dirnames) + len(filenames)
        for f in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:
                pass
    return total, entries
