"""savegame for Hugging Face ``transformers.Trainer``: a drop-in subclass that writes savegame checkpoints.

One-line change::

    from savegame.transformers import Trainer        # instead of: from transformers import Trainer
    trainer = Trainer(model=model, args=TrainingArguments(output_dir="out", save_steps=50, save_total_limit=2,
                      load_best_model_at_end=True, metric_for_best_model="eval_loss", ...), ...)
    trainer.train()                                  # later: trainer.train(resume_from_checkpoint=True)

Projects that subclass ``Trainer`` themselves put :class:`SavegameTrainerMixin` first in their bases:
``class MyTrainer(SavegameTrainerMixin, transformers.Trainer)``.

Each save of the Trainer (``save_steps``, ``save_strategy``, the best-model saves) becomes one
savegame checkpoint ``output_dir/checkpoint-<step>``, committed atomically (it appears whole or not at
all), fsynced and hash-verified on load, with nothing pickled. What it holds:

* ``model.safetensors``: the model's ``state_dict`` (savegame's tensor file of the item ``model``, a
  plain safetensors file whose names are the ``state_dict`` keys), so ``from_pretrained(checkpoint)``
  opens the checkpoint directly, and so does ``savegame export``;
* ``optimizer.safetensors``, ``rng.safetensors`` and the scheduler (and the AMP scaler, if any) in the
  manifest: what ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt`` and ``rng_state.pth`` hold in a
  stock checkpoint (Python, NumPy and torch generators);
* side files, committed in the same transaction: ``config.json`` (and ``generation_config.json``,
  the processing class's files) written by transformers' own ``save_pretrained``, ``trainer_state.json``
  (``TrainerState.save_to_json``) and ``training_args.json`` (``TrainingArguments.to_json_string``:
  the arguments as JSON, where transformers pickles ``training_args.bin``). Their sizes and hashes are
  recorded in the manifest's metadata and checked before they are used.

``train(resume_from_checkpoint=True)`` resumes from the newest checkpoint of ``output_dir`` that
passes verification: a damaged one is skipped with a :class:`~savegame.ResumeWarning` (left in place)
and the next older one used. An explicit path must verify, or the error says what is wrong.
``save_total_limit`` deletes only committed checkpoints written by this module, never the best
(``state.best_model_checkpoint``) nor the one just saved; other folders in ``output_dir`` are never
touched. ``load_best_model_at_end`` loads the best checkpoint's weights through savegame (verified).
``save_model()`` writes transformers' own ``save_pretrained`` layout, with ``training_args.json``
instead of the pickled ``training_args.bin``.

Limits: one process (``world_size`` 1; multi-process runs: :mod:`savegame.distributed`), no DeepSpeed
or FSDP, no ``push_to_hub`` of checkpoints (transformers' upload pickles the arguments): each is refused
with a :class:`~savegame.ConfigError` when the Trainer is built.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any

from savegame.errors import MissingExtraError

try:
    import transformers
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as _missing:  # pragma: no cover - exercised in a subprocess without transformers
    raise MissingExtraError(
        f"savegame.transformers needs Hugging Face transformers ({_missing}): pip install 'savegame[transformers]'"
    ) from _missing

from savegame._util.gcpause import gc_paused
from savegame._util.logs import warn
from savegame.adapters.rng import RNGState
from savegame.api import load, read_manifest, verify
from savegame.engine.write_loop import EncodedExtras
from savegame.engine.writer import encode_state, write_encoded
from savegame.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    ForeignCheckpointError,
    HashMismatchError,
    MissingFileError,
    NotACheckpointError,
    StateMismatchError,
    TruncatedFileError,
)
from savegame.format.hashing import hash_bytes
from savegame.format.manifest import Manifest
from savegame.run.resume import ResumeWarning
from savegame.storage import LocalStorage
from savegame.storage.base import MANIFEST
from savegame.storage.local.root import remove_dead_staging_once

__all__ = [
    "MARKER",
    "SavegameTrainerMixin",
    "Trainer",
    "check_checkpoint",
    "last_checkpoint",
    "save_checkpoint",
]

MARKER = "savegame.transformers"
"""Key of this module's metadata in a checkpoint's manifest (format version, side files' hashes)."""

FORMAT = 1
STOCK_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt", "training_args.bin", "pytorch_model.bin")
"""Files of a checkpoint written by transformers' own Trainer (``torch.save``: pickles)."""

TRAINING_ARGS_JSON = "training_args.json"
TRAINER_STATE = "trainer_state.json"
_STEP = re.compile(rf"^{re.escape(PREFIX_CHECKPOINT_DIR)}-(\d+)$")
_TRAINING_ITEMS = ("optimizer", "scheduler", "rng")


# --------------------------------------------------------------------------------------------------
# Writing one checkpoint


def _side_files(trainer: transformers.Trainer, model: Any) -> dict[str, bytes]:
    """The small JSON files of a checkpoint, written by transformers' own serialisers into a scratch
    folder and read back (so their content is exactly what transformers writes)."""
    with tempfile.TemporaryDirectory(prefix="savegame-hf-") as scratch:
        config = getattr(model, "config", None)
        if config is not None:
            config.save_pretrained(scratch)
        generation = getattr(model, "generation_config", None)
        can_generate = getattr(model, "can_generate", None)
        if generation is not None and callable(can_generate) and can_generate():
            generation.save_pretrained(scratch)
        processing = trainer.processing_class
        if processing is not None and hasattr(processing, "save_pretrained"):
            processing.save_pretrained(scratch)
        trainer.state.save_to_json(os.path.join(scratch, TRAINER_STATE))
        with open(os.path.join(scratch, TRAINING_ARGS_JSON), "w", encoding="utf-8") as handle:
            handle.write(_arguments_json(trainer.args))
        files = {}
        for name in sorted(os.listdir(scratch)):
            full = os.path.join(scratch, name)
            if not os.path.isfile(full):
                raise ConfigError(f"saving a checkpoint: {name!r} written by save_pretrained is a folder; "
                                  "savegame checkpoints hold flat side files only")  # fmt: skip
            with open(full, "rb") as handle:
                files[name] = handle.read()
    return files


def _arguments_json(args: transformers.TrainingArguments) -> str:
    """The training arguments as transformers writes them to JSON (tokens redacted, enums as strings)."""
    text: str = args.to_json_string()  # type: ignore[no-untyped-call]
    return text


def _training_state(trainer: transformers.Trainer) -> dict[str, Any]:
    """Optimizer, scheduler, scaler and RNG: what resuming needs beyond the weights and the JSON files."""
    state: dict[str, Any] = {}
    if trainer.optimizer is not None:
        state["optimizer"] = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # AcceleratedOptimizer
    if trainer.lr_scheduler is not None:
        state["scheduler"] = trainer.lr_scheduler
    scaler = getattr(trainer.accelerator, "scaler", None)
    if scaler is not None:
        state["scaler"] = scaler
    state["rng"] = RNGState()
    return state


@gc_paused()
def save_checkpoint(path: str, trainer: transformers.Trainer) -> Manifest:
    """Commit ``trainer``'s state as the savegame checkpoint ``path`` (replacing an older one there).

    The model goes in as the item ``model`` (file ``model.safetensors``), then the optimizer, scheduler,
    scaler and RNG unless ``args.save_only_model``; the JSON side files go into the same transaction.
    """
    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    state: dict[str, Any] = {"model": model}
    if not trainer.args.save_only_model:
        state.update(_training_state(trainer))
    files = _side_files(trainer, model)
    metadata = {
        MARKER: {
            "format": FORMAT,
            "transformers": transformers.__version__,
            "files": {name: {"bytes": len(data), "hash": hash_bytes(data)} for name, data in files.items()},
        }
    }
    progress = {"step": int(trainer.state.global_step), "epoch": float(trainer.state.epoch or 0.0)}
    root, name = os.path.split(os.path.abspath(path))
    _refuse_to_replace_foreign(path)
    extras = EncodedExtras.encode(metadata, progress)
    storage = LocalStorage(root)
    remove_dead_staging_once(storage)  # what crashed saves of dead processes left, as savegame.save does
    _, manifest = write_encoded(storage, name, encode_state(state), extras, overwrite=True,
                                side_files=files)  # fmt: skip
    return manifest


def _refuse_to_replace_foreign(path: str) -> None:
    """:class:`ForeignCheckpointError` when ``path`` holds a readable savegame checkpoint this module did not
    write (``savegame.save``, a Checkpointer, another integration): a save there would replace it."""
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        return
    try:
        manifest = read_manifest(path)
    except CorruptCheckpointError:
        return  # damaged: replaced by the save, as a damaged checkpoint of ours is
    metadata = manifest.metadata if isinstance(manifest.metadata, Mapping) else {}
    if MARKER not in metadata:
        raise ForeignCheckpointError(
            f"refusing to save over {path}: it is a savegame checkpoint written by something else than "
            "savegame.transformers (savegame.save, a Checkpointer or another integration); move it out of "
            "output_dir or choose another output_dir"
        )


# --------------------------------------------------------------------------------------------------
# Checking and finding checkpoints


def _foreign_stock(path: str) -> ForeignCheckpointError:
    found = [f for f in STOCK_FILES if os.path.exists(os.path.join(path, f))]
    return ForeignCheckpointError(
        f"{path}: a checkpoint written by transformers' own Trainer ({', '.join(found)}: torch.save pickles), not "
        "by savegame.transformers; savegame never unpickles. Resume it with transformers.Trainer, or start the "
        "run again with savegame.transformers.Trainer (its checkpoints are savegame checkpoints); the weights "
        "of a stock checkpoint can be opened with from_pretrained"
    )


def _manifest(path: str) -> Manifest:
    """The manifest of ``path``, refused when it is not a checkpoint of this module (the error says why)."""
    if not os.path.isdir(path):
        raise CheckpointNotFoundError(f"{path}: no such checkpoint folder")
    if not os.path.exists(os.path.join(path, "manifest.json")):
        if any(os.path.exists(os.path.join(path, f)) for f in STOCK_FILES):
            raise _foreign_stock(path)
        raise NotACheckpointError(f"{path}: not a savegame checkpoint (no manifest.json)")
    manifest = read_manifest(path)
    if not isinstance(manifest.metadata.get(MARKER), Mapping):
        raise ForeignCheckpointError(
            f"{path}: a savegame checkpoint not written by savegame.transformers (items: "
            f"{', '.join(sorted(manifest.items))}); load it with the integration that wrote it or with "
            "savegame.load, not with a transformers Trainer's resume_from_checkpoint"
        )
    return manifest


def _check_side_files(path: str, manifest: Manifest) -> None:
    """Each side file recorded in the metadata exists with its recorded size and hash."""
    files = manifest.metadata[MARKER].get("files", {})
    if not isinstance(files, Mapping):
        raise CorruptCheckpointError(f"{path}: metadata {MARKER}.files must be a mapping")
    for name, entry in files.items():
        full = os.path.join(path, str(name))
        if os.path.basename(str(name)) != name or not isinstance(entry, Mapping):
            raise CorruptCheckpointError(f"{path}: invalid side file entry {name!r} in the metadata")
        try:
            with open(full, "rb") as handle:
                data = handle.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise MissingFileError(
                f"{full}: listed in the checkpoint's metadata but missing (or not a regular file)"
            ) from None
        if len(data) != entry.get("bytes"):
            raise TruncatedFileError(f"{full}: {len(data)} bytes, the checkpoint's metadata says {entry.get('bytes')}")
        if hash_bytes(data) != entry.get("hash"):
            raise HashMismatchError(f"{full}: content hash differs from the one recorded in the checkpoint")


def check_checkpoint(path: str | os.PathLike[str], *, for_resume: bool = True) -> Manifest:
    """Verify the checkpoint ``path`` fully (tensor files, side files) and return its manifest.

    Raises :class:`ForeignCheckpointError` for a stock transformers checkpoint or another integration's,
    :class:`NotACheckpointError`/:class:`CheckpointNotFoundError` for other folders, a
    :class:`CorruptCheckpointError` subclass for damage, and (``for_resume``) :class:`StateMismatchError`
    for a ``save_only_model`` checkpoint, which holds no optimizer or RNG state to resume from.
    """
    where = os.fspath(path)
    manifest = _manifest(where)
    verify(where)
    _check_side_files(where, manifest)
    if for_resume and not all(item in manifest.items for item in _TRAINING_ITEMS):
        raise StateMismatchError(
            f"{where}: saved with save_only_model=True (no optimizer, scheduler or RNG state), so training cannot "
            "resume exactly from it; open its weights with from_pretrained, or resume from a full checkpoint"
        )
    return manifest


def _numbered(run_dir: str) -> list[tuple[int, str]]:
    """``(step, path)`` of the ``checkpoint-<step>`` folders of ``run_dir``, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for entry in os.scandir(run_dir):
        match = _STEP.match(entry.name)
        if match and entry.is_dir(follow_symlinks=False):
            found.append((int(match.group(1)), entry.path))
    return sorted(found)


def last_checkpoint(run_dir: str | os.PathLike[str]) -> str:
    """The newest ``checkpoint-<step>`` of ``run_dir`` that verifies (what ``resume_from_checkpoint=True``
    uses): damaged or foreign ones are skipped with a :class:`ResumeWarning` and left in place."""
    root = os.fspath(run_dir)
    damaged: list[str] = []
    foreign: list[CheckpointError] = []
    for _, path in reversed(_numbered(root)):
        try:
            check_checkpoint(path)
        except CorruptCheckpointError as exc:
            damaged.append(path)
            warn(f"skipping damaged checkpoint {path}: {exc}; trying the next older one", ResumeWarning,
                          stacklevel=2)  # fmt: skip
            continue
        except (NotACheckpointError, StateMismatchError) as exc:
            foreign.append(exc)
            warn(f"skipping {path}: {exc}", ResumeWarning, stacklevel=2)
            continue
        return path
    if foreign and not damaged:
        raise ForeignCheckpointError(f"{root}: no savegame.transformers checkpoint to resume from; {foreign[-1]}")
    if damaged:
        raise CorruptCheckpointError(f"{root}: every checkpoint is damaged ({', '.join(damaged)}); nothing to resume")
    raise CheckpointNotFoundError(f"{root}: no checkpoint-<step> folder to resume from")


def _ours(path: str) -> bool:
    """Whether ``path`` is a committed checkpoint written by this module (what retention may delete)."""
    try:
        return isinstance(read_manifest(path).metadata.get(MARKER), Mapping)
    except CheckpointError:
        return False


def rotate(run_dir: str, *, limit: int | None, keep: set[str]) -> list[str]:
    """Delete the oldest of this module's committed checkpoints beyond ``limit``; never one in ``keep``
    (the best and the one just saved), never anything else. Returns the deleted paths."""
    if limit is None or limit <= 0:
        return []
    kept = {os.path.abspath(p) for p in keep}
    ours = [path for _, path in _numbered(run_dir) if _ours(path)]
    deletable = [p for p in ours if os.path.abspath(p) not in kept]
    excess = len(ours) - max(limit, len(ours) - len(deletable))
    storage = LocalStorage(run_dir, create=False)
    deleted = []
    for path in deletable[: max(excess, 0)]:
        storage.delete(os.path.basename(path))
        deleted.append(path)
    return deleted


# --------------------------------------------------------------------------------------------------
# The Trainer


class SavegameTrainerMixin(transformers.Trainer):
    """Makes a ``transformers.Trainer`` (sub)class save and resume through savegame; put it first in the
    bases. It replaces the Trainer's checkpoint hooks (``_save_checkpoint``, ``_load_from_checkpoint``,
    ``_load_optimizer_and_scheduler``, ``_load_scaler``, ``_load_rng_state``, ``_load_best_model``,
    ``_save``) and the choice of the checkpoint for ``resume_from_checkpoint=True``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._savegame_refuse_unsupported()

    def _savegame_refuse_unsupported(self) -> None:
        reasons = []
        if self.args.world_size > 1:
            reasons.append(f"world_size={self.args.world_size} (one process only; see savegame.distributed)")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            reasons.append("DeepSpeed/FSDP")
        if self.args.push_to_hub:
            reasons.append("push_to_hub (transformers' checkpoint upload pickles training_args.bin)")
        if reasons:
            raise ConfigError(f"savegame.transformers.Trainer does not support {', '.join(reasons)}")

    # -- resuming --------------------------------------------------------------------------------

    def train(  # type: ignore[override]
        self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None, **kwargs: Any,
    ) -> Any:  # fmt: skip
        """``transformers.Trainer.train``; ``resume_from_checkpoint=True`` takes the newest checkpoint of
        ``output_dir`` that verifies, a path must verify (see :func:`check_checkpoint`)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_checkpoint(self.args.output_dir or ".")
        elif resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            if not isinstance(resume_from_checkpoint, (str, os.PathLike)):
                raise ConfigError(
                    "Trainer.train: resume_from_checkpoint must be True, a checkpoint folder's path or None, not "
                    f"{type(resume_from_checkpoint).__name__} {resume_from_checkpoint!r:.60}"
                )
            resume_from_checkpoint = os.fspath(resume_from_checkpoint)
            check_checkpoint(resume_from_checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)  # fmt: skip

    def _savegame_load(self, checkpoint: str, target: dict[str, Any]) -> None:
        load(checkpoint, target, map_location=self.args.device)

    def _unwrapped_model(self, model: Any = None) -> Any:
        return self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        self._savegame_load(resume_from_checkpoint, {"model": self._unwrapped_model(model)})

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        target: dict[str, Any] = {}
        if self.optimizer is not None:
            target["optimizer"] = getattr(self.optimizer, "optimizer", self.optimizer)
        if self.lr_scheduler is not None:
            target["scheduler"] = self.lr_scheduler
        try:
            self._savegame_load(checkpoint, target)
        except StateMismatchError as exc:  # the Trainer loads the model before it builds the optimizer
            raise StateMismatchError(
                f"{exc}\nThe model's weights were already loaded from {checkpoint} (the Trainer restores the model "
                "before it builds the optimizer): resume with the optimizer settings of the run that saved it "
                "(optim, its arguments, frozen parameters), or start again from the weights alone",
                exc.report,
            ) from exc

    def _load_scaler(self, checkpoint: str | None) -> None:
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is None or scaler is None:
            return
        self._savegame_load(checkpoint, {"scaler": scaler})

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is not None:
            self._savegame_load(checkpoint, {"rng": RNGState()})

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None:
            return
        check_checkpoint(best, for_resume=False)
        self._savegame_load(best, {"model": self._unwrapped_model()})

    # -- saving ----------------------------------------------------------------------------------

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """What ``transformers.Trainer._save_checkpoint`` does, as one savegame commit, then retention."""
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        run_dir = self._get_output_dir(trial=trial)
        path = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        best_step = self.state.best_global_step
        if self.args.save_strategy in ("steps", "epoch", "best") and best_step:
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best_step}")
            if best == path or os.path.isdir(best):
                self.state.best_model_checkpoint = best
        if not self.args.should_save:
            return
        self._savegame_update_callback_states()
        save_checkpoint(path, self)
        keep = {path} | ({self.state.best_model_checkpoint} if self.state.best_model_checkpoint else set())
        rotate(run_dir, limit=self.args.save_total_limit, keep=keep)

    def _savegame_update_callback_states(self) -> None:
        """Record the ``ExportableState`` callbacks' state in ``self.state`` (as the stock save does)."""
        exportable = transformers.trainer_callback.ExportableState
        states: Any = self.state.stateful_callbacks  # a dict by class name once the state is initialised
        for cb in [c for c in [*self.callback_handler.callbacks, self.control] if isinstance(c, exportable)]:
            name = cb.__class__.__name__
            if isinstance(states.get(name), list):
                states[name].append(cb.state())
            else:
                states[name] = cb.state()

    def _finalize_training(self, trial: Any, num_train_samples: Any, start_time: Any) -> Any:
        """The stock end of training, whose ``save_total_limit=1`` cleanup (``shutil.rmtree`` of every
        ``checkpoint-*`` folder but the best) is replaced by :func:`rotate` (committed checkpoints of
        this module only)."""
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            output = super()._finalize_training(trial, num_train_samples, start_time)  # type: ignore[no-untyped-call]
        finally:
            self.args.save_total_limit = limit
        best = self.state.best_model_checkpoint
        if limit == 1 and best is not None and self.args.should_save:
            rotate(self._get_output_dir(trial), limit=1, keep={best})
        return output

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        """``save_model``: transformers' ``save_pretrained`` layout, with ``training_args.json`` instead of
        the pickled ``training_args.bin``."""
        output_dir = output_dir or self.args.output_dir or "."
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self._unwrapped_model()
        if isinstance(model, transformers.PreTrainedModel):
            model.save_pretrained(output_dir, state_dict=state_dict)
        else:
            from safetensors.torch import save_file

            save_file(state_dict if state_dict is not None else model.state_dict(),
                      os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})  # fmt: skip
        if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
            self.processing_class.save_pretrained(output_dir)
        with open(os.path.join(output_dir, TRAINING_ARGS_JSON), "w", encoding="utf-8") as handle:
            handle.write(_arguments_json(self.args))


class Trainer(SavegameTrainerMixin, transformers.Trainer):
    """``transformers.Trainer`` whose checkpoints are savegame checkpoints (see the module docstring)."""

