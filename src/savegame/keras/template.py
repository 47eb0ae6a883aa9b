"""Keras's ``filepath`` template (``weights.{epoch:02d}-{val_loss:.2f}.keras``): parsing, formatting and
the plain, numeric view of ``logs`` that fills it.
"""

from __future__ import annotations

import os
import string
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from savegame.errors import ConfigError
from savegame.format.naming import validate_name
from savegame.keras.files import (
    INT_FIELDS,
    SaveFreq,
)

# --------------------------------------------------------------------------------------------------
# The filepath template


class Template:
    """A Keras ``filepath`` checked on construction: placeholders, format specs, where they are."""

    def __init__(self, filepath: str, *, save_freq: SaveFreq, native: bool) -> None:
        self.filepath = filepath
        self.fields: tuple[str, ...] = ()
        fields: list[str] = []
        try:
            parsed = list(string.Formatter().parse(filepath))
        except ValueError as exc:
            raise ConfigError(f"ModelCheckpoint: filepath {filepath!r} has a malformed placeholder ({exc})") from None
        for _, field, spec, conversion in parsed:
            if field is None:
                continue
            if field == "" or field.isdigit():
                raise ConfigError(f"ModelCheckpoint: filepath {filepath!r}: positional placeholders are not allowed")
            if not field.isidentifier() or conversion is not None:
                raise ConfigError(
                    f"ModelCheckpoint: filepath {filepath!r}: placeholder {{{field}}} must be a plain name "
                    "(epoch, batch or a metric from the logs)"
                )
            if field == "batch" and save_freq == "epoch":
                raise ConfigError(
                    f"ModelCheckpoint: filepath {filepath!r}: unknown placeholder {{batch}}: it is only filled "
                    "when save_freq is a number of batches"
                )
            sample: int | float = 1 if field in INT_FIELDS else 1.5
            try:
                format(sample, spec or "")
            except (TypeError, ValueError) as exc:
                kind = "an integer" if field in INT_FIELDS else "a float"
                raise ConfigError(
                    f"ModelCheckpoint: filepath {filepath!r}: format spec {spec!r} of {{{field}}} cannot "
                    f"format {kind} ({exc})"
                ) from None
            fields.append(field)
        self.fields = tuple(dict.fromkeys(fields))
        self.metric_fields = tuple(f for f in self.fields if f not in INT_FIELDS)
        directory, base = os.path.split(filepath)
        self.templated = bool(self.fields)
        if native:
            self.root, self.name = "", filepath
            return
        if any(f"{{{f}" in directory for f in self.fields):
            raise ConfigError(
                f"ModelCheckpoint: filepath {filepath!r}: placeholders are only allowed in the last path "
                "component (the checkpoint name); the directory part is the checkpoint root"
            )
        if self.templated:
            self.root, self.name = directory or ".", base
            sample_name = base.format(**{f: 1 if f in INT_FIELDS else 1.5 for f in self.fields})
            try:
                validate_name(sample_name)
            except ValueError as exc:
                raise ConfigError(f"ModelCheckpoint: filepath {filepath!r}: {exc}") from None
        else:
            self.root, self.name = filepath, ""

    def check_known(self, known: set[str]) -> None:
        """Refuse metric placeholders that are not among ``known`` (the metric names the model logs)."""
        unknown = [f for f in self.metric_fields if f not in known]
        if unknown:
            raise ConfigError(
                f"ModelCheckpoint: filepath {self.filepath!r}: unknown placeholder(s) "
                f"{', '.join('{' + f + '}' for f in unknown)}; this model logs: {', '.join(sorted(known))} "
                "(plus epoch, and batch when saving every N batches)"
            )

    def format(self, epoch: int, batch: int | None, logs: Mapping[str, Any]) -> str:
        """Keras's formatting: ``epoch + 1``, ``batch + 1`` (batch saves) and the logs."""
        values: dict[str, Any] = {k: plain_value(v) for k, v in logs.items()}
        values["epoch"] = epoch + 1
        if batch is not None and "batch" not in logs:
            values["batch"] = batch + 1
        if self.root and not self.templated:
            return ""  # a fixed savegame root: the Checkpointer names the checkpoints
        target = self.name
        try:
            return target.format(**values)
        except KeyError as exc:
            raise ConfigError(
                f'ModelCheckpoint: Failed to format this callback filepath: "{self.filepath}". Reason: {exc} '
                f"is not in the logs (available: {', '.join(sorted(values))})"
            ) from None


def plain_value(value: Any) -> Any:
    """A log value as a Python number when it is a scalar (tensors and NumPy scalars included)."""
    if isinstance(value, (int, float, str)):
        return value
    try:
        array = np.asarray(keras.ops.convert_to_numpy(value))
    except Exception:
        return value
    if array.shape == ():
        return array.item()
    return value


def numeric_logs(logs: Mapping[str, Any] | None) -> dict[str, float]:
    """The logs that are scalar numbers, as floats (what goes into a manifest's metrics)."""
    out: dict[str, float] = {}
    for key, value in (logs or {}).items():
        plain = plain_value(value)
        if isinstance(plain, (int, float)) and not isinstance(plain, bool):
            out[str(key)] = float(plain)
    return out


def metric_names(model: Any) -> set[str]:
    """The names ``fit`` logs for ``model`` (``loss``, compiled metrics), with their ``val_`` twins."""
    names = {"loss"}
    for metric in getattr(model, "metrics", []) or []:
        inner = getattr(metric, "metrics", None)
        if isinstance(inner, list) and type(metric).__name__ in ("CompileMetrics", "MetricsList"):
            names.update(m.name for m in inner)
        else:
            names.add(metric.name)
    names.discard("compile_metrics")
    return names | {f"val_{n}" for n in names}


