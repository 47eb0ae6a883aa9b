"""``savegame prune`` and ``savegame gc``: the commands that delete things (each with ``--dry-run``).

``prune`` applies ``--keep-last`` / ``--keep-best`` to each training run of the root separately (the
run ids in the manifests; checkpoints older than run ids count as one run) and never deletes the
newest checkpoint, a run's newest or best, nor any best the manifests record. A ``--monitor`` that no
checkpoint recorded is an error (exit 2) and nothing is deleted.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
import shutil
import socket
import time
import uuid
from typing import Any

from savegame.cli.common import (
    EXIT_OK,
    Context,
    UsageError,
    format_metric,
    human_age,
    human_size,
    is_checkpoint_dir,
    local_path,
    parse_duration,
    print_json,
    shown,
)
from savegame.cli.scan import (
    Entry,
    Root,
    check_monitor_recorded,
    doomed_by_retention,
    scan_root,
    stored_files,
)
from savegame.errors import CheckpointError
from savegame.run.index import recorded_best_names
from savegame.storage import is_url
from savegame.storage.base import QUARANTINE_PREFIX, STAGING_PREFIX, TRASH_PREFIX
from savegame.storage.local import leftover_kind, staging_is_live

__all__ = ["cmd_gc", "cmd_prune", "gc_plan"]


def _describe(entry: Entry, monitor: str | None) -> str:
    parts = []
    if entry.epoch is not None:
        parts.append(f"epoch {entry.epoch}")
    if entry.step is not None:
        parts.append(f"step {entry.step}")
    if monitor is not None and monitor in entry.metrics:
        parts.append(f"{shown(monitor)}={format_metric(entry.metrics[monitor])}")
    return ", ".join(parts)


def cmd_prune(args: argparse.Namespace, ctx: Context) -> int:
    """``savegame prune ROOT --keep-last N --keep-best K``."""
    if args.keep_last is None and args.keep_best is None:
        raise UsageError("prune needs --keep-last N and/or --keep-best K (what to keep)")
    for flag, value in (("--keep-last", args.keep_last), ("--keep-best", args.keep_best)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    scan = scan_root(args.root, monitor=args.monitor, mode=args.mode)
    root = scan.root
    if args.keep_best is not None and scan.monitor is None:
        raise UsageError("--keep-best needs --monitor METRIC (no monitored metric is recorded in the checkpoints)")
    check_monitor_recorded(scan)  # a misspelt --monitor would rank nothing and let the real best go
    doomed = doomed_by_retention(scan, keep_last=args.keep_last, keep_best=args.keep_best)
    frees = _bytes_freed(scan.readable, doomed, local=not scan.source.remote)  # before anything is deleted
    deleted: list[str] = []
    failed: list[str] = []
    if not args.dry_run and doomed and not scan.source.remote:
        from savegame.run.checkpointer import Checkpointer

        # The Checkpointer takes the root's writer lock: a training run writing into ROOT makes this fail
        # (LockedError, naming it) rather than two processes applying retention at once.
        with Checkpointer(root, keep_last=args.keep_last, keep_best=args.keep_best, monitor=scan.monitor,
                          mode=scan.mode or "auto", restart="off") as checkpointer:  # fmt: skip
            deleted = checkpointer.prune(dry_run=False, all_runs=True)
        failed = [e.name for e in doomed if e.name not in deleted]
    elif not args.dry_run and doomed:
        # The Checkpointer works on local directories; a remote root gets the same selection, deleted
        # through its storage (the manifest, the commit marker, goes first).
        for e in doomed:
            try:
                scan.source.storage.delete(e.name)
            except (CheckpointError, OSError) as exc:
                ctx.warn(f"could not delete {e.name}: {exc}")
                failed.append(e.name)
            else:
                deleted.append(e.name)
    names = {e.name for e in doomed} if args.dry_run else set(deleted)
    kept = [e for e in scan.readable if e.name not in names]
    freed = sum(size for name, size in frees.items() if name in names)
    if args.json:
        print_json({
            "root": root, "dry_run": bool(args.dry_run), "monitor": scan.monitor, "mode": scan.mode,
            "deleted": [] if args.dry_run else deleted,
            "would_delete": [e.name for e in doomed] if args.dry_run else [],
            "kept": [e.name for e in kept], "best": scan.best.name if scan.best else None,
            "latest": scan.latest.name if scan.latest else None, "bytes_freed": 0 if args.dry_run else freed,
        }, ctx.out)  # fmt: skip
        return EXIT_OK
    st = ctx.style
    verb = "would delete" if args.dry_run else "deleted"
    ours = [e for e in scan.readable if e.ours]
    recorded = recorded_best_names((e.run, e.recorded_best) for e in ours)
    run_newest = {e.run: e.name for e in ours}  # oldest first: the last one of each run stays
    width = max((len(shown(e.name)) for e in scan.readable), default=0)
    for e in scan.readable:
        describe = _describe(e, scan.monitor)
        if e.name in names:
            ctx.print(f"{st.paint(verb.ljust(12), 'red')}  {shown(e.name).ljust(width)}  {describe}".rstrip())
            continue
        reasons = [r for r, on in (("best", e.is_best), ("latest", e.is_latest), ("pinned", e.pinned),
                                   ("best of its run", e.name in recorded and not e.is_best),
                                   ("newest of its run", e.ours and run_newest.get(e.run) == e.name
                                    and not e.is_latest),
                                   ("not written by a Checkpointer", not e.ours)) if on]  # fmt: skip
        note = f"  [{', '.join(reasons)}]" if reasons else ""
        ctx.print(f"{'keep'.ljust(12)}  {shown(e.name).ljust(width)}  {describe}{note}".rstrip())
    if args.dry_run:
        ctx.print(f"dry run: would delete {len(doomed)} of {len(scan.readable)} checkpoints "
                  f"(frees {human_size(freed)}); nothing was deleted")  # fmt: skip
    else:
        ctx.print(f"deleted {len(deleted)} of {len(scan.readable)} checkpoints, freed {human_size(freed)}")
    for name in failed:
        ctx.warn(f"{name} was not deleted (changed meanwhile, or deletion failed)")
    return EXIT_OK


def _bytes_freed(entries: list[Entry], doomed: list[Entry], *, local: bool) -> dict[str, int]:
    """How many bytes deleting each of ``doomed`` frees, by name. Locally, a data file that is a hard link
    of one a kept checkpoint also has (an incremental checkpoint's linked file) frees nothing, and one
    inode shared by several doomed checkpoints is counted once; a remote checkpoint's files are its own."""
    if not local:
        return {e.name: e.size for e in doomed}
    doomed_names = {e.name for e in doomed}
    kept: set[tuple[int, int]] = set()
    counted: set[tuple[int, int]] = set()
    frees: dict[str, int] = {}
    for e in sorted(entries, key=lambda e: e.name in doomed_names):  # the kept ones first
        total = 0
        for inode, size in stored_files(e):
            if e.name not in doomed_names:
                kept.add(inode)
            elif inode not in kept and inode not in counted:
                counted.add(inode)
                total += size
        if e.name in doomed_names:
            frees[e.name] = total
    return frees


# --------------------------------------------------------------------------------------------------
# gc


_QUARANTINE_STAMP = re.compile(r"-(\d{8}T\d{6})-[0-9a-f]{6}$")


def _quarantine_time(name: str, path: str) -> float:
    """When a checkpoint was quarantined: the UTC stamp in its folder name, else the folder's mtime."""
    match = _QUARANTINE_STAMP.search(name)
    if match:
        try:
            when = _dt.datetime.strptime(match.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=_dt.timezone.utc)
            return when.timestamp()
        except ValueError:
            pass
    try:
        return os.stat(path).st_mtime
    except OSError:
        return time.time()


def gc_plan(root: str, *, older_than: float, now: float | None = None) -> list[dict[str, Any]]:
    """What ``gc`` removes in ``root``: ``[{"name", "kind", "action", "reason"}]``.

    Staging folders of writers that are no longer running (this host: the pid is gone; another host:
    untouched for a day) and leftover trash are removed, exactly as ``LocalStorage.cleanup`` does (a
    trash folder holding the only copy of an overwritten checkpoint is put back instead); quarantined
    checkpoints are removed once quarantined for longer than ``older_than`` seconds.
    """
    now = time.time() if now is None else now
    host = socket.gethostname()
    plan: list[dict[str, Any]] = []
    for e in sorted(os.scandir(root), key=lambda d: d.name):
        kind = leftover_kind(e)
        if kind == "staging":
            if not staging_is_live(e.name[len(STAGING_PREFIX) :], host, e, now=now):
                plan.append({"name": e.name, "kind": "staging", "action": "remove",
                             "reason": "unfinished save of a writer that is no longer running"})  # fmt: skip
        elif kind == "trash":
            rest = e.name[len(TRASH_PREFIX) :]
            original = rest.rsplit("-", 1)[0]
            restore = (not rest.startswith("del-") and bool(original) and not e.is_symlink()
                       and not os.path.lexists(os.path.join(root, original))
                       and os.path.isfile(os.path.join(e.path, "manifest.json")))  # fmt: skip
            plan.append({"name": e.name, "kind": "trash", "action": f"restore as {original}" if restore else "remove",
                         "reason": "an interrupted overwrite's only copy" if restore else "leftover of a deletion"})
        elif e.name.startswith(QUARANTINE_PREFIX) and e.is_dir(follow_symlinks=False):
            age = now - _quarantine_time(e.name, e.path)
            if older_than <= 0 or age > older_than:  # 0: every one (a name's clock may be ahead of ours)
                plan.append({"name": e.name, "kind": "quarantined", "action": "remove",
                             "reason": f"quarantined {human_age(age)} ago"})  # fmt: skip
    return plan


def cmd_gc(args: argparse.Namespace, ctx: Context) -> int:
    """``savegame gc ROOT [--older-than 7d] [--dry-run]``."""
    older_than = parse_duration(args.older_than)
    if is_url(args.root):
        return _gc_remote(args, ctx)
    root = local_path(args.root)
    if not os.path.isdir(root):
        raise UsageError(f"{root}: no such directory")
    if is_checkpoint_dir(root):
        raise UsageError(f"{root} is a checkpoint; gc cleans a directory of checkpoints")
    if args.dry_run:
        plan = gc_plan(root, older_than=older_than)
    else:
        from savegame.run.lock import WriterLock
        from savegame.storage.local import LocalStorage

        # Under the root's writer lock: a training run writing into ROOT makes gc fail (LockedError naming
        # it) instead of racing it, e.g. putting back a trash folder while it is mid-overwrite.
        with WriterLock(root):
            plan = gc_plan(root, older_than=older_than)
            done = _gc_apply(root, plan, LocalStorage(root, create=False).cleanup())
    steps = plan if args.dry_run else done
    if args.json:
        print_json({"root": root, "dry_run": bool(args.dry_run), "older_than_seconds": older_than,
                    "actions": steps}, ctx.out)  # fmt: skip
        return EXIT_OK
    for step in steps:
        if args.dry_run:
            action = f"would {step['action']}"
        else:
            action = step["action"].replace("remove", "removed", 1).replace("restore", "restored", 1)
        ctx.print(f"{shown(action):<16}  {shown(step['name'])}  ({shown(step['reason'])})")
    if not steps:
        ctx.print(f"nothing to clean in {shown(root)}")
    elif args.dry_run:
        ctx.print(f"dry run: {len(steps)} to clean; nothing was removed")
    else:
        ctx.print(f"cleaned {len(steps)} in {shown(root)}")
    return EXIT_OK


def _gc_apply(root: str, plan: list[dict[str, Any]], cleaned_names: list[str]) -> list[dict[str, Any]]:
    """Carry out ``plan`` after ``LocalStorage.cleanup`` removed ``cleaned_names``; return what was done."""
    cleaned = set(cleaned_names)
    done: list[dict[str, Any]] = []
    for step in plan:
        if step["kind"] in ("staging", "trash"):
            if step["name"] in cleaned or not os.path.lexists(os.path.join(root, step["name"])):
                done.append(step)
            continue
        path = os.path.join(root, step["name"])
        trash = os.path.join(root, f"{TRASH_PREFIX}del-{step['name'].lstrip('.')}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            continue
        shutil.rmtree(trash, ignore_errors=True)
        done.append(step)
    for name in sorted(cleaned - {s["name"] for s in plan}):
        done.append({"name": name, "kind": "staging", "action": "remove", "reason": "leftover"})
    return done


def _gc_remote(args: argparse.Namespace, ctx: Context) -> int:
    """``gc`` on an fsspec URL: the storage's own cleanup (interrupted uploads and deletes)."""
    if args.dry_run:
        raise UsageError("--dry-run is not available for remote roots (their cleanup decides while listing)")
    root = Root.open(args.root)
    removed = list(root.storage.cleanup())
    if args.json:
        print_json({"root": root.location, "dry_run": False, "actions": [
            {"name": n, "kind": "staging", "action": "remove", "reason": "interrupted upload or delete"}
            for n in removed]}, ctx.out)  # fmt: skip
        return EXIT_OK
    for name in removed:
        ctx.print(f"{'removed':<16}  {shown(name)}  (interrupted upload or delete)")
    where = shown(root.location)
    ctx.print(f"cleaned {len(removed)} in {where}" if removed else f"nothing to clean in {where}")
    if root.storage.quarantined():
        ctx.note("quarantined checkpoints of remote roots are not removed by gc; delete them with your storage tools")
    return EXIT_OK
