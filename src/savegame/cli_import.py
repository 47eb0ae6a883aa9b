"""``savegame import SRC DEST``: a checkpoint written by another tool -> a savegame checkpoint."""

from __future__ import annotations

import argparse

from savegame.cli_common import EXIT_OK, Context, display_path, human_size, local_path, print_json, shown
from savegame.importers import convert

__all__ = ["cmd_import"]


def cmd_import(args: argparse.Namespace, ctx: Context) -> int:
    """Convert, then print what was found: items, tensor counts and bytes, what was converted or left out."""
    model = None
    if args.keras_model:
        from savegame.export import load_keras_model

        model = load_keras_model(args.keras_model)
    report = convert(local_path(args.src), local_path(args.dest), template=args.template, mode=args.mode,
                     keras_model=model)  # fmt: skip
    if args.json:
        print_json(report.to_json(), ctx.out)
        return EXIT_OK
    where = f"{len(report.checkpoints)} checkpoints in " if report.format == "run-directory" else ""
    ctx.print(f"imported {display_path(report.source)} ({report.format}) -> {where}{display_path(report.dest)}: "
              f"{report.tensors} tensors, {human_size(report.bytes)}")  # fmt: skip
    for item in report.items:
        ctx.print(f"  {shown(item.name)}: {item.tensors} tensors, {human_size(item.bytes)} (from {shown(item.source)})")
    progress = {k: v for k, v in report.progress.items() if v is not None}
    if progress:
        ctx.print("  progress: " + ", ".join(f"{shown(k)}={shown(v)}" for k, v in progress.items()))
    for line in report.converted:
        ctx.note(f"converted: {shown(line)}")
    for line in report.skipped:
        ctx.note(f"skipped: {shown(line)}")
    return EXIT_OK
