"""Checkpointer configuration: CANDLE-style parameter files, command-line overrides and presets.

CANDLE benchmarks keep their hyperparameters in a *default-model file*, an INI file whose values are
Python literals::

    [Global_Params]
    epochs=20
    batch_size=64
    learning_rate=0.001
    dense=[128, 64]
    ckpt_restart_mode='auto'
    ckpt_save_interval=2
    ckpt_save_best=True
    ckpt_save_best_metric='val_accuracy'
    ckpt_keep_limit=3

:func:`read_parameter_file` reads it (values through :func:`ast.literal_eval` only, never ``eval``; a
value that is not a literal stays a string), :func:`load_parameters` applies command-line overrides
(``--ckpt_save_interval 5``, ``--epochs 3``, ``--config_file other.txt``) and
:meth:`CheckpointConfig.from_params` turns the ``ckpt_*`` keys into a :class:`Checkpointer`.

The keys keep CANDLE's meaning, without CANDLE's bugs:

* ``ckpt_save_best_metric`` may be an accuracy-like metric: its direction comes from its name
  (``val_accuracy`` is maximised) or ``ckpt_save_best_mode``; CANDLE started every metric at ``+inf``
  and so never saved an improving accuracy.
* ``ckpt_save_interval=0`` turns off *periodic* saves only; saves on improvement and the
  end-of-training save still happen (CANDLE disabled every checkpoint, silently). The effect is logged.
* ``ckpt_skip_epochs`` delays periodic and best saves, never the final one.
* ``ckpt_keep_limit`` never deletes the newest or the best checkpoint; ``ckpt_keep_mode='exponential'``
  (unimplemented in CANDLE) keeps a log-spaced history in addition to the ``ckpt_keep_limit`` newest.

CANDLE's names are accepted as CANDLE documents them: ``ckpt_metadata`` (a run description stored in
every manifest; ``metadata``, the key CANDLE's code reads, is the same setting) and
``ckpt_directory=None`` (what CANDLE's parser gives when the key is unset: ``<output_dir>/ckpts``, or
``./save`` without ``output_dir``; an absent key stays ``./save``).

Where savegame's defaults and meanings differ from CANDLE's parser (``candle.parsing_utils``):

* ``ckpt_save_interval``: the parser's default is 0, savegame's 1 (save every epoch, the default of
  CANDLE's checkpoint module); and 0 means no *periodic* saves (the best and the end are still saved),
  where CANDLE saves nothing at all.
* ``ckpt_keep_limit``: CANDLE applies it to the checkpoints the current process wrote and never deletes
  those of an earlier process, so each restart adds up to N more; savegame applies it to the run's
  checkpoints in the directory, those written before a restart included, so a restarted job keeps the
  newest N (and the best) in total. The parser's default is 1000000, savegame's None (no limit).
* ``ckpt_checksum``: False in CANDLE, True here; ``ckpt_save_weights_only``: False (as the parser;
  CANDLE's checkpoint module says True).

Extensions (all optional): ``ckpt_save_steps``, ``ckpt_save_seconds``, ``ckpt_save_best_mode``,
``ckpt_preset`` (``short``/``normal``/``long``: its values are the defaults the other keys override)
and ``ckpt_best_metric_last`` (CANDLE's value to beat after a restart). ``epochs``, when present, is
the last epoch (its end is the final save).

Presets for the three training regimes of the "save and resume your experiments" guide:

* ``short`` (minutes to hours): one checkpoint, at the end of training.
* ``normal`` (hours to a day): every epoch and every improvement; the 10 newest and the best are kept.
* ``long`` (days to weeks): every 5 epochs or 30 minutes of wall time and every improvement; the 20
  newest, a log-spaced history back to the start, and the best are kept.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from savegame._util.logs import get_logger
from savegame.errors import ConfigError
from savegame.policies import Mode
from savegame.policies.knobs import PRESETS as _PRESETS
from savegame.policies.knobs import KeepMode as KeepMode
from savegame.policies.knobs import Knobs, Restart, check_preset
from savegame.run.checkpointer import Checkpointer

__all__ = [
    "KEYS",
    "PRESETS",
    "CheckpointConfig",
    "add_checkpoint_arguments",
    "load_parameters",
    "parse_value",
    "preset_checkpointer",
    "read_parameter_file",
]

log = get_logger("savegame.config")


@dataclass(frozen=True)
class _Key:
    """One configuration key: its value kind, the allowed choices and a help line."""

    kind: Literal["str", "int", "float", "bool", "choice", "any"]
    help: str
    choices: tuple[str, ...] = ()
    optional: bool = False


KEYS: dict[str, _Key] = {
    "ckpt_restart_mode": _Key(
        "choice", "resume: off | auto (if a checkpoint exists) | required", ("off", "auto", "required")
    ),
    "ckpt_directory": _Key(
        "str", "checkpoint directory (default ./save; None: OUTPUT_DIR/ckpts, as CANDLE's parser)", optional=True
    ),
    "ckpt_save_interval": _Key("int", "save every N epochs; 0 = no periodic saves (best/end saves still happen)"),
    "ckpt_save_steps": _Key("int", "save every N global steps; 0 = off"),
    "ckpt_save_seconds": _Key("float", "save every T seconds of wall time; 0 = off"),
    "ckpt_skip_epochs": _Key("int", "no periodic or best saves before this many epochs"),
    "ckpt_save_best": _Key("bool", "save whenever ckpt_save_best_metric improves"),
    "ckpt_save_best_metric": _Key("str", "metric that defines the best checkpoint (e.g. val_loss, val_accuracy)"),
    "ckpt_save_best_mode": _Key(
        "choice", "direction of the metric: auto (from its name) | min | max", ("auto", "min", "max")
    ),
    "ckpt_best_metric_last": _Key("float", "value the metric must beat before any checkpoint exists", optional=True),
    "ckpt_keep_mode": _Key(
        "choice",
        "linear (keep the newest N) | exponential (plus log-spaced history) | all",
        ("linear", "exponential", "all"),
    ),
    "ckpt_keep_limit": _Key(
        "int", "how many of the newest checkpoints to keep (the best is kept as well)", optional=True
    ),
    "ckpt_checksum": _Key("bool", "verify file hashes before restoring"),
    "ckpt_save_weights_only": _Key("bool", "save only model weights (no optimizer, RNG or data position)"),
    "ckpt_preset": _Key(
        "choice", "defaults for a training regime: short | normal | long", ("short", "normal", "long"), optional=True
    ),
    "ckpt_metadata": _Key(
        "any", "free-form run description (job id, hardware...) stored in every manifest", optional=True
    ),
    "metadata": _Key("any", "the same as ckpt_metadata (the name CANDLE's code reads)", optional=True),
}
"""The configuration keys :meth:`CheckpointConfig.from_params` understands (others are ignored)."""


@dataclass(frozen=True)
class CheckpointConfig(Knobs):
    """The ``ckpt_*`` settings, validated; :meth:`build` makes the :class:`Checkpointer`.

    Field defaults are CANDLE's, except ``keep_limit`` (None: unlimited, CANDLE's 1000000),
    ``checksum`` (True: verification is cheap and catches damaged files) and ``save_weights_only``
    (False: resuming needs the optimizer and the RNGs). The fields, their validation and the
    translation into Checkpointer keywords are :class:`savegame.policies.knobs.Knobs`'s.
    """

    @classmethod
    def from_params(cls, params: Mapping[str, Any], *, preset: str | None = None) -> CheckpointConfig:
        """The configuration described by a parameter dict (parsed file plus overrides).

        ``ckpt_*`` keys and ``metadata`` are read (an unknown ``ckpt_*`` key is an error, so a typo
        cannot silently fall back to a default); ``epochs`` becomes ``max_epochs``; every other key is
        left to the model. A preset (``ckpt_preset`` or ``preset=``) supplies the defaults.
        """
        unknown = sorted(k for k in params if k.startswith("ckpt_") and k not in KEYS)
        if unknown:
            raise ConfigError(f"unknown checkpoint keys {unknown}; known keys: {sorted(KEYS)}")
        values = {k: _convert(k, params[k]) for k in KEYS if k in params}
        chosen = values.get("ckpt_preset") or preset
        base = PRESETS[check_preset(chosen)] if chosen else cls()
        metadata = _merged_metadata(values.pop("ckpt_metadata", None), values.pop("metadata", None))
        changes: dict[str, Any] = {f"{k.removeprefix('ckpt_')}": v for k, v in values.items()}
        if metadata is not None:
            changes["metadata"] = metadata
        if "ckpt_directory" in values and values["ckpt_directory"] is None:
            changes["directory"] = _candle_default_directory(params.get("output_dir"))
        if "epochs" in params:
            epochs = _convert_int("epochs", params["epochs"])
            changes["max_epochs"] = epochs if epochs > 0 else None
        return replace(base, **changes)

    def build(self, *, directory: str | os.PathLike[str] | None = None, name: str | None = None) -> Checkpointer:
        """The Checkpointer for this configuration (``directory`` overrides ``ckpt_directory``)."""
        return Checkpointer(
            directory if directory is not None else self.directory, name=name, **self.checkpointer_kwargs()
        )


def _merged_metadata(candle: Any, plain: Any) -> Any:
    """The run description from ``ckpt_metadata`` (CANDLE's documented name) or ``metadata`` (what
    CANDLE's code reads); both may be given only with the same value, so neither is silently dropped."""
    if candle is not None and plain is not None and candle != plain:
        raise ConfigError(
            f"ckpt_metadata={candle!r} and metadata={plain!r} disagree: they are the same setting "
            "(CANDLE documents ckpt_metadata and reads metadata); give one of them"
        )
    return candle if candle is not None else plain


def _candle_default_directory(output_dir: object) -> str:
    """Where CANDLE puts checkpoints when ``ckpt_directory`` is None: ``<output_dir>/ckpts``, or the
    checkpoint module's own default ``./save`` when there is no ``output_dir`` either."""
    if output_dir is None or output_dir == "":
        return CheckpointConfig.directory
    if not isinstance(output_dir, (str, os.PathLike)):
        raise ConfigError(f"output_dir must be a path (ckpt_directory=None puts checkpoints in it), got {output_dir!r}")
    return os.path.join(os.fspath(output_dir), "ckpts")


PRESETS: dict[str, CheckpointConfig] = {name: CheckpointConfig(**vars(knobs)) for name, knobs in _PRESETS.items()}
"""The regimes of seed 003 as configurations (see the module docstring); the knob sets are
:data:`savegame.policies.knobs.PRESETS`."""


def preset_checkpointer(
    preset: str,
    directory: str | os.PathLike[str],
    *,
    monitor: str | None = None,
    mode: Mode = "auto",
    max_epochs: int | None = None,
    name: str | None = None,
    restart: Restart = "auto",
    metadata: Mapping[str, Any] | None = None,
) -> Checkpointer:
    """A Checkpointer for a preset (:meth:`Checkpointer.preset`); the best is tracked (and saved) only
    when ``monitor`` is given."""
    return Checkpointer.preset(
        preset, directory, monitor=monitor, mode=mode, max_epochs=max_epochs, name=name, restart=restart,
        metadata=metadata,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Values


_TRUE = {"true", "1", "yes", "on", "t", "y"}
_FALSE = {"false", "0", "no", "off", "f", "n"}


def _convert_int(key: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ConfigError(f"{key} must be an integer, got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return value


def _convert(key: str, value: Any) -> Any:
    """Check and convert the value of a known key (strings from the command line are parsed)."""
    spec = KEYS[key]
    if value is None or (isinstance(value, str) and value.strip().lower() == "none" and spec.optional):
        if spec.optional:
            return None
        raise ConfigError(f"{key} must not be None")
    if spec.kind == "int":
        return _convert_int(key, value)
    if spec.kind == "float":
        try:
            number = float(value.strip()) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(number)
    if spec.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{key} must be True or False, got {value!r}")
    if spec.kind == "choice":
        text = value.strip().lower() if isinstance(value, str) else value
        if text not in spec.choices:
            raise ConfigError(f"{key} must be one of {list(spec.choices)}, got {value!r}")
        return text
    if spec.kind == "str":
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key} must be a non-empty string, got {value!r}")
        return value
    return value


def parse_value(text: str) -> Any:
    """A parameter value: a Python literal (``ast.literal_eval``, never ``eval``) or else the string."""
    stripped = text.strip()
    try:
        return ast.literal_eval(stripped)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return stripped


def read_parameter_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parameters of a CANDLE default-model file, all sections merged in file order.

    Keys are lower-cased (as CANDLE's ConfigParser does); ``#`` and ``;`` start comment lines; values
    are parsed with :func:`parse_value`. A missing or malformed file raises :class:`ConfigError`.
    """
    parser = configparser.ConfigParser(interpolation=None, comment_prefixes=("#", ";"), strict=False)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as exc:
        raise ConfigError(f"cannot read parameter file {os.fspath(path)!r}: {exc}") from exc
    except configparser.Error as exc:
        raise ConfigError(f"parameter file {os.fspath(path)!r} is malformed: {exc}") from exc
    params: dict[str, Any] = {}
    for section in parser.sections():
        for key, text in parser.items(section, raw=True):
            params[key] = parse_value(text)
    return params


def add_checkpoint_arguments(parser: argparse.ArgumentParser, *, extra: Sequence[str] = ()) -> None:
    """Add ``--ckpt_*`` / ``--metadata`` options (and ``--KEY`` for each of ``extra``) to ``parser``.

    Options default to "not given" (``argparse.SUPPRESS``), so only what the user typed overrides the
    parameter file. ``--ckpt-save-interval`` spellings are accepted too.
    """
    for key, spec in KEYS.items():
        flags = [f"--{key}"] + ([f"--{key.replace('_', '-')}"] if "_" in key else [])
        metavar = key.upper().removeprefix("CKPT_")
        parser.add_argument(*flags, dest=key, default=argparse.SUPPRESS, metavar=metavar, help=spec.help)
    for key in extra:
        if key in KEYS or not key.isidentifier():
            continue
        parser.add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS, help=f"override {key} (a Python literal)")


def load_parameters(
    default_model: str | os.PathLike[str] | None,
    argv: Sequence[str] | None = None,
    *,
    defaults: Mapping[str, Any] | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """Parameters from ``defaults``, then the default-model file, then the command line (``argv``).

    ``--config_file PATH`` on the command line replaces ``default_model``. Every key of the file can
    be overridden with ``--KEY VALUE`` (parsed like file values), the ``ckpt_*`` keys always.
    Unknown options are an error (argparse exits with status 2 and a usage message).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config_file", "--config-file", dest="config_file", default=None)
    known, _ = pre.parse_known_args(argv)
    path = known.config_file or default_model
    params: dict[str, Any] = dict(defaults or {})
    if path is not None:
        params.update(read_parameter_file(path))
    parser = argparse.ArgumentParser(description=description, parents=[pre])
    add_checkpoint_arguments(parser, extra=sorted(params))
    namespace = parser.parse_args(argv)
    for key, raw in vars(namespace).items():
        if key == "config_file":
            continue
        params[key] = _convert(key, raw) if key in KEYS else parse_value(raw)
    return params

