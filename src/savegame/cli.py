"""The ``savegame`` command line (subcommands are added by the CLI module's own issue)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import CheckpointError


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``savegame`` console script; returns the exit code (0 ok, 1 problem, 2 usage)."""
    parser = argparse.ArgumentParser(prog="savegame", description="Crash-safe, verified training checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="train on digits, kill -9 mid-epoch, resume, show identical results", add_help=False)
    p_verify = sub.add_parser("verify", help="check every hash of a checkpoint")
    p_verify.add_argument("path")
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        import importlib

        demo = importlib.import_module("savegame.demo")
        return int(demo.main(rest))
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        from .api import verify

        manifest = verify(args.path)
    except CheckpointError as exc:
        print(f"savegame: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {args.path} ({len(manifest.files)} files, {manifest.total_bytes} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
