"""``savegame export`` and ``savegame plot``: files made from checkpoints."""

from __future__ import annotations

import argparse
import os

from savegame import api
from savegame.cli.common import (
    EXIT_OK,
    Context,
    UsageError,
    display_path,
    human_size,
    local_path,
    print_json,
    shown,
)
from savegame.cli.plot import plot_history
from savegame.cli.scan import resolve_checkpoint
from savegame.errors import ConfigError
from savegame.export import export_checkpoint, format_for, load_keras_model, select_item

__all__ = ["cmd_export", "cmd_plot"]


def cmd_export(args: argparse.Namespace, ctx: Context) -> int:
    """``savegame export CKPT --item model --to out.safetensors``."""
    try:
        fmt = format_for(args.to)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    if fmt == "keras" and not args.keras_model:
        raise UsageError(
            "exporting to .weights.h5 needs --keras-model MODULE:FUNCTION (a function returning the built "
            "Keras model): Keras's weights file follows the model's layer structure, which a checkpoint "
            "does not record"
        )
    if fmt != "keras" and args.keras_model:
        raise UsageError("--keras-model only applies to .weights.h5 exports")
    source = resolve_checkpoint(args.checkpoint, args.which)
    dest = local_path(args.to)
    if os.path.isdir(dest):
        raise UsageError(f"{dest} is a directory; --to takes a file name")
    if os.path.lexists(dest) and not args.force:
        raise UsageError(f"{dest} exists (use --force to replace it)")
    if not os.path.isdir(os.path.dirname(dest)):
        raise UsageError(f"{os.path.dirname(dest)}: no such directory")
    try:
        select_item(api.read_manifest(source), args.item)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    model = load_keras_model(args.keras_model) if args.keras_model else None
    result = export_checkpoint(source, dest, item=args.item, keras_model=model, overwrite=args.force)
    if args.json:
        print_json({"path": result.path, "format": result.format, "source": result.source, "item": result.item,
                    "tensors": result.tensors, "bytes": result.bytes, "skipped": list(result.skipped),
                    "converted": list(result.converted)}, ctx.out)  # fmt: skip
        return EXIT_OK
    ctx.print(f"wrote {display_path(result.path)} ({result.format}): {result.tensors} tensors of item {result.item!r}, "
              f"{human_size(result.bytes)}")  # fmt: skip
    if result.skipped:
        names = ", ".join(shown(s) for s in result.skipped[:8]) + (" ..." if len(result.skipped) > 8 else "")
        ctx.note(f"left out {len(result.skipped)} values that are not tensors: {names}")
    for line in result.converted:
        ctx.note(f"converted {shown(line)} (NumPy has no such dtype)")
    return EXIT_OK


def cmd_plot(args: argparse.Namespace, ctx: Context) -> int:
    """``savegame plot ROOT --metric val_loss -o history.png``."""
    summary = plot_history(args.root, local_path(args.output), metric=args.metric, mode=args.mode, axis=args.x)
    if args.json:
        print_json({"path": summary.path, "metric": summary.metric, "mode": summary.mode, "axis": summary.axis,
                    "best": summary.best, "saved": summary.count("saved"), "deleted": summary.count("deleted"),
                    "quarantined": summary.count("quarantined"), "deleted_unknown": summary.deleted_unknown,
                    "points": [{"name": p.name, "value": p.value, "epoch": p.epoch, "step": p.step,
                                "kind": p.kind, "is_best": p.is_best} for p in summary.points]}, ctx.out)  # fmt: skip
        return EXIT_OK
    parts = [f"{summary.count('saved')} saved"]
    if summary.best:
        parts.append(f"best {shown(summary.best)}")
    if summary.count("deleted"):
        parts.append(f"{summary.count('deleted')} deleted (earlier bests)")
    if summary.count("quarantined"):
        parts.append(f"{summary.count('quarantined')} quarantined")
    if summary.deleted_unknown:
        parts.append(f"{summary.deleted_unknown} deleted without recorded values (not shown)")
    what = f"{shown(summary.metric)} ({summary.mode}) over {summary.axis}"
    ctx.print(f"wrote {display_path(summary.path)}: {what}; {', '.join(parts)}")
    return EXIT_OK
