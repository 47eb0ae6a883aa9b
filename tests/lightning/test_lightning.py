"""savegame.lightning: Lightning's own ModelCheckpoint and ckpt_path resume, through SavegameIO.

Real ``lightning`` Trainer, a tiny MLP with dropout on synthetic data, CPU, deterministic. The kill and
DDP cases start fresh processes (``_fit_script.py``) and are marked slow.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import pickle
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from _lithelp import (
    ROOT,
    Config,
    LitMLP,
    assert_identical,
    assert_no_pickle,
    data,
    fit,
    model_checkpoint,
    params,
    run_script,
    script_env,
    trainer,
)
from lightning.fabric.utilities.data import AttributeDict

import savegame
import savegame.lightning as sl
from savegame.errors import (
    BackgroundSaveError,
    ForeignCheckpointError,
    HashMismatchError,
    MissingExtraError,
    NotACheckpointError,
    OccupiedPathError,
    UnsupportedTypeError,
)


def _ckpts(root: Path) -> list[str]:
    return sorted(os.listdir(root / "ckpts"))


def _forbid_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pickle-style loader was called")

    for module, names in ((pickle, ("load", "loads", "Unpickler")), (torch, ("load",))):
        for name in names:
            monkeypatch.setattr(module, name, forbidden)


# -- ModelCheckpoint options, resume, no pickle ----------------------------------------------------------


def test_model_checkpoint_options_write_savegame_checkpoints(tmp_path: Path) -> None:
    """monitor + save_top_k + every_n_train_steps + save_last + a filename template: every file Lightning
    asked for is a verified savegame checkpoint directory, the ones it dropped are gone, nothing is a pickle."""
    model, t = fit(tmp_path, epochs=3, monitor="val_loss", save_top_k=2, every_n_train_steps=2, save_last=True,
                   filename="{epoch}-{step}-{val_loss:.3f}")  # fmt: skip
    cb = t.checkpoint_callback
    assert isinstance(cb, pl.callbacks.ModelCheckpoint)
    names = _ckpts(tmp_path)
    assert len(names) == 3 and "last.ckpt" in names, names  # top 2 + last; the others were removed
    assert sorted(os.path.basename(p) for p in cb.best_k_models) == sorted(n for n in names if n != "last.ckpt")
    for name in names:
        manifest = savegame.verify(tmp_path / "ckpts" / name)
        assert manifest.metadata["integration"] == "lightning"
        assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "hyper_parameters",
                "pytorch-lightning_version", sl.RNG_ITEM} <= set(manifest.items)  # fmt: skip
    last = savegame.load(tmp_path / "ckpts" / "last.ckpt")
    assert last["global_step"] == t.global_step == 12 and last["epoch"] == 2
    assert savegame.read_manifest(tmp_path / "ckpts" / "last.ckpt").progress == {"epoch": 2, "step": 12}  # savegame ls
    assert_identical(dict(last["state_dict"]), params(model))
    assert assert_no_pickle(tmp_path)
    assert not [n for n in os.listdir(tmp_path / "ckpts") if n.startswith(".")]  # no staging left


def test_resume_from_last_and_from_a_path_is_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fit(ckpt_path="last" | PATH) in a fresh Trainer and model ends exactly where an uninterrupted run
    ends (shuffling and dropout included: the RNG states come back), and never unpickles anything."""
    straight, _ = fit(tmp_path / "a", epochs=4, save_last=True)
    fit(tmp_path / "b", epochs=2, save_last=True, save_top_k=-1)
    _forbid_unpickling(monkeypatch)
    resumed, t = fit(tmp_path / "b", epochs=4, ckpt_path="last", save_last=True, save_top_k=-1)
    assert t.global_step == 16
    assert_identical(params(resumed), params(straight))
    by_path, _ = fit(tmp_path / "c", epochs=4, ckpt_path=str(tmp_path / "b" / "ckpts" / "epoch=1-step=8.ckpt"),
                     save_last=True)  # fmt: skip
    assert_identical(params(by_path), params(straight))


