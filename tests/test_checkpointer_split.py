"""The Checkpointer split into one-job modules (issue 16, item 5): every name and keyword a user had
still works from ``savegame.run.checkpointer``, and each moved job has exactly one home."""

from __future__ import annotations

import inspect

import savegame.run.checkpointer as cp
from savegame.policies import knob_policies
from savegame.run import checks as run_checks
from savegame.run import records, resume

CONSTRUCTOR_KEYWORDS = (
    "save", "keep", "monitor", "mode", "min_delta", "threshold", "every_n_epochs", "every_n_steps",
    "every_seconds", "every", "mtbf_seconds", "max_overhead", "save_best_only", "save_at_end",
    "skip_first_epochs", "keep_last", "keep_best", "name", "weights_only", "rng", "background", "if_busy",
    "writer_nice", "write_rate", "incremental", "snapshot", "restart",
    "verify", "max_epochs", "metadata", "clock", "wall_clock", "storage_options", "mirror", "mirror_options",
    "lock", "save_on_signal", "signal_action", "signal_exit_code", "group", "per_rank",
    "callbacks", "quiet", "preemption", "storage",
)  # fmt: skip


def test_constructor_keeps_every_keyword() -> None:
    params = inspect.signature(cp.Checkpointer.__init__).parameters
    assert [p for p in params if p not in ("self", "directory")] == list(CONSTRUCTOR_KEYWORDS)
    assert all(params[k].kind is inspect.Parameter.KEYWORD_ONLY for k in CONSTRUCTOR_KEYWORDS)


def test_moved_names_are_re_exported_not_copied() -> None:
    homes = {
        records: ("CheckpointRecord", "SaveResult", "RestoredProgress", "new_run_id"),
        resume: ("ResumeWarning", "RNG_ITEM", "DISTRIBUTED_ITEM"),
        knob_policies: ("AlignedSchedule", "build_save_policy", "build_keep_policy", "coerce_metrics"),
        run_checks: ("check_run_root",),
    }
    for module, names in homes.items():
        for name in names:
            assert getattr(cp, name) is getattr(module, name), f"savegame.run.checkpointer.{name}"
    for name in cp.__all__:
        assert hasattr(cp, name)


def test_knob_translation_is_the_constructors(tmp_path) -> None:
    ckpt = cp.Checkpointer(tmp_path / "run", keep_last=2, monitor="val_loss", every_n_epochs=3, lock=False)
    chosen = knob_policies.policies_from_knobs(
        save=None, keep=None, monitor="val_loss", mode="auto", min_delta=0.0, threshold=None,
        every_n_epochs=3, every_n_steps=None, every_seconds=None, every=None, mtbf_seconds=86400.0,
        max_overhead=0.05, save_best_only=False, save_at_end=None, skip_first_epochs=0, keep_last=2, keep_best=None,
    )  # fmt: skip
    assert (ckpt.monitor, ckpt.mode) == (chosen.monitor, chosen.mode) == ("val_loss", "min")
    assert repr(ckpt.save_policy) == repr(chosen.save_policy)
    assert repr(ckpt.keep_policy) == repr(chosen.keep_policy)
    ckpt.close()
