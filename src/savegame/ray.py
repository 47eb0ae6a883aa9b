"""savegame for Ray Train: report savegame checkpoints from a ``TorchTrainer`` worker, resume from them.

A savegame checkpoint is a directory, so it is a ``ray.train.Checkpoint`` as it is. Two calls replace
the ``torch.save`` / ``torch.load`` lines of a Ray Train loop::

    import savegame.ray

    def train_loop_per_worker(config):
        model, opt = build()                                     # the same on every worker
        state = {"model": model, "optimizer": opt, "epoch": 0}
        restored = savegame.ray.restore(state)                   # None on a fresh run
        for epoch in range(state["epoch"], config["epochs"]):
            train_one_epoch(...)
            state["epoch"] = epoch + 1
            savegame.ray.report({"loss": loss}, state)           # instead of ray.train.report(...)

:func:`report` saves ``state`` with :func:`savegame.save` (atomic, fsynced, pickle-free) into a temporary
directory on the worker with world rank 0 and hands it to ``ray.train.report``, which copies it to
``RunConfig(storage_path=...)`` and keeps or deletes it by ``CheckpointConfig(num_to_keep,
checkpoint_score_attribute)``. The other workers call ``ray.train.report`` without a checkpoint (every
worker must call it the same number of times: it is a barrier). The state of rank 0 is the state of
every rank under data parallelism (DDP keeps the replicas identical); state that differs between
ranks is not saved.

:func:`restore` takes ``ray.train.get_checkpoint()`` (the newest checkpoint Ray registered, on a rerun
of the same ``RunConfig(name, storage_path)``) and loads it into ``state`` in place with every file's
hash checked after Ray copied it to storage. A damaged one (a flipped byte, a truncated file) is
skipped with a :class:`savegame.ResumeWarning` and the newest intact one of the checkpoints Ray still
keeps (``ray.train.get_all_reported_checkpoints()``) is loaded instead; when none is intact, the
:class:`savegame.CorruptCheckpointError` subclass of the newest one's damage is raised, naming every
checkpoint tried. A Ray checkpoint savegame did not write (``torch.save`` files) raises
:class:`savegame.NotACheckpointError` saying so. Nothing in the target changes unless a checkpoint loads
completely.

Ray is imported only when these functions are called (``pip install 'savegame[ray]'``).
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from savegame._util.logs import warn
from savegame.api import load as _load
from savegame.api import save as _save
from savegame.engine.capture import LoadReport
from savegame.errors import (
    ConfigError,
    CorruptCheckpointError,
    ForeignCheckpointError,
    MissingExtraError,
    OccupiedPathError,
    StateMismatchError,
)
from savegame.format.manifest import Manifest, parse_manifest
from savegame.run.resume import ResumeWarning
from savegame.storage.base import MANIFEST

__all__ = ["MARKER", "Restored", "report", "restore"]

MARKER = "savegame.ray"
"""The manifest metadata key :func:`report` writes (``{"metrics": ..., "world_size": ...}``)."""

_INSTALL_HINT = "pip install 'savegame[ray]'"


@dataclass(frozen=True)
class Restored:
    """What :func:`restore` loaded.

    ``path``: the checkpoint's path on Ray's storage (``checkpoint.path``); ``checkpoint``: the
    ``ray.train.Checkpoint``; ``metrics``: the metrics :func:`report` stored with it; ``report``: the
    :class:`savegame.LoadReport` of the load (``report.state`` holds the plain items, e.g. ``epoch``);
    ``skipped``: ``(path, reason)`` of each newer checkpoint that was damaged and passed over.
    """

    path: str
    checkpoint: Any
    metrics: Mapping[str, Any]
    report: LoadReport
    skipped: tuple[tuple[str, str], ...] = field(default=())

    @property
    def manifest(self) -> Manifest:
        """The manifest of the checkpoint that was loaded."""
        manifest: Manifest = self.report.manifest
        return manifest


def _ray_train() -> Any:
    """``ray.train``, or a :class:`MissingExtraError` with the install hint when Ray Train is not installed."""
    try:
        return importlib.import_module("ray.train")
    except ImportError as exc:
        raise MissingExtraError(
            f"savegame.ray needs Ray Train, which is not installed: {_INSTALL_HINT} ({exc})"
        ) from None


# ---------------------------------------------------------------------------------------------------
# Report


def report(
    metrics: Mapping[str, Any],
    state: Mapping[str, Any],
    *,
    checkpoint_dir_name: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Report ``metrics`` to Ray Train with ``state`` saved as a savegame checkpoint; call it on every worker.

    The worker with world rank 0 saves ``state`` (what :func:`savegame.save` takes) into a temporary
    directory and reports it as ``ray.train.Checkpoint.from_directory``; Ray copies it to its storage
    before ``report`` returns, and the temporary copy is removed. Other workers report the metrics
    alone (Ray keeps rank 0's metrics). ``checkpoint_dir_name`` is passed to ``ray.train.report``; it
    must be unique for the whole run, resumes included (one that exists already raises
    :class:`savegame.OccupiedPathError`); by default Ray names each checkpoint after its time.
    ``metadata`` (JSON-like) is stored in the manifest beside the metrics (key :data:`MARKER`).

    When the run's ``CheckpointConfig`` ranks checkpoints by ``checkpoint_score_attribute``, ``metrics``
    must hold that attribute as a number: Ray ranks a checkpoint without it as the worst and may delete
    it even when it is the best (:class:`savegame.ConfigError`, raised before anything is saved). Both
    checks read the run's configuration from Ray Train's internal worker context and are skipped where
    it is not reachable.
    """
    _check_report_arguments(metrics, state, metadata)
    train = _ray_train()
    if train.get_context().get_world_rank() != 0:
        train.report(dict(metrics), checkpoint=None, checkpoint_dir_name=checkpoint_dir_name)
        return
    context = _internal_context()
    _check_score_attribute(metrics, _score_attribute(context))
    _check_new_name(checkpoint_dir_name, context)
    stored = {MARKER: {"metrics": _plain_metrics(metrics), "world_size": train.get_context().get_world_size()}}
    with tempfile.TemporaryDirectory(prefix="savegame-ray-") as tmp:
        path = os.path.join(tmp, "checkpoint")
        _save(path, state, metadata={**(metadata or {}), **stored})
        checkpoint = train.Checkpoint.from_directory(path)
        train.report(dict(metrics), checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name)