def test_without_the_rng_states_the_resume_differs(tmp_path: Path) -> None:
    """The check above can fail: restoring everything but the RNGs gives other weights."""
    straight, _ = fit(tmp_path / "a", epochs=3, save_last=True)
    fit(tmp_path / "b", epochs=2, save_last=True)
    resumed, _ = fit(tmp_path / "b", epochs=3, ckpt_path="last", io=sl.SavegameIO(restore_rng=False), save_last=True)
    assert not all(torch.equal(a, b) for a, b in zip(params(resumed).values(), params(straight).values()))


def test_save_top_k_keeps_the_best_across_a_resume(tmp_path: Path) -> None:
    """A metric that gets worse after a resume: save_top_k=1 keeps the best checkpoint (epoch 1) on disk,
    deletes the others, and best_model_path still loads."""
    schedule = {"val_schedule": [0.5, 0.1, 0.9, 0.8, 0.7, 0.6]}
    fit(tmp_path, epochs=3, model_kwargs=schedule, monitor="val_loss", save_top_k=1, save_last=True)
    _, t = fit(tmp_path, epochs=6, ckpt_path="last", model_kwargs=schedule, monitor="val_loss", save_top_k=1,
               save_last=True)  # fmt: skip
    assert _ckpts(tmp_path) == ["epoch=1-step=8.ckpt", "last.ckpt"]
    best = t.checkpoint_callback.best_model_path  # type: ignore[union-attr]
    assert os.path.basename(best) == "epoch=1-step=8.ckpt"
    checkpoint, _ = sl.read_checkpoint(best)
    assert checkpoint["epoch"] == 1


def test_save_last_link_resumes_through_the_link(tmp_path: Path) -> None:
    fit(tmp_path, epochs=1, save_last="link", save_top_k=-1)
    last = tmp_path / "ckpts" / "last.ckpt"
    assert last.is_symlink() and os.readlink(last) == "epoch=0-step=4.ckpt"
    _, t = fit(tmp_path, epochs=2, ckpt_path="last", save_last="link", save_top_k=-1)
    assert t.global_step == 8
    # Lightning (with its own plugin too) adds last-v1.ckpt after a resume rather than moving the link
    assert _ckpts(tmp_path) == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "last-v1.ckpt", "last.ckpt"]
    for name in _ckpts(tmp_path):
        savegame.verify(tmp_path / "ckpts" / name)


def test_a_resume_with_a_last_link_and_a_best_that_stays_goes_on(tmp_path: Path) -> None:
    """``save_last="link"`` + ``save_top_k=1`` + ``ckpt_path="last"``: the first epoch after the resume that
    is not a new best makes Lightning save a real checkpoint where its ``last.ckpt`` link is; SavegameIO
    refused the link (OccupiedPathError) and fit died. The link goes, the linked best stays intact."""
    schedule = {"val_schedule": [0.5, 0.1, 0.9, 0.8, 0.7]}
    fit(tmp_path, epochs=3, model_kwargs=schedule, monitor="val_loss", save_top_k=1, save_last="link")
    last = tmp_path / "ckpts" / "last.ckpt"
    assert last.is_symlink()
    best = tmp_path / "ckpts" / "epoch=1-step=8.ckpt"
    before = {p.name: p.read_bytes() for p in best.iterdir()}
    _, t = fit(tmp_path, epochs=5, ckpt_path="last", model_kwargs=schedule, monitor="val_loss", save_top_k=1,
               save_last="link")  # fmt: skip
    assert t.global_step == 20
    assert {p.name: p.read_bytes() for p in best.iterdir()} == before
    checkpoint, _ = sl.read_checkpoint(last)
    assert checkpoint["global_step"] == 20
    savegame.verify(best)


def test_a_templated_last_link_whose_target_top_k_removed_is_dropped(tmp_path: Path) -> None:
    """``save_last="link"`` with a templated last name and ``save_top_k=1``: top-k deletes the old best,
    leaving the previous last link dangling; removing that link raised CheckpointNotFoundError and
    stopped ``fit`` (Lightning's own plugin skips it). Now the dangling link is deleted."""
    checkpoint = model_checkpoint(tmp_path, save_last="link", save_top_k=1, monitor="val_loss")
    checkpoint.CHECKPOINT_NAME_LAST = "last-{epoch}"
    pl.seed_everything(0, verbose=False)
    t = trainer(tmp_path, epochs=3, callbacks=[checkpoint])
    t.fit(LitMLP(val_schedule=[3.0, 2.0, 1.0]), *data())
    assert _ckpts(tmp_path) == ["epoch=2-step=12.ckpt", "last-epoch=2.ckpt"]
    assert os.readlink(tmp_path / "ckpts" / "last-epoch=2.ckpt") == "epoch=2-step=12.ckpt"
    savegame.verify(tmp_path / "ckpts" / "last-epoch=2.ckpt")


