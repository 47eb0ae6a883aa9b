"""savegame.transformers: a real transformers.Trainer (tiny GPT-2, CPU, offline) writing and resuming
savegame checkpoints: exact resume (in process, and after SIGKILL), fallback past a damaged checkpoint,
retention that keeps the best, from_pretrained on the checkpoint, nothing pickled, bad input refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import _hf_train as hf  # noqa: E402  (tests/_hf_train.py: the tiny model, data and arguments)
import savegame  # noqa: E402
import savegame.transformers as sgt  # noqa: E402
from distributed._common import pickle_forbidden  # noqa: E402
from savegame.errors import (  # noqa: E402
    CheckpointNotFoundError,
    CorruptCheckpointError,
    ForeignCheckpointError,
    HashMismatchError,
    MissingFileError,
    StateMismatchError,
)

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
STEPS = 12


class StopAt(TrainerCallback):
    """Stop training at the end of optimizer step ``step`` (before its save): an interruption in process."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False


def train(out: Path, *, resume: Any = None, stop_at: int | None = None, **overrides: Any) -> Any:
    callbacks = [StopAt(stop_at)] if stop_at else []
    trainer = hf.build_trainer(str(out), callbacks=callbacks, **overrides)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"parameters differ from the uninterrupted run: {different[:5]}"


def assert_no_pickle(root: Path) -> None:
    """Every file under ``root`` is JSON or a valid safetensors file (the shape test_dist_no_pickle checks)."""
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    for f in files:
        assert not f.name.endswith((".pt", ".pth", ".bin", ".pkl")), f
        if f.suffix == ".json":
            json.loads(f.read_text())
        else:
            assert f.suffix == ".safetensors", f
            with safe_open(str(f), framework="pt") as opened:
                assert list(opened.keys())


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Final parameters of an uninterrupted run (no load_best_model_at_end, so the last step's)."""
    return hf.parameters(train(tmp_path_factory.mktemp("reference")))


def steps_of(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))


# --------------------------------------------------------------------------------------------------
# What a checkpoint is


def test_checkpoint_holds_the_full_state_as_savegame_and_nothing_pickled(tmp_path: Path) -> None:
    trainer = train(tmp_path / "out", max_steps=4)
    ckpt = tmp_path / "out" / "checkpoint-4"
    manifest = savegame.verify(str(ckpt))
    assert {"model", "optimizer", "scheduler", "rng"} <= set(manifest.items)
    names = {p.name for p in ckpt.iterdir()}
    assert {"model.safetensors", "config.json", "trainer_state.json", "training_args.json"} <= names
    assert not names & set(sgt.STOCK_FILES)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 4 == trainer.state.global_step
    assert json.loads((ckpt / "training_args.json").read_text())["save_steps"] == 2
    assert_no_pickle(tmp_path / "out")


def test_from_pretrained_and_savegame_export_open_the_weights(tmp_path: Path) -> None:
    trainer = train(tmp_path / "out", max_steps=4)
    ckpt = tmp_path / "out" / "checkpoint-4"
    opened = transformers.GPT2LMHeadModel.from_pretrained(str(ckpt))
    assert_same(hf.parameters(trainer), hf.parameters(opened))
    exported = tmp_path / "weights.safetensors"
    from savegame.cli.app import main as cli

    assert cli(["export", str(ckpt), "--item", "model", "--to", str(exported)]) == 0
    flat = load_file(str(exported))
    assert_same({k: v for k, v in hf.parameters(trainer).items() if k in flat}, flat)


def test_save_model_writes_json_arguments_not_a_pickle(tmp_path: Path) -> None:
    trainer = train(tmp_path / "out", max_steps=2, save_strategy="no", eval_strategy="no")
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "training_args.json").exists()
    assert not (tmp_path / "final" / "training_args.bin").exists()
    assert_no_pickle(tmp_path / "final")
    assert_same(hf.parameters(trainer), hf.parameters(transformers.GPT2LMHeadModel.from_pretrained(
        str(tmp_path / "final"))))  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Resuming exactly


@pytest.mark.slow  # a 12-step run plus a resume (~7 s on an idle machine)
def test_resume_true_continues_exactly(tmp_path: Path, reference: dict[str, Any]) -> None:
    out = tmp_path / "out"
    train(out, stop_at=7)
    assert steps_of(out) == [2, 4, 6]
    with pickle_forbidden() as calls:
        resumed = train(out, resume=True)
    assert calls == []
    assert resumed.state.global_step == STEPS
    assert_same(hf.parameters(resumed), reference)