def _check_report_arguments(metrics: object, state: object, metadata: object) -> None:
    """A :class:`savegame.ConfigError` naming the argument of :func:`report` that is not a mapping (every
    rank checks, before anything is reported or saved; a list or None used to fail as an AttributeError)."""
    for name, value, allow_none in (("metrics", metrics, False), ("state", state, False), ("metadata", metadata, True)):
        if isinstance(value, Mapping) or (allow_none and value is None):
            continue
        raise ConfigError(
            f"savegame.ray.report: {name} must be a dict, not {type(value).__name__}"
            + (" (e.g. report({'loss': loss}, {'model': model, 'optimizer': optimizer}))" if name != "metadata" else
               " of JSON-like values, or None")
        )
    bad = next((k for k in metrics if not isinstance(k, str)), None)  # type: ignore[attr-defined]
    if bad is not None:
        raise ConfigError(f"savegame.ray.report: metrics keys must be str (Ray Train's rule), not {bad!r}")


def _internal_context() -> Any:
    """Ray Train's internal context of this worker (run config, storage), or None when not reachable.

    Ray's public worker API exposes neither the run's ``CheckpointConfig`` nor its storage; the internal
    train context of Ray Train v2 does (Ray 2.60). The checks that use it are skipped without it.
    """
    try:
        module = importlib.import_module("ray.train.v2._internal.execution.context")
        return module.get_train_context()
    except Exception:  # another Ray version, Train v1, or outside a worker: Ray's own behaviour
        return None


def _score_attribute(context: Any) -> str | None:
    """The run's ``CheckpointConfig.checkpoint_score_attribute`` (None when unset or not readable)."""
    try:
        config = context.train_run_context.run_config.checkpoint_config
    except AttributeError:
        return None
    attribute = getattr(config, "checkpoint_score_attribute", None)
    return attribute if isinstance(attribute, str) else None


def _check_new_name(name: str | None, context: Any) -> None:
    """Refuse a ``checkpoint_dir_name`` that already exists in the run's storage.

    Ray would copy the new checkpoint into the existing directory (mixing two checkpoints' files), and
    its retention, deleting the older entry, would delete the newer checkpoint with it. A name reported
    again after a resume (``epoch-3`` once more after falling back to epoch 2) is the usual way there.
    """
    if name is None:
        return
    try:
        storage = context.storage_context
        path = storage.build_checkpoint_path_from_name(name)
        info = storage.storage_filesystem.get_file_info(path)
    except Exception:  # not reachable: no check
        return
    if getattr(getattr(info, "type", None), "name", "NotFound") != "NotFound":
        raise OccupiedPathError(
            f"savegame.ray.report: checkpoint_dir_name={name!r} already exists in the run's storage ({path}); "
            "Ray would merge the new checkpoint into it and its retention could later delete both. Use a name "
            "that is unique for the whole run, resumes included, or leave checkpoint_dir_name unset (Ray "
            "names each checkpoint after its time)"
        )