# -- checkpoint dict contents ------------------------------------------------------------------------------


def test_config_objects_round_trip_to_their_types(tmp_path: Path) -> None:
    io = sl.SavegameIO()
    nested = {"ns": argparse.Namespace(a=1, p=pathlib.Path("x/y")), "cfg": Config(hidden=3), "plain": [1, "two", None],
              "attr": AttributeDict(lr=0.1, inner=AttributeDict(k=(1, Config())))}  # fmt: skip
    checkpoint = {"hyper_parameters": nested, "state_dict": {"w": torch.arange(3.0)}, "top": AttributeDict(x=1)}
    io.save_checkpoint(checkpoint, tmp_path / "c.ckpt")
    back = io.load_checkpoint(tmp_path / "c.ckpt")
    tensors = back.pop("state_dict")
    # dataclass, Namespace, AttributeDict and Path compare by value...
    assert back == {k: v for k, v in checkpoint.items() if k != "state_dict"}
    hp = back["hyper_parameters"]  # ...and have their types back
    assert type(hp["ns"]) is argparse.Namespace and isinstance(hp["ns"].p, pathlib.PurePath)
    assert type(hp["cfg"]) is Config and type(hp["attr"]) is AttributeDict and type(back["top"]) is AttributeDict
    assert type(hp["attr"]["inner"]["k"][1]) is Config
    assert torch.equal(tensors["w"], torch.arange(3.0))
    assert_no_pickle(tmp_path)


