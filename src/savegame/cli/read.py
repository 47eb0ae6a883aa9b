"""``savegame ls``, ``inspect`` and ``verify``: look at checkpoints without changing anything."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from savegame import api
from savegame.cli.common import (
    EXIT_OK,
    EXIT_PROBLEM,
    Cell,
    Context,
    UsageError,
    display_path,
    format_metric,
    format_value,
    human_age,
    human_seconds,
    human_size,
    iso_time,
    jsonable,
    print_json,
    render_table,
    shown,
)
from savegame.cli.scan import (
    Entry,
    Root,
    classify,
    distinct_bytes,
    entry_summary,
    resolve_checkpoint,
    scan_root,
    verify_checkpoint,
)
from savegame.errors import CheckpointError
from savegame.export import ArrayLeaf, dtype_name, flatten_skeleton
from savegame.format.manifest import Manifest

__all__ = ["cmd_inspect", "cmd_ls", "cmd_verify"]

MAX_METRIC_COLUMNS = 6


def _verify_entries(entries: list[Entry], ctx: Context, source: Root | None = None) -> None:
    """Hash-check every readable entry in place: status ``ok`` or ``corrupt`` with the problem. An
    entry of root ``source`` that a writer's retention deleted meanwhile is removed from ``entries``
    (gone, not damaged)."""
    todo = [e for e in entries if e.manifest is not None and e.status != "corrupt"]
    bar = ctx.progress("verifying", sum(e.size for e in todo))
    try:
        for entry in todo:
            try:
                verify_checkpoint(entry.ref, progress=bar.advance)
            except (CheckpointError, OSError) as exc:
                if source is not None and not source.still_committed(entry.name):
                    entries.remove(entry)
                    continue
                entry.status, entry.problem = "corrupt", str(exc)
            else:
                entry.status, entry.problem = "ok", None
    finally:
        bar.close()


def _metric_names(entries: list[Entry], monitor: str | None, chosen: str | None) -> tuple[list[str], int]:
    """The metric columns (monitor first, then first-seen order) and how many were left out."""
    if chosen:
        return [m.strip() for m in chosen.split(",") if m.strip()], 0
    names: list[str] = [monitor] if monitor else []
    for entry in entries:
        for name in entry.metrics:
            if name not in names:
                names.append(name)
    if monitor and not any(monitor in e.metrics for e in entries):
        names.remove(monitor)
    return names[:MAX_METRIC_COLUMNS], max(0, len(names) - MAX_METRIC_COLUMNS)


def cmd_ls(args: argparse.Namespace, ctx: Context) -> int:
    """``savegame ls ROOT``."""
    scan = scan_root(args.root, monitor=args.monitor, mode=args.mode)
    if args.verify:
        _verify_entries(scan.entries, ctx, scan.source)
    corrupt = [e for e in scan.entries if e.status == "corrupt"]
    if args.json:
        print_json({
            "root": scan.root, "monitor": scan.monitor, "mode": scan.mode, "verified": bool(args.verify),
            "best": scan.best.name if scan.best else None, "latest": scan.latest.name if scan.latest else None,
            "checkpoints": [entry_summary(e) for e in scan.entries],
            "quarantined": [entry_summary(e) for e in scan.quarantined],
            "leftovers": scan.leftovers,
        }, ctx.out)  # fmt: skip
        return EXIT_PROBLEM if corrupt else EXIT_OK
    listed = scan.entries + scan.quarantined
    if not listed:
        ctx.print(f"no checkpoints in {shown(scan.root)}")
        if scan.leftovers:
            ctx.print(f"{len(scan.leftovers)} staging/trash leftovers (remove with 'savegame gc {shown(scan.root)}')")
        return EXIT_OK
    metrics, hidden = _metric_names(listed, scan.monitor, args.metrics)
    st = ctx.style
    now = time.time()
    runs = len({e.run for e in scan.entries if e.manifest is not None}) > 1  # a run column tells them apart
    header = ["name", "epoch", "step", *metrics, "mark", "size", "blocked", "durable", "age", "status",
              *(["run"] if runs else [])]  # fmt: skip
    rows: list[list[Cell]] = []
    for e in listed:
        marks = " ".join(m for m, on in (("best", e.is_best), ("latest", e.is_latest), ("pinned", e.pinned)) if on)
        created = e.created
        timing = e.timing
        rows.append([
            (e.name, (lambda s: st.paint(s, "bold")) if e.is_best else str),
            "-" if e.epoch is None else str(e.epoch),
            "-" if e.step is None else str(e.step),
            *[format_metric(e.metrics.get(m)) for m in metrics],
            (marks, lambda s: st.paint(s, "cyan")),
            human_size(e.size) if e.manifest is not None else "-",
            human_seconds(timing.blocked if timing is not None else None),
            human_seconds(timing.durable if timing is not None else None),
            human_age(now - created.timestamp()) if created is not None else "-",
            (e.status, st.status),
            *([e.run or "-"] if runs else []),
        ])  # fmt: skip
    right = {1, 2, *range(3, 3 + len(metrics)), *range(4 + len(metrics), 8 + len(metrics))}
    ctx.print(render_table(header, rows, right=sorted(right), style=st))
    summary = [f"{len(scan.entries)} checkpoint{'s' if len(scan.entries) != 1 else ''}, "
               f"{human_size(distinct_bytes(scan.entries, local=not scan.source.remote))}"]  # fmt: skip
    if scan.best is not None and scan.monitor is not None:
        summary.append(f"best by {shown(scan.monitor)} ({scan.mode}): {shown(scan.best.name)}")
    elif scan.monitor is None:
        summary.append("no monitored metric recorded (use --monitor to rank)")
    if runs:
        run_ids = {e.run for e in scan.readable}
        summary.append(f"{len(run_ids)} runs" + (" (run -: no run id)" if None in run_ids else ""))
    if scan.quarantined:
        summary.append(f"{len(scan.quarantined)} quarantined")
    if scan.leftovers:
        summary.append(f"{len(scan.leftovers)} staging/trash leftovers (savegame gc)")
    if hidden:
        summary.append(f"{hidden} more metrics (choose with --metrics)")
    if not args.verify:
        summary.append("not hash-verified (--verify)")
    ctx.print("; ".join(summary))
    for e in corrupt:
        ctx.warn(f"{e.name} is corrupt: {e.problem}")
    return EXIT_PROBLEM if corrupt else EXIT_OK


# --------------------------------------------------------------------------------------------------
# inspect


def describe_checkpoint(path: str, manifest: Manifest, only: str | None) -> dict[str, Any]:
    """Everything ``savegame inspect`` shows, as JSON-ready data."""
    if only is not None and only not in manifest.items:
        raise UsageError(f"no item {only!r} in {path} (items: {', '.join(manifest.items)})")
    items: list[dict[str, Any]] = []
    tensors: list[dict[str, Any]] = []
    values: list[dict[str, Any]] = []
    for name, entry in manifest.items.items():
        if only is not None and name != only:
            continue
        reader = api.open_item(path, manifest, name, verify=False)
        seen: dict[str, str] = {}
        count = nbytes = 0
        for leaf_path, value in flatten_skeleton(entry.skeleton, (name,)):
            dotted = ".".join(leaf_path)
            if isinstance(value, ArrayLeaf):
                info = reader.tensors.get(value.key) if reader is not None else None
                if info is None:
                    raise CheckpointError(f"{path}: {dotted}: array {value.key!r} is not in the item's tensor file")
                shared = seen.get(value.key)
                seen.setdefault(value.key, dotted)
                count += 1
                nbytes += 0 if shared else info.nbytes
                tensors.append({"item": name, "path": dotted, "key": value.key, "kind": value.node.get("$"),
                                "dtype": dtype_name(info.code, value.logical), "shape": value.shape(info.shape),
                                "bytes": info.nbytes, "shared_with": shared})  # fmt: skip
            else:
                values.append({"item": name, "path": dotted, "value": value})
        items.append({"name": name, "kind": entry.kind, "file": entry.file, "tensors": count, "bytes": nbytes})
    return {
        "path": path,
        "name": path.rstrip("/").rpartition("/")[2],
        "created": manifest.created,
        "format_version": manifest.format_version,
        "hash_algorithm": manifest.hash_algorithm,
        "hash_chunk_bytes": manifest.hash_chunk_bytes,
        "versions": dict(manifest.versions),
        "metadata": manifest.metadata,
        "progress": manifest.progress,
        "size": manifest.total_bytes,
        "linked_bytes": manifest.linked_bytes,
        "files": {n: {"bytes": f.bytes, "hash": f.hash} for n, f in manifest.files.items()},
        "items": items,
        "tensors": tensors,
        "values": values,
    }


def _progress_lines(progress: Any) -> list[tuple[str, str]]:
    if not isinstance(progress, dict):
        return []
    position = ", ".join(f"{k} {progress[k]}" for k in ("epoch", "step", "sequence") if progress.get(k) is not None)
    parts = [position] if position else []
    metrics = progress.get("metrics")
    if isinstance(metrics, dict) and metrics:
        parts.append(" ".join(f"{k}={format_metric(v) if isinstance(v, float) else v}" for k, v in metrics.items()))
    flags = [k for k in ("final", "weights_only", "pinned") if progress.get(k) is True]
    if flags:
        parts.append(", ".join(flags))
    lines = [("progress", "; ".join(parts) or "-")]
    best = progress.get("best")
    if isinstance(best, dict) and best.get("name"):
        lines.append(("best", f"{best.get('name')} ({best.get('monitor')}={format_metric(best.get('value'))}, "
                              f"{best.get('mode')})"))  # fmt: skip
    return lines


def cmd_inspect(args: argparse.Namespace, ctx: Context) -> int:
    """``savegame inspect CKPT``."""
    path = resolve_checkpoint(args.checkpoint, args.which)
    if args.verify:
        manifest = api.read_manifest(path)
        bar = ctx.progress("verifying", manifest.total_bytes)
        try:
            manifest = verify_checkpoint(path, progress=bar.advance)
        finally:
            bar.close()
    else:
        manifest = api.read_manifest(path)
    info = describe_checkpoint(path, manifest, args.item)
    info["verified"] = bool(args.verify)
    if args.json:
        print_json(info, ctx.out)
        return EXIT_OK
    st = ctx.style
    age = human_age(time.time() - manifest.created.timestamp())
    head: list[tuple[str, str]] = [
        ("checkpoint", display_path(path)),
        ("created", f"{iso_time(manifest.created)} ({age} ago)"),
        ("format", f"savegame v{manifest.format_version}, {manifest.hash_algorithm}; {len(manifest.files)} files, "
                   f"{human_size(manifest.total_bytes)}" + _linked_note(manifest)
                   + (", all hashes verified" if args.verify else "")),
        ("versions", ", ".join(f"{k} {v}" for k, v in manifest.versions.items())),
        *_progress_lines(manifest.progress),
        ("metadata", json.dumps(jsonable(manifest.metadata), sort_keys=True)[:300] if manifest.metadata else "-"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in head)
    for key, value in head:
        ctx.print(f"{st.paint(key.ljust(width), 'bold')}  {shown(value)}")
    ctx.print()
    ctx.print(st.paint("items", "bold", "cyan"))
    item_rows: list[list[Cell]] = [
        [i["name"], i["kind"], i["file"] or "(in manifest)", str(i["tensors"]), human_size(i["bytes"])]
        for i in info["items"]
    ]
    ctx.print(_indent(render_table(["name", "kind", "file", "tensors", "bytes"], item_rows, right=[3, 4], style=st)))
    if info["tensors"]:
        ctx.print()
        ctx.print(st.paint("tensors", "bold", "cyan"))
        rows: list[list[Cell]] = []
        for t in info["tensors"]:
            note = f"shares storage with {t['shared_with']}" if t["shared_with"] else ""
            rows.append([t["path"], t["dtype"], str(t["shape"]), human_size(t["bytes"]), note])
        ctx.print(_indent(render_table(["path", "dtype", "shape", "bytes", ""], rows, right=[3], style=st)))
    if info["values"]:
        ctx.print()
        ctx.print(st.paint("values (not tensors)", "bold", "cyan"))
        for v in info["values"]:
            ctx.print(f"  {shown(v['path'])} = {format_value(v['value'])}")
    return EXIT_OK


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


# --------------------------------------------------------------------------------------------------
# verify


def cmd_verify(args: argparse.Namespace, ctx: Context) -> int:
    """``savegame verify ROOT|CKPT``."""
    kind, path = classify(args.path)
    if kind == "missing":  # ROOT/latest, ROOT/best
        kind, path = "checkpoint", resolve_checkpoint(args.path)
    quarantined: list[str] = []
    if kind == "checkpoint":
        name = path.rstrip("/").rpartition("/")[2]
        targets = [Entry(name=name, path=path, manifest=None, ref=path)]
        try:
            targets[0].manifest = api.read_manifest(path)
        except (CheckpointError, OSError) as exc:
            targets[0].status, targets[0].problem = "corrupt", str(exc)
    elif kind == "root":
        scan = scan_root(args.path)
        path = scan.root
        targets = [Entry(name=e.name, path=e.path, manifest=e.manifest, ref=e.ref, problem=e.problem,
                         status="corrupt" if e.manifest is None else "unverified")
                   for e in scan.entries]  # fmt: skip
        quarantined = [e.name for e in scan.quarantined]
    else:
        raise UsageError(f"{path}: no such checkpoint or directory" if kind == "missing"
                         else f"{path}: not a checkpoint or a directory of checkpoints")  # fmt: skip
    _verify_entries(targets, ctx, scan.source if kind == "root" else None)
    corrupt = [e for e in targets if e.status == "corrupt"]
    if args.json:
        print_json({
            "path": path,
            "ok": bool(targets) and not corrupt,
            "checkpoints": [{"name": e.name, "path": e.path, "status": e.status, "problem": e.problem,
                             "files": e.files, "bytes": e.size} for e in targets],
            "quarantined": quarantined,
        }, ctx.out)  # fmt: skip
    else:
        st = ctx.style
        width = max((len(shown(e.name)) for e in targets), default=0)
        for e in targets:
            if e.status == "ok":
                detail = f"{e.files} files, {human_size(e.size)}"
                ctx.print(f"{st.paint('ok     ', 'green')}  {shown(e.name).ljust(width)}  {detail}")
            else:
                ctx.print(f"{st.paint('CORRUPT', 'red', 'bold')}  {shown(e.name).ljust(width)}  {shown(e.problem)}")
        if quarantined:
            names = ", ".join(shown(q) for q in quarantined)
            ctx.print(f"{len(quarantined)} quarantined checkpoint(s) not verified: {names}")
        if targets:
            ctx.print(f"{len(targets)} checkpoint{'s' if len(targets) != 1 else ''} verified: "
                      f"{len(targets) - len(corrupt)} ok, {len(corrupt)} corrupt")  # fmt: skip
    if not targets:
        ctx.note(f"error: no checkpoints to verify in {shown(path)}")
        return EXIT_PROBLEM
    if corrupt:
        ctx.note(f"error: corrupt: {', '.join(shown(e.name) for e in corrupt)}")
        return EXIT_PROBLEM
    return EXIT_OK


def _linked_note(manifest: Manifest) -> str:
    """For an incremental checkpoint: how much of its size it shares with earlier ones (hard links)."""
    linked = manifest.linked_bytes
    return f" ({human_size(linked)} of it shared with earlier checkpoints)" if linked else ""