def _check_score_attribute(metrics: Mapping[str, Any], attribute: str | None) -> None:
    """Refuse a report Ray would rank as the worst for lack of its score (see :func:`report`)."""
    if attribute is None:
        return
    flat = _flatten(metrics)
    value = flat.get(attribute)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        shown = "missing" if attribute not in flat else f"{type(value).__name__} {value!r}"
        raise ConfigError(
            f"savegame.ray.report: metrics[{attribute!r}] is {shown}, but the run's CheckpointConfig ranks "
            f"checkpoints by checkpoint_score_attribute={attribute!r}; Ray would rank this checkpoint as the "
            f"worst and could delete it even if it is the best. Report {attribute!r} as a number with every "
            f"checkpoint (metrics have {sorted(flat)})"
        )


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metrics flattened with ``/`` as Ray flattens them to find the score attribute."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def _plain_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The metrics savegame can keep in a manifest: finite numbers and strings, by their flat name."""
    plain: dict[str, Any] = {}
    for key, value in _flatten(metrics).items():
        if isinstance(value, (bool, str)):
            plain[key] = value
        elif isinstance(value, numbers.Integral):
            plain[key] = int(value)
        elif isinstance(value, numbers.Real) and math.isfinite(float(value)):
            plain[key] = float(value)
    return plain


# ---------------------------------------------------------------------------------------------------
# Restore


def restore(
    state: Mapping[str, Any],
    *,
    checkpoint: Any = None,
    strict: bool = True,
    map_location: Any = None,
) -> Restored | None:
    """Load the checkpoint to resume from into ``state`` in place; None when there is none.

    ``checkpoint``: a ``ray.train.Checkpoint`` (e.g. ``result.checkpoint`` after ``trainer.fit()``);
    by default ``ray.train.get_checkpoint()``, which inside a training worker is the newest checkpoint
    Ray registered for this run (None on a fresh run). Every file's hash is checked before anything in
    ``state`` changes. When the default checkpoint is damaged, the newest intact one Ray still keeps
    is loaded instead (with a :class:`savegame.ResumeWarning`); an explicit ``checkpoint`` is loaded
    or refused, never replaced. ``strict`` and ``map_location`` are :func:`savegame.load`'s.
    """
    if not isinstance(state, Mapping):
        raise ConfigError(f"savegame.ray.restore: state must be a dict of what to restore (e.g. "
                          f"{{'model': model, 'optimizer': opt}}), got {type(state).__name__}")  # fmt: skip
    if checkpoint is not None and not callable(getattr(checkpoint, "as_directory", None)):
        raise ConfigError(
            f"savegame.ray.restore: checkpoint must be a ray.train.Checkpoint (e.g. result.checkpoint), got "
            f"{type(checkpoint).__name__} {checkpoint!r:.80}; for a checkpoint directory use "
            "ray.train.Checkpoint.from_directory(path), or savegame.load(path, state)"
        )
    train = _ray_train()
    explicit = checkpoint is not None
    if not explicit:
        checkpoint = train.get_checkpoint()
        if checkpoint is None:
            return None
    try:
        return _restore_one(checkpoint, state, strict=strict, map_location=map_location)
    except CorruptCheckpointError as damage:
        if explicit:
            raise
        return _fall_back(train, checkpoint, damage, state, strict=strict, map_location=map_location)


def _restore_one(checkpoint: Any, state: Mapping[str, Any], *, strict: bool, map_location: Any,
                 skipped: tuple[tuple[str, str], ...] = ()) -> Restored:  # fmt: skip
    """Load one Ray checkpoint (verified) into ``state``."""
    with _local_directory(checkpoint) as directory:
        _check_is_savegame(directory, checkpoint)
        try:
            loaded = _load(directory, state, strict=strict, map_location=map_location)
        except StateMismatchError as exc:
            raise StateMismatchError(f"{exc}{_writer_hint(_manifest_in(directory))}", exc.report) from exc
    stored = loaded.manifest.metadata.get(MARKER)
    metrics = stored.get("metrics", {}) if isinstance(stored, Mapping) else {}
    return Restored(path=str(checkpoint.path), checkpoint=checkpoint, metrics=dict(metrics), report=loaded,
                    skipped=skipped)  # fmt: skip