def test_an_arbitrary_object_is_refused_naming_its_key(tmp_path: Path) -> None:
    class Opaque:
        pass

    with pytest.raises(UnsupportedTypeError, match=r"hyper_parameters\.model.*save_hyperparameters\(ignore"):
        sl.SavegameIO().save_checkpoint({"hyper_parameters": {"lr": 1, "model": Opaque()}}, tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists() and not os.listdir(tmp_path)


class _GeneratorInCheckpoint(LitMLP):
    """Keeps a torch.Generator of its own in the checkpoint dict (``on_save_checkpoint``)."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["sampler_generator"] = torch.Generator().manual_seed(7)


@pytest.mark.parametrize(
    ("checkpoint", "where"),
    [
        ({"hyper_parameters": {"lr": 1, "backbone": torch.nn.Linear(2, 2)}}, r"hyper_parameters\.backbone"),
        ({"extra": [random.Random(3)]}, r"extra\.0"),
        ({"ema": {"opt": torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)}}, r"ema\.opt"),
    ],
)
def test_a_live_object_is_refused_not_stored_as_its_state_dict(
    tmp_path: Path, checkpoint: dict[str, Any], where: str
) -> None:
    """A module, optimizer or generator in Lightning's dict came back as a plain dict of its state (a
    backbone hyper-parameter as a dict, a Random as a dict): now it is refused, naming its key."""
    with pytest.raises(UnsupportedTypeError, match=where + r".*(state_dict|get_state)"):
        sl.SavegameIO().save_checkpoint(checkpoint, tmp_path / "x.ckpt")
    assert not os.listdir(tmp_path)


def test_a_generator_added_by_on_save_checkpoint_is_refused_by_fit(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    t = trainer(tmp_path, epochs=1, callbacks=[model_checkpoint(tmp_path, save_last=True)])
    with pytest.raises(UnsupportedTypeError, match=r"sampler_generator.*get_state"):
        t.fit(_GeneratorInCheckpoint(), *data())
    assert not (tmp_path / "ckpts" / "last.ckpt").exists()


def test_a_dataclass_whose_module_is_not_imported_is_not_imported(tmp_path: Path) -> None:
    """Loading never imports a module a checkpoint names: it says what to import instead."""
    sl.SavegameIO().save_checkpoint({"hyper_parameters": {"cfg": Config()}}, tmp_path / "c.ckpt")
    manifest = savegame.read_manifest(tmp_path / "c.ckpt")
    assert manifest.metadata["lightning"]["types"]["hyper_parameters"][-1]["class"] == "_lithelp:Config"
    saved = sys.modules.pop("_lithelp")
    try:
        with pytest.raises(savegame.StateMismatchError, match=r"_lithelp.*not imported here"):
            sl.read_checkpoint(tmp_path / "c.ckpt")
        assert "_lithelp" not in sys.modules
    finally:
        sys.modules["_lithelp"] = saved


def test_load_from_checkpoint(tmp_path: Path) -> None:
    hparams = {"lr": 0.02, "config": Config(hidden=8), "extra": argparse.Namespace(tag="t")}
    model, _ = fit(tmp_path, epochs=1, save_last=True, model_kwargs=hparams)
    loaded = sl.load_from_checkpoint(LitMLP, tmp_path / "ckpts" / "last.ckpt")
    assert isinstance(loaded, LitMLP) and loaded.hparams.lr == 0.02
    assert type(loaded.hparams.config) is Config and loaded.hparams.config.hidden == 8
    assert loaded.hparams.extra == argparse.Namespace(tag="t")
    assert_identical(params(loaded), params(model))
    override = sl.load_from_checkpoint(LitMLP, tmp_path / "ckpts" / "last.ckpt", lr=0.5)
    assert override.hparams.lr == 0.5


# -- bad input ---------------------------------------------------------------------------------------------


def test_a_save_never_replaces_another_writers_savegame_checkpoint(tmp_path: Path) -> None:
    """``save_checkpoint`` over a ``savegame.save`` checkpoint replaced it (``remove_checkpoint`` refuses
    the same one): another writer's checkpoint is never replaced; the plugin's own one still is."""
    savegame.save(tmp_path / "mine.ckpt", {"weights": torch.ones(2)})
    with pytest.raises(ForeignCheckpointError, match="refusing to replace"):
        sl.SavegameIO().save_checkpoint({"epoch": 1, "state_dict": {}}, tmp_path / "mine.ckpt")
    assert torch.equal(savegame.load(tmp_path / "mine.ckpt")["weights"], torch.ones(2))
    sl.SavegameIO().save_checkpoint({"epoch": 1, "state_dict": {}}, tmp_path / "own.ckpt")
    sl.SavegameIO().save_checkpoint({"epoch": 2, "state_dict": {}}, tmp_path / "own.ckpt")
    assert sl.read_checkpoint(tmp_path / "own.ckpt")[0]["epoch"] == 2


def test_a_torch_ckpt_is_refused_and_converts_once(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    t = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(tmp_path))  # fmt: skip
    model = LitMLP(config=None)
    t.fit(model, *data())
    (torch_ckpt,) = (tmp_path / "checkpoints").iterdir()  # Lightning's default: a torch.save pickle
    with pytest.raises(ForeignCheckpointError, match=r"pickle.*weights_only=True"):
        fit(tmp_path / "r", epochs=3, ckpt_path=str(torch_ckpt))
    with pytest.raises(ForeignCheckpointError):
        sl.load_from_checkpoint(LitMLP, torch_ckpt)
    sl.SavegameIO().save_checkpoint(torch.load(torch_ckpt, weights_only=True), tmp_path / "converted.ckpt")
    assert_no_pickle(tmp_path / "converted.ckpt")
    _, t2 = fit(tmp_path / "r", epochs=3, ckpt_path=str(tmp_path / "converted.ckpt"))
    assert t2.global_step == 12
    assert_identical(params(sl.load_from_checkpoint(LitMLP, tmp_path / "converted.ckpt")), params(model))


def test_another_writers_savegame_checkpoint_is_refused(tmp_path: Path) -> None:
    savegame.save(tmp_path / "plain", {"model": torch.nn.Linear(2, 2), "epoch": 3})
    with pytest.raises(ForeignCheckpointError, match=r"not by savegame\.lightning"):
        fit(tmp_path / "r", epochs=1, ckpt_path=str(tmp_path / "plain"))
    with pytest.raises(ForeignCheckpointError, match="refusing to delete"):
        sl.SavegameIO().remove_checkpoint(tmp_path / "plain")
    assert savegame.verify(tmp_path / "plain")


def test_remove_checkpoint_deletes_only_its_own_checkpoints(tmp_path: Path) -> None:
    io = sl.SavegameIO()
    io.save_checkpoint({"epoch": 1}, tmp_path / "a.ckpt")
    (tmp_path / "user.ckpt").write_bytes(b"\x80\x04mine")
    (tmp_path / "folder.ckpt").mkdir()
    (tmp_path / "folder.ckpt" / "notes.txt").write_text("keep")
    for victim in ("user.ckpt", "folder.ckpt"):
        with pytest.raises(NotACheckpointError, match="refusing to delete"):
            io.remove_checkpoint(tmp_path / victim)
    assert (tmp_path / "user.ckpt").read_bytes() == b"\x80\x04mine"
    assert (tmp_path / "folder.ckpt" / "notes.txt").read_text() == "keep"
    with pytest.raises(OccupiedPathError):  # and a save never replaces them either
        io.save_checkpoint({"epoch": 2}, tmp_path / "user.ckpt")
    os.symlink("a.ckpt", tmp_path / "link.ckpt")  # save_last="link": only the link goes
    io.remove_checkpoint(tmp_path / "link.ckpt")
    assert not os.path.lexists(tmp_path / "link.ckpt") and savegame.verify(tmp_path / "a.ckpt")
    io.remove_checkpoint(tmp_path / "a.ckpt")
    io.remove_checkpoint(tmp_path / "gone.ckpt")  # nothing there: nothing to do, as Lightning's own plugin
    assert sorted(os.listdir(tmp_path)) == ["folder.ckpt", "user.ckpt"]
    io.save_checkpoint({"epoch": 1, "state_dict": {"w": torch.ones(2)}}, tmp_path / "damaged.ckpt")
    manifest = tmp_path / "damaged.ckpt" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"epoch"', b'"epocH"', 1))
    with pytest.warns(UserWarning, match="damaged.*moved aside"):
        io.remove_checkpoint(tmp_path / "damaged.ckpt")  # a damaged one is kept aside, not deleted
    (moved,) = [n for n in os.listdir(tmp_path) if "damaged" in n]
    assert moved.startswith(".") and {"manifest.json", "state_dict.safetensors"} <= set(os.listdir(tmp_path / moved))


def test_a_flipped_byte_in_the_newest_checkpoint_fails_clearly(tmp_path: Path) -> None:
    """ckpt_path="last" makes Lightning pick the path itself, so the plugin cannot fall back silently: the
    resume fails before anything is restored, naming the older checkpoints; passing one of them works."""
    straight, _ = fit(tmp_path / "a", epochs=3, save_last=True)
    fit(tmp_path / "b", epochs=2, save_last=True, save_top_k=-1)
    last = tmp_path / "b" / "ckpts" / "last.ckpt"
    victim = last / savegame.read_manifest(last).items["state_dict"].file  # type: ignore[operator]
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0x01
    victim.write_bytes(bytes(raw))
    pl.seed_everything(0, verbose=False)
    model = LitMLP()
    before = params(model)
    t = trainer(tmp_path / "b", epochs=3, callbacks=[pl.callbacks.ModelCheckpoint(dirpath=str(last.parent))])
    with pytest.raises(HashMismatchError, match=r"(?s)nothing was restored.*epoch=1-step=8\.ckpt"):
        t.fit(model, *data(), ckpt_path="last")
    assert_identical(params(model), before)
    resumed, _ = fit(tmp_path / "b", epochs=3, ckpt_path=str(last.parent / "epoch=1-step=8.ckpt"))
    assert_identical(params(resumed), params(straight))


def test_a_missing_lightning_gives_the_install_hint() -> None:
    code = (
        "import sys; sys.modules['lightning'] = None\nimport savegame\n"
        "try:\n import savegame.lightning\nexcept savegame.MissingExtraError as e:\n print('HINT', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=script_env(), timeout=60)
    assert "HINT" in proc.stdout and "pip install 'savegame[lightning]'" in proc.stdout, proc.stderr
    assert issubclass(MissingExtraError, savegame.CheckpointError) and issubclass(MissingExtraError, ImportError)


def test_import_savegame_does_not_import_lightning() -> None:
    code = "import sys, savegame; print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'torch')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=script_env(), timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr


# -- background saves ------------------------------------------------------------------------------------


def _slow_begin(monkeypatch: pytest.MonkeyPatch, *, seconds: float = 0.0, fail: bool = False) -> None:
    from savegame.storage.local import LocalStorage

    original = LocalStorage.begin

    def begin(self: Any, name: str, **kwargs: Any) -> Any:
        time.sleep(seconds)
        if fail:
            raise OSError(28, "No space left on device")
        return original(self, name, **kwargs)

    monkeypatch.setattr(LocalStorage, "begin", begin)


def test_background_saves_return_fast_and_resume_identically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = sl.SavegameIO(background=True)
    _slow_begin(monkeypatch, seconds=1.0)
    started = time.perf_counter()
    io.save_checkpoint({"epoch": 1, "state_dict": {"w": torch.ones(4)}}, tmp_path / "x.ckpt")
    assert time.perf_counter() - started < 0.8  # the write happens on the writer thread
    assert not (tmp_path / "x.ckpt").exists()
    io.teardown()  # waits for the commit
    assert savegame.verify(tmp_path / "x.ckpt")
    monkeypatch.undo()
    straight, _ = fit(tmp_path / "a", epochs=3, save_last=True)
    fit(tmp_path / "b", epochs=2, save_last=True, save_top_k=2, monitor="val_loss", io=sl.SavegameIO(background=True))
    resumed, _ = fit(tmp_path / "b", epochs=3, ckpt_path="last", save_last=True, save_top_k=2, monitor="val_loss",
                     io=sl.SavegameIO(background=True))  # fmt: skip
    assert_identical(params(resumed), params(straight))
    assert_no_pickle(tmp_path / "b")


def test_a_failed_background_save_surfaces_at_the_next_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = sl.SavegameIO(background=True)
    _slow_begin(monkeypatch, fail=True)
    io.save_checkpoint({"epoch": 1}, tmp_path / "a.ckpt")  # returns: the failure happens on the thread
    with pytest.raises(BackgroundSaveError, match="No space left"):
        io.save_checkpoint({"epoch": 2}, tmp_path / "b.ckpt")
    io.save_checkpoint({"epoch": 3}, tmp_path / "c.ckpt")
    with pytest.raises(BackgroundSaveError):
        io.teardown()
    io.teardown()  # delivered once
    with pytest.raises(BackgroundSaveError):  # and inside a Trainer: fit fails, it does not go on silently
        fit(tmp_path / "t", epochs=2, io=sl.SavegameIO(background=True))
    ckpts = tmp_path / "t" / "ckpts"
    assert not ckpts.exists() or not os.listdir(ckpts)  # nothing half-written left behind


def test_remove_waits_for_the_newer_background_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ModelCheckpoint saves the new best, then removes the old one: the old one goes only once the new
    one is committed (Lightning's AsyncCheckpointIO removes at once)."""
    io = sl.SavegameIO(background=True)
    io.save_checkpoint({"epoch": 1}, tmp_path / "old.ckpt")
    io.teardown()
    _slow_begin(monkeypatch, seconds=0.5)
    io.save_checkpoint({"epoch": 2}, tmp_path / "new.ckpt")
    io.remove_checkpoint(tmp_path / "old.ckpt")
    assert os.listdir(tmp_path) == ["new.ckpt"] and savegame.verify(tmp_path / "new.ckpt")


