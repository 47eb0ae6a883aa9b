"""The ``savegame`` command line: look at, check, compare, clean up and export checkpoints.

Subcommands (``savegame COMMAND --help`` for each): ``ls``, ``inspect``, ``verify``, ``diff``, ``prune``,
``export``, ``import``, ``plot``, ``gc`` and ``demo``. They live in ``read.py`` (ls, inspect, verify),
``diff.py``, ``manage.py`` (prune, gc), ``output.py`` (export, plot) and ``imports.py`` (import) of this package;
this module builds the
parser and turns errors into one line and an exit status:

* 0: success (``verify``: everything intact; ``diff``: the same state);
* 1: a problem was found (a corrupt checkpoint, checkpoints that differ) or an operation failed;
* 2: usage error (bad options, or a path that does not exist or is not what the command expects).

Colour only on a terminal and never with ``NO_COLOR`` set; progress bars only on a terminal. Errors are
one line, ``savegame: error: ...``; ``--debug`` adds the traceback. Names, keys, metrics and versions come
from files anyone could have written: every line printed shows their control characters as escapes
(:func:`savegame.cli.common.terminal_text`); ``--json`` output is pure ASCII JSON.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

from savegame._util.logs import get_logger
from savegame.cli.common import (
    EXIT_OK,
    EXIT_PROBLEM,
    EXIT_USAGE,
    CLIError,
    ColorChoice,
    Context,
    UsageError,
    shown,
    style_for,
    terminal_text,
)
from savegame.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    InvalidNameError,
    NotACheckpointError,
    SourceFormatError,
)

__all__ = ["build_parser", "main"]

EXIT_CODES = """\
exit status:
  0  success (verify: all intact; diff: same state)
  1  a problem was found (a corrupt checkpoint; diff: they differ) or the operation failed
  2  usage error: bad options, or a path that does not exist or is not what the command expects"""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``savegame: error: ... (see 'savegame ls --help')``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"savegame: error: {shown(message)} (see '{shown(self.prog)} --help')\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=100)


def _epilog(examples: str, notes: str = "") -> str:
    text = "examples:\n" + "\n".join(f"  {line}" for line in examples.strip().splitlines())
    if notes:
        text += "\n\n" + notes.strip()
    return text + "\n\n" + EXIT_CODES


def _common() -> argparse.ArgumentParser:
    """Options every subcommand accepts (also before the subcommand)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of errors")  # fmt: skip
    parent.add_argument("--color", choices=("auto", "always", "never"), default=argparse.SUPPRESS,
                        help="colour output: auto (default: on a terminal, unless NO_COLOR is set), always, never")
    parent.add_argument("--no-color", dest="color", action="store_const", const="never", default=argparse.SUPPRESS,
                        help="same as --color never")  # fmt: skip
    return parent


def _add(
    sub: Any, name: str, summary: str, description: str, examples: str, notes: str = ""
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, description=description, epilog=_epilog(examples, notes), parents=[_common()],
        formatter_class=_Formatter,
    )
    return parser


def _mode_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--mode", choices=("auto", "min", "max"), default="auto",
                        help=f"whether lower or higher {what} is better (auto: from the name, like the library)")


def _root_argument(parser: argparse.ArgumentParser, help: str = "directory of checkpoints") -> None:
    parser.add_argument("root", metavar="ROOT", help=help)


def _checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """The CKPT argument of the commands that read one checkpoint (resolved by ``common``)."""
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory, ROOT/latest, ROOT/best, or ROOT")


def _which_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--which", metavar="NAME", help="with a ROOT: latest (default), best or a checkpoint name")


def _json_option(parser: argparse.ArgumentParser, help: str = "print JSON") -> None:
    parser.add_argument("--json", action="store_true", help=help)


