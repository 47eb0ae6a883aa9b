"""The Checkpointer's knobs as plain values: CANDLE-style settings, the three presets, and the one
translation of a knob set into :class:`~savegame.Checkpointer` keywords.

This module owns that translation so that both of its users sit above it: :mod:`savegame.config`
(``CheckpointConfig``, a :class:`Knobs` that also parses parameter files and builds the Checkpointer)
and :meth:`savegame.Checkpointer.preset` (a preset's knobs). Before, the Checkpointer imported
``config`` to build a preset while ``config`` imported the Checkpointer: a cycle. It imports only
:mod:`savegame.policies` and :mod:`savegame.errors`, never the Checkpointer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from savegame._util.logs import get_logger
from savegame.errors import ConfigError
from savegame.policies import KeepExponential, KeepLast, KeepPolicy, KeepUnion, Mode

__all__ = ["PRESETS", "KeepMode", "Knobs", "Restart", "check_preset", "preset_knobs"]

log = get_logger("savegame.config")

KeepMode = Literal["linear", "exponential", "all"]
Restart = Literal["auto", "required", "off"]
"""When to resume: ``auto`` (if a checkpoint exists), ``required`` (fail without one), ``off``."""


@dataclass(frozen=True)
class Knobs:
    """The ``ckpt_*`` settings, validated (field defaults are CANDLE's, except where
    :class:`savegame.config.CheckpointConfig` says otherwise)."""

    restart_mode: Restart = "auto"
    directory: str = "./save"
    save_interval: int = 1
    save_steps: int = 0
    save_seconds: float = 0.0
    skip_epochs: int = 0
    save_best: bool = True
    save_best_metric: str = "val_loss"
    save_best_mode: Mode = "auto"
    best_metric_last: float | None = None
    keep_mode: KeepMode = "linear"
    keep_limit: int | None = None
    checksum: bool = True
    save_weights_only: bool = False
    preset: str | None = None
    metadata: Any = None
    max_epochs: int | None = None

    def __post_init__(self) -> None:
        for name in ("save_interval", "save_steps", "skip_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"ckpt_{name} must be an integer >= 0, got {value!r}")
        if self.keep_limit is not None and (
            isinstance(self.keep_limit, bool) or not isinstance(self.keep_limit, int) or self.keep_limit < 1
        ):
            raise ConfigError(f"ckpt_keep_limit must be an integer >= 1, got {self.keep_limit!r}")
        seconds = self.save_seconds
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < math.inf:
            raise ConfigError(f"ckpt_save_seconds must be a number >= 0, got {self.save_seconds!r}")
        if self.save_best and not self.save_best_metric:
            raise ConfigError("ckpt_save_best=True needs ckpt_save_best_metric (e.g. 'val_loss')")
        if self.keep_mode == "all" and self.keep_limit is not None:
            raise ConfigError("ckpt_keep_mode='all' keeps everything; remove ckpt_keep_limit or use 'linear'")

    def keep_policy(self) -> KeepPolicy | None:
        """The keep policy of ``keep_mode`` / ``keep_limit`` (None: keep everything)."""
        if self.keep_mode == "exponential":
            history = KeepExponential()
            return KeepUnion(history, KeepLast(self.keep_limit)) if self.keep_limit else history
        if self.keep_mode == "linear" and self.keep_limit is not None:
            return KeepLast(self.keep_limit)
        return None

    def checkpointer_kwargs(self) -> dict[str, Any]:
        """The :class:`~savegame.Checkpointer` keywords of these knobs (all but the directory and name).

        ``save_interval=0`` means no periodic saves (improvements and the end are still saved); that
        is logged, since CANDLE's meaning was "no checkpoints at all".
        """
        if self.save_interval == 0:
            log.info(
                "ckpt_save_interval=0: no periodic checkpoints; %s and the end-of-training checkpoint are still saved",
                f"improvements of {self.save_best_metric}" if self.save_best else "no best tracking",
            )
        metadata = self.metadata
        if metadata is not None and not isinstance(metadata, Mapping):
            metadata = {"metadata": metadata}
        return {
            "keep": self.keep_policy(),
            "monitor": self.save_best_metric if self.save_best else None,
            # CANDLE files list every key: the best's mode and threshold matter only with ckpt_save_best
            "mode": self.save_best_mode if self.save_best else "auto",
            "threshold": self.best_metric_last if self.save_best else None,
            "every_n_epochs": self.save_interval,
            "every_n_steps": self.save_steps or None,
            "every_seconds": self.save_seconds or None,
            "save_at_end": True,
            "skip_first_epochs": self.skip_epochs,
            "weights_only": self.save_weights_only,
            "restart": self.restart_mode,
            "verify": self.checksum,
            "max_epochs": self.max_epochs,
            "metadata": metadata,
        }


PRESETS: dict[str, Knobs] = {
    "short": Knobs(save_interval=0, save_best=False, keep_mode="linear", keep_limit=1, preset="short"),
    "normal": Knobs(save_interval=1, save_best=True, keep_mode="linear", keep_limit=10, preset="normal"),
    "long": Knobs(
        save_interval=5, save_seconds=1800.0, save_best=True, keep_mode="exponential", keep_limit=20, preset="long"
    ),
}
"""The three training regimes as knob sets (see :mod:`savegame.config`)."""


def check_preset(name: object) -> str:
    """``name`` if it is a preset; :class:`ConfigError` naming the choices otherwise."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return name


def preset_knobs(
    preset: str,
    *,
    monitor: str | None = None,
    mode: Mode = "auto",
    max_epochs: int | None = None,
    restart: Restart = "auto",
    metadata: Mapping[str, Any] | None = None,
) -> Knobs:
    """The knobs of ``preset`` for one run; the best is tracked (and saved) only when ``monitor`` is given."""
    base = PRESETS[check_preset(preset)]
    return replace(
        base,
        save_best=base.save_best and monitor is not None,
        save_best_metric=monitor or "val_loss",
        save_best_mode=mode,
        max_epochs=max_epochs,
        restart_mode=restart,
        metadata=dict(metadata) if metadata is not None else None,
    )