# -- processes: SIGKILL, DDP, the example ------------------------------------------------------------------


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return dict(savegame.load(out)["model"])


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.timeout(400)
def test_sigkill_mid_training_then_resume_is_bit_identical(tmp_path: Path) -> None:
    """Background saves (the sync path is killed and resumed by the example, and resumed in-process above)."""
    flag = ["--background"]
    straight, _ = fit(tmp_path / "straight", epochs=4, save_last=True)  # the reference, in this process
    killed = run_script(str(tmp_path / "run"), "--epochs", "4", "--kill-at-step", "10", *flag)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert {"epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "last.ckpt"} <= set(_ckpts(tmp_path / "run"))
    resumed = run_script(str(tmp_path / "run"), "--epochs", "4", "--resume", "last", "--out", str(tmp_path / "run.out"),
                         *flag)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states" in resumed.stderr + resumed.stdout
    assert_identical(_weights(tmp_path / "run.out"), params(straight))
    assert_no_pickle(tmp_path / "run" / "ckpts")
    # whatever save the kill interrupted, the resumed run's first save removed its staging folder
    assert not list((tmp_path / "run" / "ckpts").glob(".staging-*"))


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.timeout(400)
def test_ddp_two_processes_commit_one_checkpoint_per_save(tmp_path: Path) -> None:
    log = tmp_path / "saves.log"
    first = run_script(str(tmp_path), "--ddp", "--epochs", "2", "--log", str(log), timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = log.read_text().split()
    calls = list(zip(lines[::2], lines[1::2]))
    assert calls and {rank for rank, _ in calls} == {"0"}, calls  # Lightning saves on rank 0 only
    names = _ckpts(tmp_path)
    assert names == ["epoch=0-step=2.ckpt", "epoch=1-step=4.ckpt", "last.ckpt"], names  # no -v1 duplicates
    assert sorted({name for _, name in calls}) == names
    for name in names:
        savegame.verify(tmp_path / "ckpts" / name)
    log.unlink()
    second = run_script(str(tmp_path), "--ddp", "--epochs", "3", "--resume", "last", "--log", str(log),
                        "--out", str(tmp_path / "out"), timeout=300)  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    restored = sorted(line for line in log.read_text().splitlines() if "restored" in line)
    assert restored == ["0 step=4 restored=True", "1 step=4 restored=True"], restored
    assert _ckpts(tmp_path) == [*names[:2], "epoch=2-step=6.ckpt", "last.ckpt"]
    assert_no_pickle(tmp_path / "ckpts")


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.timeout(300)
def test_the_example_runs(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "lightning_resume.py"), str(tmp_path)],
                          capture_output=True, text=True, env=script_env(), timeout=280, cwd=str(ROOT))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "identical to the uninterrupted run: True" in proc.stdout, proc.stdout
    assert_no_pickle(tmp_path / "killed" / "ckpts")