@contextmanager
def _local_directory(checkpoint: Any) -> Iterator[str]:
    """The checkpoint as a local directory: its own path on local storage, a downloaded copy otherwise."""
    with checkpoint.as_directory() as directory:
        yield str(directory)


def _check_is_savegame(directory: str, checkpoint: Any) -> None:
    """A :class:`NotACheckpointError` that says what to do when a Ray checkpoint has no savegame manifest."""
    if os.path.isfile(os.path.join(directory, MANIFEST)):
        return
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        names = []
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "nothing"
    raise ForeignCheckpointError(
        f"{checkpoint.path}: this Ray checkpoint is not a savegame checkpoint (no {MANIFEST}; it holds {shown}). "
        "It was written by a training function that does not use savegame.ray.report (e.g. with torch.save): "
        "load it with the code that wrote it, or start a fresh run (a new RunConfig(name=...)) whose "
        "training function reports with savegame.ray.report"
    )


def _manifest_in(directory: str) -> Manifest | None:
    """The manifest of a local checkpoint directory, or None when it cannot be read."""
    try:
        with open(os.path.join(directory, MANIFEST), "rb") as f:
            return parse_manifest(f.read(), directory)
    except (OSError, CorruptCheckpointError):
        return None


def _writer_hint(manifest: Manifest | None) -> str:
    """What to add to a mismatch message when the checkpoint was not written by :func:`report`."""
    if manifest is None or MARKER in manifest.metadata:
        return ""
    return (
        f" (this checkpoint was not written by savegame.ray.report: its items are {list(manifest.items)}; "
        "restore it with the code that wrote it, or load it with strict=False)"
    )


def _fall_back(train: Any, newest: Any, damage: CorruptCheckpointError, state: Mapping[str, Any], *, strict: bool,
               map_location: Any) -> Restored:  # fmt: skip
    """Load the newest intact checkpoint older than the damaged ``newest``, or raise naming all tried."""
    skipped = [(str(newest.path), str(damage))]
    for candidate in _older_checkpoints(train, newest):
        try:
            restored = _restore_one(candidate, state, strict=strict, map_location=map_location,
                                    skipped=tuple(skipped))  # fmt: skip
        except (CorruptCheckpointError, ForeignCheckpointError) as exc:  # damaged, or no manifest at all
            skipped.append((str(candidate.path), str(exc)))
            continue
        warn(_fallback_message(restored), ResumeWarning, stacklevel=3)
        return restored
    tried = "\n".join(f"  {path}: {reason}" for path, reason in skipped)
    message = (
        f"no intact savegame checkpoint to resume from among the {len(skipped)} Ray keeps for this run:\n{tried}\n"
        "Restore a copy of a checkpoint, or start a fresh run (a new RunConfig(name=...))"
    )
    try:
        error = type(damage)(message)
    except TypeError:
        error = CorruptCheckpointError(message)
    raise error from damage


def _fallback_message(restored: Restored) -> str:
    passed = "; ".join(f"{path}: {reason}" for path, reason in restored.skipped)
    return f"savegame.ray.restore: resumed from {restored.path}, the newest intact checkpoint; skipped {passed}"


def _older_checkpoints(train: Any, newest: Any) -> list[Any]:
    """The checkpoints Ray keeps for this run other than ``newest``, newest first (by their manifest's
    commit time; a checkpoint whose manifest cannot be read comes last, and then fails to load)."""
    consistency = train.CheckpointConsistencyMode.COMMITTED
    reported = train.get_all_reported_checkpoints(consistency_mode=consistency)
    others = [r.checkpoint for r in reported if str(r.checkpoint.path) != str(newest.path)]
    dated = [(_created(c), i, c) for i, c in enumerate(others)]
    readable = sorted(((t, i, c) for t, i, c in dated if t is not None), key=lambda e: (e[0], e[1]), reverse=True)
    return [c for _, _, c in readable] + [c for t, _, c in dated if t is None]


def _created(checkpoint: Any) -> Any:
    """The commit time in a Ray checkpoint's manifest, read through Ray's filesystem (None if unreadable)."""
    path = f"{str(checkpoint.path).rstrip('/')}/{MANIFEST}"
    try:
        with checkpoint.filesystem.open_input_stream(path) as f:
            return parse_manifest(f.read(), path).created
    except Exception:  # pyarrow raises its own types; an unreadable manifest only sorts last
        return None