@pytest.mark.slow  # a 12-step run plus a resume (~7 s on an idle machine)
def test_resume_from_a_path_continues_exactly(tmp_path: Path, reference: dict[str, Any]) -> None:
    out = tmp_path / "out"
    train(out, stop_at=7)
    resumed = train(out, resume=str(out / "checkpoint-4"))
    assert_same(hf.parameters(resumed), reference)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_mid_training_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), str(HERE), env.get("PYTHONPATH")) if p)

    def child(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(HERE / "_hf_train.py"), *args], env=env, capture_output=True,
                              text=True, timeout=240)  # fmt: skip

    killed = child(str(tmp_path / "run"), "--kill-at", "7")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert steps_of(tmp_path / "run") == [2, 4, 6]
    resumed = child(str(tmp_path / "run"), "--resume", "true", "--final", str(tmp_path / "resumed.safetensors"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = child(str(tmp_path / "straight"), "--final", str(tmp_path / "straight.safetensors"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert_same(load_file(str(tmp_path / "resumed.safetensors")), load_file(str(tmp_path / "straight.safetensors")))
    assert_no_pickle(tmp_path / "run")


# --------------------------------------------------------------------------------------------------
# Damage


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.slow  # a 12-step run plus a resume (~7 s on an idle machine)
def test_flipped_byte_in_newest_falls_back_to_the_previous(tmp_path: Path, reference: dict[str, Any]) -> None:
    out = tmp_path / "out"
    train(out, stop_at=7)
    _flip_last_byte(out / "checkpoint-6" / "model.safetensors")
    with pytest.warns(savegame.ResumeWarning, match=r"checkpoint-6"):
        resumed = train(out, resume=True)
    assert_same(hf.parameters(resumed), reference)  # resumed from checkpoint-4, then trained to the end


def test_flipped_byte_with_an_explicit_path_fails_clearly(tmp_path: Path) -> None:
    out = tmp_path / "out"
    train(out, stop_at=7)
    _flip_last_byte(out / "checkpoint-6" / "optimizer.safetensors")
    trainer = hf.build_trainer(str(out))
    before = hf.parameters(trainer)
    with pytest.raises(HashMismatchError, match=r"optimizer.safetensors"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-6"))
    assert_same(hf.parameters(trainer), before)  # refused before anything was loaded


def test_damaged_side_file_is_found(tmp_path: Path) -> None:
    out = tmp_path / "out"
    train(out, max_steps=2)
    state = out / "checkpoint-2" / "trainer_state.json"
    state.write_text(state.read_text().replace('"global_step": 2', '"global_step": 1'))
    with pytest.raises(CorruptCheckpointError, match=r"trainer_state.json"):
        sgt.check_checkpoint(out / "checkpoint-2")
    with pytest.raises(CorruptCheckpointError, match=r"every checkpoint is damaged"), warnings.catch_warnings():
        warnings.simplefilter("ignore", savegame.ResumeWarning)
        sgt.last_checkpoint(out)


def test_a_folder_in_place_of_a_side_file_is_damage_and_resume_falls_back(tmp_path: Path) -> None:
    """A folder where ``config.json`` should be escaped as a bare IsADirectoryError (and aborted
    ``resume_from_checkpoint=True`` instead of falling back to the older checkpoint)."""
    out = tmp_path / "out"
    train(out, max_steps=4)
    config = out / "checkpoint-4" / "config.json"
    config.unlink()
    config.mkdir()
    with pytest.raises(MissingFileError, match=r"config\.json.*not a regular file"):
        sgt.check_checkpoint(out / "checkpoint-4")
    with pytest.warns(savegame.ResumeWarning, match=r"checkpoint-4"):
        assert sgt.last_checkpoint(out) == str(out / "checkpoint-2")


# --------------------------------------------------------------------------------------------------
# Retention and the best model


@pytest.mark.slow  # a 12-step run plus a resume (~7 s on an idle machine)
def test_save_total_limit_keeps_the_best_and_loads_it_at_the_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "checkpoint-1").mkdir(parents=True)  # a folder of the user's, named like a checkpoint
    (out / "checkpoint-1" / "notes.txt").write_text("mine")
    seen: list[list[int]] = []

    class Watch(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            seen.append(steps_of(out))

    # greater_is_better on eval_loss: the best is an early, worse checkpoint, never the newest
    trainer = hf.build_trainer(str(out), callbacks=[Watch()], save_total_limit=1, load_best_model_at_end=True,
                               metric_for_best_model="eval_loss", greater_is_better=True)  # fmt: skip
    trainer.train()
    evals = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    best_step = max(evals, key=lambda s: evals[s])
    assert best_step != STEPS, "precondition: the best must not be the newest checkpoint"
    best = out / f"checkpoint-{best_step}"
    assert trainer.state.best_model_checkpoint == str(best)
    assert all(best_step in s for s in seen if max(s) >= best_step), seen  # kept at every save after it
    assert max(len(s) for s in seen) <= 3  # the user's folder, the best and the newest
    assert steps_of(out) == [1, best_step]  # the end-of-training cleanup of save_total_limit=1 keeps the best
    assert (out / "checkpoint-1" / "notes.txt").read_text() == "mine"
    best_weights = load_file(str(best / "model.safetensors"))
    assert_same({k: v for k, v in hf.parameters(trainer).items() if k in best_weights}, best_weights)


@pytest.mark.slow  # a 12-step run plus a resume (~7 s on an idle machine)
def test_retention_never_deletes_what_is_not_its_own_committed_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "out"
    train(out, max_steps=2, eval_strategy="no", trainer_class=transformers.Trainer)
    os.rename(out / "checkpoint-2", out / "checkpoint-5")  # a stock (pickled) checkpoint
    (out / "checkpoint-0").mkdir()  # an empty folder
    savegame.save(str(out / "checkpoint-3"), {"weights": torch.zeros(2)})  # a savegame checkpoint, not ours
    train(out, max_steps=8, save_total_limit=2)
    assert steps_of(out) == [0, 3, 5, 6, 8]


def test_a_save_never_replaces_another_writers_savegame_checkpoint(tmp_path: Path) -> None:
    """A ``savegame.save`` checkpoint named ``checkpoint-2`` in ``output_dir`` (which retention leaves
    alone) was replaced by the Trainer's save at step 2. Now the save refuses, and the checkpoint stays."""
    out = tmp_path / "out"
    savegame.save(str(out / "checkpoint-2"), {"weights": torch.ones(2)})
    with pytest.raises(ForeignCheckpointError, match=r"refusing to save over .*checkpoint-2"):
        train(out, max_steps=2, eval_strategy="no")
    assert torch.equal(savegame.load(str(out / "checkpoint-2"))["weights"], torch.ones(2))


# --------------------------------------------------------------------------------------------------
# Bad input


def test_stock_transformers_checkpoint_is_refused_with_what_to_do(tmp_path: Path) -> None:
    out = tmp_path / "stock"
    train(out, max_steps=2, eval_strategy="no", trainer_class=transformers.Trainer)
    assert (out / "checkpoint-2" / "optimizer.pt").exists()  # precondition: a stock, pickled checkpoint
    trainer = hf.build_trainer(str(out))
    with pytest.raises(ForeignCheckpointError, match=r"transformers' own Trainer.*optimizer.pt.*never unpickles"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    with pytest.raises(ForeignCheckpointError, match=r"optimizer.pt"), warnings.catch_warnings():
        warnings.simplefilter("ignore", savegame.ResumeWarning)
        trainer.train(resume_from_checkpoint=True)


@pytest.mark.parametrize("value", [123, 1.5, ["checkpoint-2"]])
def test_a_resume_from_checkpoint_of_the_wrong_type_is_a_config_error(tmp_path: Path, value: object) -> None:
    """It raised a bare TypeError from os.fspath."""
    trainer = hf.build_trainer(str(tmp_path))
    with pytest.raises(savegame.ConfigError, match="resume_from_checkpoint must be True"):
        trainer.train(resume_from_checkpoint=value)  # type: ignore[arg-type]


def test_other_integrations_checkpoint_and_missing_ones_are_refused(tmp_path: Path) -> None:
    savegame.save(str(tmp_path / "checkpoint-5"), {"model": hf.tiny_model(), "epoch": 1})
    trainer = hf.build_trainer(str(tmp_path))
    with pytest.raises(ForeignCheckpointError, match=r"not written by savegame\.transformers"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    with pytest.raises(CheckpointNotFoundError):
        hf.build_trainer(str(tmp_path / "empty")).train(resume_from_checkpoint=True)


def test_save_only_model_checkpoint_cannot_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    train(out, max_steps=2, save_only_model=True)
    assert set(savegame.read_manifest(str(out / "checkpoint-2")).items) == {"model"}
    with pytest.raises(StateMismatchError, match=r"save_only_model"):
        hf.build_trainer(str(out)).train(resume_from_checkpoint=str(out / "checkpoint-2"))


@pytest.mark.timeout(120)
def test_import_is_lazy_and_missing_transformers_gives_the_install_hint() -> None:
    code = (
        "import sys, savegame\n"
        "assert 'transformers' not in sys.modules and 'savegame.transformers' not in sys.modules\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'transformers' or name.startswith('transformers.'):\n"
        "            raise ImportError('No module named ' + repr(name))\n"
        "sys.meta_path.insert(0, Block())\n"
        "try:\n"
        "    import savegame.transformers\n"
        "except savegame.CheckpointError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("MissingExtraError") and "pip install 'savegame[transformers]'" in proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_example_runs(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "transformers_trainer.py"), str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=280)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["resumed_equals_uninterrupted"] is True
    assert result["best_kept"] is True
    assert result["best_reopened_equals_loaded_best"] is True
    assert_no_pickle(tmp_path / "run")