def test_options_and_classes_of_the_wrong_type_are_config_errors(tmp_path: Path) -> None:
    """``SavegameIO(rng="false")`` saved the RNGs (a non-empty string is true); ``load_from_checkpoint``
    with a class that is not a LightningModule raised a bare TypeError or AttributeError after reading."""
    for option in ("background", "rng", "restore_rng"):
        with pytest.raises(savegame.ConfigError, match=f"SavegameIO: {option} must be True or False"):
            sl.SavegameIO(**{option: "false"})
    sl.SavegameIO().save_checkpoint({"epoch": 1, "state_dict": {}}, tmp_path / "c.ckpt")
    for cls in (torch.nn.Linear, "LitMLP", LitMLP(config=None)):
        with pytest.raises(savegame.ConfigError, match="cls must be a LightningModule or LightningDataModule"):
            sl.load_from_checkpoint(cls, tmp_path / "c.ckpt")


def test_a_damaged_manifest_in_ckpt_path_names_the_other_checkpoints(tmp_path: Path) -> None:
    """A damaged data file got the documented list of other checkpoints to pass as ckpt_path; a damaged
    manifest.json did not (it was read before the hint was added)."""
    io = sl.SavegameIO()
    io.save_checkpoint({"epoch": 1, "state_dict": {}}, tmp_path / "epoch=1.ckpt")
    io.save_checkpoint({"epoch": 2, "state_dict": {}}, tmp_path / "last.ckpt")
    manifest = tmp_path / "last.ckpt" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"epoch"', b'"epocH"', 1))
    with pytest.raises(savegame.CorruptCheckpointError, match=r"(?s)other checkpoints in .*epoch=1\.ckpt"):
        sl.read_checkpoint(tmp_path / "last.ckpt")
