"""``savegame import SRC DEST``: a checkpoint written by another tool -> a savegame checkpoint."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from savegame.cli.common import (
    EXIT_OK,
    Context,
    display_path,
    format_metric,
    human_size,
    local_path,
    print_json,
    shown,
)
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
        what = f"{item.tensors} tensors, {human_size(item.bytes)}" if item.tensors else "plain data"
        origin = f" (from {shown(item.source)})" if item.source != item.name else ""
        ctx.print(f"  item {shown(item.name)}: {what}{origin}")
    progress = _progress_text(report.progress)
    if progress:
        ctx.print(f"  progress: {progress}")
    for line in report.converted:
        ctx.note(f"converted: {shown(line)}")
    for line in report.skipped:
        ctx.note(f"skipped: {shown(line)}")
    return EXIT_OK


def _progress_text(progress: Mapping[str, Any]) -> str:
    """``epoch 5, step 1200, loss=0.133`` (metrics with 5 significant digits; names escaped)."""
    parts = []
    for key, value in progress.items():
        if key == "metrics" and isinstance(value, Mapping):
            parts += [f"{shown(k)}={format_metric(v) if isinstance(v, float) else shown(v)}" for k, v in value.items()]
        elif value is not None:
            parts.append(f"{shown(key)} {shown(value)}")
    return ", ".join(parts)