def build_parser() -> argparse.ArgumentParser:
    """The ``savegame`` argument parser (``demo`` passes its options on to :func:`savegame.cli.demo.main`)."""
    parser = _Parser(
        prog="savegame",
        description="Crash-safe, verified, pickle-free training checkpoints: look at, check, compare, clean up "
        "and export them.",
        epilog=_epilog("""
savegame ls runs/exp                              # table of checkpoints: epoch, metrics, best, size, status
savegame inspect runs/exp/best                    # tensors, values, metadata of the best checkpoint
savegame verify runs/exp                          # check every hash; exit 1 naming anything corrupt
savegame stats runs/exp                           # share of training time blocked in saves, work at risk
savegame diff runs/exp/epoch=003 runs/exp/latest  # what changed
savegame prune runs/exp --keep-last 3 --keep-best 1 --dry-run
savegame export runs/exp/best --item model --to model.safetensors
savegame plot runs/exp --metric val_loss -o history.png
savegame gc runs/exp --older-than 7d
""", "A checkpoint argument is a checkpoint directory, or ROOT/latest, ROOT/best (or a root with --which)."),
        formatter_class=_Formatter,
        parents=[_common()],
    )
    from savegame._version import __version__

    parser.add_argument("--version", action="version", version=f"savegame {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.commands = sub.choices  # type: ignore[attr-defined]

    p = _add(sub, "ls", "list the checkpoints of a run",
             "List the checkpoints in ROOT: name, epoch, step, metrics, best/latest marks, size, age and status.\n"
             "Status: ok (hashes verified), unverified (manifest and file sizes fine; use --verify to hash),\n"
             "corrupt, quarantined (moved aside by a resume). Nothing is written.",
             """
savegame ls runs/exp
savegame ls runs/exp --verify --metrics val_loss,val_accuracy
savegame ls runs/exp --json | jq '.checkpoints[] | select(.is_best) | .path'
""", "Exit status 1 when a checkpoint is corrupt.")  # fmt: skip
    _root_argument(p, "directory of checkpoints (what the Checkpointer writes into)")
    p.add_argument("--verify", action="store_true", help="check every file's hash (reads all data)")
    p.add_argument("--monitor", metavar="METRIC",
                   help="rank the best by this metric (default: the one the run recorded)")  # fmt: skip
    _mode_option(p, "METRIC")
    p.add_argument("--metrics", metavar="A,B", help="metric columns to show (default: all, monitored first, up to 6)")
    _json_option(p, "print JSON instead of a table")
    p.set_defaults(func="read:cmd_ls")

    p = _add(sub, "stats", "how long saves blocked training, and the work at risk",
             "Per training run of ROOT: its training time, how long its saves blocked training (the stall) and\n"
             "that stall as a share of the training time; then the work at risk: the time since the newest\n"
             "durable checkpoint was committed. From the timings every checkpoint's manifest records.\n"
             "Training time: the wall-clock time the run's Checkpointers were open, up to the run's newest\n"
             "commit, summed over restarts (downtime between a crash and the resume is not counted).\n"
             "Stall: the blocking seconds of all the run's saves, also those retention deleted since.\n"
             "Nothing is written.",
             """
savegame stats runs/exp
savegame stats runs/exp --json | jq '.runs[-1].stall_share'
""", "Checkpoints written before savegame recorded timings show '-' (null in JSON).")  # fmt: skip
    _root_argument(p, "directory of checkpoints (what the Checkpointer writes into)")
    _json_option(p, "print JSON instead of text")
    p.set_defaults(func="stats:cmd_stats")

    p = _add(sub, "inspect", "show what a checkpoint holds",
             "Show a checkpoint: items, tensors (path, dtype, shape, bytes), values that are not tensors,\n"
             "progress (epoch, step, metrics, best), metadata and library versions. No tensor data is read\n"
             "(unless --verify).",
             """
savegame inspect runs/exp/epoch=004-step=001200
savegame inspect runs/exp/best --item model
savegame inspect runs/exp --which latest --json
""")  # fmt: skip
    _checkpoint_argument(p)
    _which_option(p)
    p.add_argument("--item", metavar="NAME", help="show only this item")
    p.add_argument("--verify", action="store_true", help="check every file's hash first")
    _json_option(p)
    p.set_defaults(func="read:cmd_inspect")

    p = _add(sub, "verify", "check every hash of a checkpoint or of all checkpoints in a root",
             "Check checkpoints completely: the manifest, every file's size, content hash and header, and that\n"
             "every array the manifest refers to exists. Shows a progress bar on a terminal.",
             """
savegame verify runs/exp/epoch=004-step=001200
savegame verify runs/exp && echo intact
""", "Exit status 1 when anything is corrupt (each corrupt checkpoint is named with the damaged file),\n"
     "or when ROOT holds no checkpoint. Quarantined checkpoints are listed, not verified.")  # fmt: skip
    p.add_argument("path", metavar="ROOT|CKPT", help="a checkpoint directory or a directory of checkpoints")
    _json_option(p)
    p.set_defaults(func="read:cmd_verify")

    p = _add(sub, "diff", "compare two checkpoints",
             "Compare two checkpoints: items and keys added or removed, tensors changed (max absolute and\n"
             "relative difference, max|b-a| / max|a|), shape and dtype changes, plain values, epoch, step,\n"
             "metrics and metadata. Library versions are shown but are not differences.",
             """
savegame diff runs/exp/epoch=003-step=000900 runs/exp/latest
savegame diff runs/a/best runs/b/best --item model --json
""", "Exit status 0 when both hold the same state, 1 when they differ (like diff).")  # fmt: skip
    p.add_argument("a", metavar="A", help="first checkpoint")
    p.add_argument("b", metavar="B", help="second checkpoint")
    p.add_argument("--item", metavar="NAME", help="compare only this item")
    p.add_argument("--no-verify", action="store_true", help="do not hash-check the files first")
    _json_option(p)
    p.set_defaults(func="diff:cmd_diff")

    p = _add(sub, "prune", "delete old checkpoints by the library's retention rules",
             "Delete checkpoints as the Checkpointer's retention would: keep the N newest and the K best by the\n"
             "monitored metric; the newest and the best checkpoint, pinned ones and checkpoints not written by\n"
             "a Checkpointer are never deleted. Use --dry-run first.",
             """
savegame prune runs/exp --keep-last 3 --dry-run
savegame prune runs/exp --keep-last 3 --keep-best 2 --monitor val_accuracy
""", "The monitored metric defaults to the one the run recorded, so the best is protected even\n"
     "with --keep-last alone.")  # fmt: skip
    _root_argument(p)
    p.add_argument("--keep-last", type=int, metavar="N", help="keep the N newest")
    p.add_argument("--keep-best", type=int, metavar="K", help="keep the K best by --monitor")
    p.add_argument("--monitor", metavar="METRIC", help="metric that ranks the best (default: the one the run recorded)")
    _mode_option(p, "METRIC")
    p.add_argument("--dry-run", action="store_true", help="only show what would be deleted")
    _json_option(p)
    p.set_defaults(func="manage:cmd_prune")

    p = _add(sub, "export", "write one item's tensors as a plain weights file",
             "Write the tensors of one item (default: model) as a flat {name: tensor} file for other tools.\n"
             "The format follows the --to suffix:\n"
             "  .safetensors  exact bytes, every dtype safetensors has (bfloat16, float8 included)\n"
             "  .pt / .pth    PyTorch's file format, a flat dict of plain tensors (opens with weights_only=True)\n"
             "  .npz          NumPy, no pickle (bfloat16/float8 widened to float32)\n"
             "  .weights.h5   Keras weights file; needs --keras-model (its layout follows the model's layers,\n"
             "                which a checkpoint does not record)\n"
             "Values that are not tensors are left out (and listed). The source is hash-verified first.",
             """
savegame export runs/exp/best --item model --to model.safetensors
savegame export runs/exp/latest --to weights.pt
savegame export runs/keras/best --item keras.model --to model.weights.h5 --keras-model mymodels:build
""")  # fmt: skip
    _checkpoint_argument(p)
    p.add_argument("--to", required=True, metavar="FILE", help="output file (.safetensors, .pt, .npz, .weights.h5)")
    p.add_argument("--item", metavar="NAME", help="item to export (default: model); NAME.sub for a part of it")
    _which_option(p)
    p.add_argument("--keras-model", metavar="MODULE:FUNCTION",
                   help="for .weights.h5: function returning the built Keras model (file.py:function works too)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    _json_option(p, "print what was written as JSON")
    p.set_defaults(func="output:cmd_export")

    p = _add(sub, "import", "turn a checkpoint written by another tool into a savegame checkpoint",
             "Convert SRC into the new savegame checkpoint DEST (which must not exist), restorable into the same\n"
             "objects with savegame.load. SRC may be:\n"
             "  .pt / .pth / .bin   torch.save files of tensors and plain containers (model_state_dict -> model...)\n"
             "  .ckpt               Lightning checkpoints (state_dict -> model, optimizer_states -> optimizer...)\n"
             "  .safetensors        plain tensor files (-> model)\n"
             "  .weights.h5 .keras  Keras 3 files, read with h5py (--keras-model: by variable path)\n"
             "  DIR                 a Hugging Face model directory (config.json + weights), or with --template\n"
             "                      a directory of checkpoint files, imported as one run root\n"
             "Nothing in SRC is run: pickles are disassembled and refused if they need code, then read with\n"
             "torch.load(weights_only=True); Keras configs are never deserialized.",
             """
savegame import checkpoints/model_checkpoint.pth runs/imported
savegame import lightning_logs/version_0/checkpoints/last.ckpt runs/lit --json
savegame import checkpoints/ runs/exp --template 'model_{epoch:02d}_{val_acc:.3f}.pth'
""", "Exit status 2 for a source that cannot be imported (unknown format, truncated, needs code) or\n"
     "a DEST that exists.")  # fmt: skip
    p.add_argument("src", metavar="SRC", help="file or directory to import")
    p.add_argument("dest", metavar="DEST", help="new checkpoint directory (a run root with --template)")
    p.add_argument("--template", metavar="NAME",
                   help="file name template of a run directory, e.g. 'model_{epoch:02d}_{val_acc:.3f}.pth'")
    _mode_option(p, "its first metric (with --template)")
    p.add_argument("--keras-model", metavar="MODULE:FUNCTION",
                   help="for Keras files: function returning the built model the weights belong to")
    _json_option(p, "print the report as JSON")
    p.set_defaults(func="imports:cmd_import")

    p = _add(sub, "plot", "plot a metric over the run with saved, best and deleted checkpoints",
             "Plot a metric over epochs or steps from the checkpoints' manifests: saved checkpoints, the best,\n"
             "quarantined ones and deleted ones. Deleted checkpoints take their metrics with them; those that\n"
             "were the best at some point are still known (every manifest records the best so far) and are\n"
             "shown; the others are counted in a note. Needs matplotlib.",
             """
savegame plot runs/exp --metric val_loss -o history.png
savegame plot runs/exp --x step -o history.svg
""")  # fmt: skip
    _root_argument(p)
    p.add_argument("--metric", metavar="METRIC", help="metric to plot (default: the run's monitored metric)")
    _mode_option(p, "METRIC")
    p.add_argument("-o", "--output", metavar="FILE", default="history.png",
                   help="image file; format from the suffix: .png, .svg, .pdf (default history.png)")
    p.add_argument("--x", choices=("auto", "epoch", "step", "sequence"), default="auto",
                   help="x axis (auto: epoch when each checkpoint has its own, else step)")
    _json_option(p, "print the plotted points as JSON")
    p.set_defaults(func="output:cmd_plot")

    p = _add(sub, "gc", "remove leftovers of crashed writers and old quarantined checkpoints",
             "Remove what crashed or killed writers left in ROOT (hidden staging folders of processes that are\n"
             "no longer running, deletion leftovers; an interrupted overwrite's only copy is put back), and\n"
             "quarantined checkpoints older than --older-than.",
             """
savegame gc runs/exp --dry-run
savegame gc runs/exp --older-than 2d
""")  # fmt: skip
    _root_argument(p)
    p.add_argument("--older-than", default="7d", metavar="AGE",
                   help="remove quarantined checkpoints quarantined longer than AGE (30s, 15m, 12h, 7d, 2w; "
                   "default 7d; 0 for all)")
    p.add_argument("--dry-run", action="store_true", help="only show what would be removed")
    _json_option(p)
    p.set_defaults(func="manage:cmd_gc")

    p = _add(sub, "demo", "train on digits, kill -9 mid-epoch, resume, show identical results",
             "The Checkpointer's main job, end to end: train a small MLP on scikit-learn's digits with a\n"
             "Checkpointer, SIGKILL the training process mid-epoch, resume it from the last checkpoint, and\n"
             "compare the final weights with an uninterrupted run (bit-identical). Needs torch and scikit-learn.",
             """
savegame demo
savegame demo --dir /tmp/sg-demo --epochs 4 --kill-at-step 100
savegame ls runs/demo/checkpoints                 # then look at what it wrote
""", "Exit status 1 when the resumed run does not reproduce the uninterrupted one.")  # fmt: skip
    p.add_argument("--dir", metavar="DIR", help="output directory (default runs/demo)")
    p.add_argument("--epochs", type=int, metavar="N", help="training epochs, at least 2 (default 6)")
    p.add_argument("--seed", type=int, metavar="N", help="random seed (default 0)")
    p.add_argument("--kill-at-step", type=int, metavar="STEP",
                   help="global step at which to SIGKILL the first run (default: the middle of epoch 3)")
    p.set_defaults(func="app:cmd_demo")
    return parser


def cmd_demo(args: argparse.Namespace, ctx: Context) -> int:
    """``savegame demo``: runs :func:`savegame.cli.demo.main` with the options given."""
    import importlib

    if args.epochs is not None and args.epochs < 2:
        raise UsageError(f"--epochs must be at least 2, got {args.epochs}")
    if args.kill_at_step is not None and args.kill_at_step < 1:
        raise UsageError(f"--kill-at-step must be at least 1, got {args.kill_at_step}")
    argv: list[str] = []
    for flag, value in (("--dir", args.dir), ("--epochs", args.epochs), ("--seed", args.seed),
                        ("--kill-at-step", args.kill_at_step)):  # fmt: skip
        if value is not None:
            argv += [flag, str(value)]
    demo = importlib.import_module("savegame.cli.demo")
    try:
        return int(demo.main(argv))
    except SystemExit as exc:  # the demo's own checks (--kill-at-step beyond the run)
        return exc.code if isinstance(exc.code, int) else EXIT_PROBLEM


def _resolve(func: str) -> Callable[[argparse.Namespace, Context], int]:
    import importlib

    module_name, name = func.split(":")
    module = importlib.import_module(f"savegame.cli.{module_name}")
    command: Callable[[argparse.Namespace, Context], int] = getattr(module, name)
    return command


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, CLIError):
        return exc.code
    usage = (CheckpointNotFoundError, NotACheckpointError, ConfigError, InvalidNameError, SourceFormatError)
    if isinstance(exc, usage):
        return EXIT_USAGE
    return EXIT_PROBLEM


def _message(exc: BaseException) -> str:
    if isinstance(exc, (CheckpointError, CLIError)):
        text = str(exc)
    elif isinstance(exc, OSError):
        text = f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror or exc}"
    else:
        text = f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)"
    return shown(" ".join(text.split()) or type(exc).__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``savegame`` console script; returns the exit status (0 ok, 1 problem, 2 usage)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(args_list)
        if extra:  # reported by the subcommand's parser, so that the hint names its --help
            commands: dict[str, argparse.ArgumentParser] = getattr(parser, "commands", {})
            owner = commands.get(getattr(args, "command", None) or "", parser)
            owner.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        print("savegame: error: no command given (see 'savegame --help')", file=sys.stderr)
        return EXIT_USAGE
    debug = bool(getattr(args, "debug", False))
    color: ColorChoice = getattr(args, "color", "auto")
    ctx = Context(out=sys.stdout, err=sys.stderr, style=style_for(sys.stdout, color),
                  err_style=style_for(sys.stderr, color), debug=debug)  # fmt: skip
    handler = _LogHandler(ctx, debug)
    logger = get_logger("savegame")
    logger.addHandler(handler)
    old_level = logger.level
    if debug:
        logger.setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(ctx)
            return _resolve(args.func)(args, ctx)
    except KeyboardInterrupt:
        print("savegame: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_OK
    except Exception as exc:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        if debug:
            print(terminal_text(traceback.format_exc(), color=False), end="", file=sys.stderr)
        line = f"savegame: {ctx.err_style.paint('error', 'red', 'bold')}: {_message(exc)}"
        print(terminal_text(line, color=ctx.err_style.color), file=sys.stderr)
        return _exit_code(exc)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


class _LogHandler(logging.Handler):
    """The library's log warnings as ``savegame: warning: ...`` lines (everything with ``--debug``)."""

    def __init__(self, ctx: Context, debug: bool) -> None:
        super().__init__(logging.DEBUG if debug else logging.WARNING)
        self.ctx = ctx

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.levelno >= logging.WARNING:
                self.ctx.warn(record.getMessage())
            else:
                line = f"savegame: {record.levelname.lower()}: {shown(record.getMessage())}"
                print(terminal_text(line, color=False), file=self.ctx.err)
        except Exception:  # pragma: no cover - never let logging break the command
            self.handleError(record)


def _warning_printer(ctx: Context) -> Callable[..., None]:
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:  # fmt: skip
        ctx.warn(" ".join(str(message).split()))

    return show


def _silence_stdout() -> None:
    """After a closed pipe (``savegame ls | head``): keep Python from complaining at exit."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass

