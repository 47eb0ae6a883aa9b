"""``savegame.convert`` / ``savegame import``: checkpoints written by the real libraries, converted, then
restored into fresh objects with ``savegame.load`` and compared exactly; hostile and damaged sources refused."""

from __future__ import annotations

import io
import json
import os
import pathlib
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import savegame
from savegame.cli.app import main
from savegame.errors import DamagedSourceError, UnknownSourceFormatError, UnsafePickleError

os.environ.setdefault("KERAS_BACKEND", "torch")


class Canary:
    """Unpickling this creates the file at ``path`` (the proof that a pickle ran)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _trained(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        opt.step()
    return model, opt


def _same_tensors(a: Any, b: Any) -> None:
    """Exactly equal nested state (tensors with torch.equal, the rest with ==)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b), (set(a), set(b))
        for k in a:
            _same_tensors(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same_tensors(x, y)
    else:
        assert a == b, (a, b)


def _cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["import", *args])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------------
# torch.save files


def test_seed_tutorial_dict_restores_into_fresh_objects(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, opt = _trained()
    src = tmp_path / "model_checkpoint.pth"
    torch.save({"epoch": 5, "model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict(),
                "loss": 0.125}, src)  # fmt: skip
    code, out, err = _cli(str(src), str(tmp_path / "imported"), "--json", capsys=capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["format"] == "torch" and report["progress"] == {"epoch": 5, "metrics": {"loss": 0.125}}
    items = {i["name"]: i for i in report["items"]}
    assert items["model"]["tensors"] == 4 and items["model"]["source"] == "model_state_dict"
    assert items["model"]["bytes"] == sum(t.numel() * 4 for t in model.state_dict().values())
    assert "model_state_dict -> item 'model'" in report["converted"]

    fresh = _net()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    state = {"model": fresh, "optimizer": fresh_opt, "epoch": 0, "loss": 0.0}
    savegame.load(tmp_path / "imported", state)
    _same_tensors(model.state_dict(), fresh.state_dict())
    _same_tensors(opt.state_dict(), fresh_opt.state_dict())
    assert (state["epoch"], state["loss"]) == (5, 0.125)
    assert savegame.read_manifest(tmp_path / "imported").progress["epoch"] == 5

    # imported into a run root, a Checkpointer resumes from it
    assert savegame.convert(src, tmp_path / "run" / "imported").format == "torch"
    resumed = _net()
    resumed_opt = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    ckpt = savegame.Checkpointer(tmp_path / "run", rng=False)
    try:
        progress = ckpt.restore({"model": resumed, "optimizer": resumed_opt})
    finally:
        ckpt.close()
    assert progress is not None and progress.epoch == 5 and dict(progress.metrics) == {"loss": 0.125}
    _same_tensors(model.state_dict(), resumed.state_dict())
    _same_tensors(opt.state_dict(), resumed_opt.state_dict())


def test_flat_state_dict_and_plain_safetensors_become_the_model_item(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model, _ = _trained(1)
    torch.save(model.state_dict(), tmp_path / "weights.bin")
    save_file(model.state_dict(), str(tmp_path / "weights.safetensors"), metadata={"note": "hi"})
    for name, fmt in (("weights.bin", "torch"), ("weights.safetensors", "safetensors")):
        report = savegame.convert(tmp_path / name, tmp_path / f"out-{fmt}")
        assert report.format == fmt and [i.name for i in report.items] == ["model"] and report.tensors == 4
        fresh = _net()
        savegame.load(tmp_path / f"out-{fmt}", {"model": fresh})
        _same_tensors(model.state_dict(), fresh.state_dict())
    assert savegame.read_manifest(tmp_path / "out-safetensors").metadata["safetensors_metadata"] == {"note": "hi"}


def _hostile_files(tmp_path: Path, canary: Path) -> dict[str, Path]:
    state = {"weight": Canary(str(canary)), "bias": torch.zeros(2)}
    files = {}
    for protocol in (0, 2, 4, 5):
        files[f"pickle{protocol}"] = tmp_path / f"hostile{protocol}.pt"
        files[f"pickle{protocol}"].write_bytes(pickle.dumps(state, protocol=protocol))
    files["torch.save"] = tmp_path / "hostile.ckpt"
    torch.save(state, files["torch.save"])
    return files


def test_hostile_pickle_is_refused_naming_the_function_and_never_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    canary = tmp_path / "canary"
    files = _hostile_files(tmp_path, canary)
    torch.load(io.BytesIO(files["torch.save"].read_bytes()), weights_only=False)  # the payload is live
    assert canary.exists()
    canary.unlink()
    for case, path in files.items():
        with pytest.raises(UnsafePickleError) as info:
            savegame.convert(path, tmp_path / f"out-{case}")
        assert "pathlib" in str(info.value) and any("pathlib" in g for g in info.value.globals), case
        assert not canary.exists() and not (tmp_path / f"out-{case}").exists(), case
    code, _, err = _cli(str(files["pickle4"]), str(tmp_path / "cli-out"), capsys=capsys)
    assert code == 2 and "pathlib.Path.touch" in err and not canary.exists()


def test_a_global_whose_name_is_not_a_plain_literal_is_refused(tmp_path: Path) -> None:
    """STACK_GLOBAL takes its names from the stack: a pickle that pushes a decoy and pops it (so a naive
    'last two strings' reader sees os.x) still calls os.system; the scan refuses what it cannot pin down."""
    canary = tmp_path / "canary"
    command = f"touch {canary}".encode()
    payload = (b"\x80\x04\x8c\x02os\x8c\x01x0\x8c\x06system\x93\x8c" + bytes([len(command)]) + command
               + b"\x85R.")  # fmt: skip
    pickle.loads(payload)  # the payload is live
    assert canary.exists()
    canary.unlink()
    (tmp_path / "decoy.pt").write_bytes(payload)
    with pytest.raises(UnsafePickleError, match="computed"):
        savegame.convert(tmp_path / "decoy.pt", tmp_path / "out")
    assert not canary.exists()


def test_a_pickled_whole_module_is_refused_with_its_classes(tmp_path: Path) -> None:
    torch.save(_net(), tmp_path / "best_model.pth")  # seed 002: torch.save(model, path)
    with pytest.raises(UnsafePickleError, match=r"torch\.nn\.modules\.linear\.Linear") as info:
        savegame.convert(tmp_path / "best_model.pth", tmp_path / "out")
    assert "torch.nn.modules.container.Sequential" in info.value.globals


def test_damaged_and_unknown_sources_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, _ = _trained()
    good = tmp_path / "good.pt"
    torch.save({"model_state_dict": model.state_dict(), "epoch": 1}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "notes.xyz").write_text("hello")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    cases = {
        "truncated.pt": (DamagedSourceError, "truncated"),
        "weights.safetensors": (DamagedSourceError, "truncated"),
        "notes.xyz": (UnknownSourceFormatError, "unknown checkpoint format"),
        "emptydir": (UnknownSourceFormatError, "config.json"),
    }
    for name, (error, words) in cases.items():
        with pytest.raises(error, match=words):
            savegame.convert(tmp_path / name, tmp_path / f"out-{name}")
        code, _, err = _cli(str(tmp_path / name), str(tmp_path / f"out-{name}"), capsys=capsys)
        assert code == 2 and words in err, (name, err)
        assert not (tmp_path / f"out-{name}").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    code, _, err = _cli(str(good), str(tmp_path / "taken"), capsys=capsys)
    assert code == 2 and "exists" in err and (tmp_path / "taken" / "mine.txt").read_text() == "keep me"


@pytest.mark.timeout(120)
def test_a_missing_library_names_the_extra_to_install(tmp_path: Path) -> None:
    """Without torch (or h5py) installed, importing a file that needs it says which extra to install."""
    import subprocess
    import sys

    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    (tmp_path / "w.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    script = (
        "import sys\n"
        "sys.modules['torch'] = None\n"  # import torch -> ImportError, as where it is not installed
        "sys.modules['h5py'] = None\n"
        "import savegame\n"
        "for src in sys.argv[1:]:\n"
        "    try:\n"
        "        savegame.convert(src, src + '.out')\n"
        "    except savegame.ConfigError as exc:\n"
        "        print(exc)\n"
    )
    env = dict(os.environ)
    src = str(Path(savegame.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "w.pt"), str(tmp_path / "w.weights.h5")],
                         env=env, capture_output=True, text=True, timeout=100, check=True).stdout  # fmt: skip
    assert "pip install 'savegame[torch]'" in out and "pip install 'savegame[keras]'" in out, out


def test_report_escapes_control_characters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"model_state_dict": _net().state_dict(), "evil\x1b]0;pwned\x07": 0.5}, tmp_path / "c.pt")
    code, out, err = _cli(str(tmp_path / "c.pt"), str(tmp_path / "out"), capsys=capsys)
    assert code == 0 and "\x1b" not in out + err and "\x07" not in out + err and "evil\\x1b" in out


# ---------------------------------------------------------------------------------------------------
# Lightning


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lightning_trainer_checkpoint(tmp_path: Path) -> None:
    import lightning as L

    class Lit(L.LightningModule):
        def __init__(self, hidden: int = 8) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2)}

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    lit = Lit()
    trainer.fit(lit, torch.utils.data.DataLoader(data, batch_size=8))
    written = sorted((tmp_path / "checkpoints").glob("*.ckpt"))  # by the Trainer's own ModelCheckpoint
    assert [p.name for p in written] == ["epoch=1-step=8.ckpt"]
    report = savegame.convert(written[0], tmp_path / "out")
    assert report.format == "lightning" and report.progress == {"epoch": 1, "step": 8}
    assert {"model", "optimizer", "scheduler", "loops", "callbacks", "hyper_parameters", "epoch", "global_step"} <= {
        i.name for i in report.items
    }
    fresh = Lit()
    conf = fresh.configure_optimizers()
    target = {"model": fresh, "optimizer": conf["optimizer"], "scheduler": conf["lr_scheduler"]}
    savegame.load(tmp_path / "out", target)  # strict: every key of the fresh objects is in the checkpoint
    _same_tensors(lit.state_dict(), fresh.state_dict())
    _same_tensors(trainer.optimizers[0].state_dict(), conf["optimizer"].state_dict())
    assert conf["lr_scheduler"].state_dict() == trainer.lr_scheduler_configs[0].scheduler.state_dict()
    saved = savegame.load(tmp_path / "out")
    assert saved["hyper_parameters"] == {"hidden": 8}
    assert any(k.startswith("ModelCheckpoint") for k in saved["callbacks"])


# ---------------------------------------------------------------------------------------------------
# Hugging Face


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("safe", "sharded"), [(True, False), (False, False), (True, True)],
                         ids=["model.safetensors", "pytorch_model.bin", "sharded"])  # fmt: skip
def test_huggingface_model_directory(tmp_path: Path, safe: bool, sharded: bool) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    model.save_pretrained(tmp_path / "hf", safe_serialization=safe, max_shard_size="20KB" if sharded else "5GB")
    weights = "model.safetensors" if safe else "pytorch_model.bin"
    if sharded:
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
        shards = sorted(p.name for p in (tmp_path / "hf").glob("model-*.safetensors"))
        assert len(shards) > 1
        weights = ", ".join(shards)
    elif not safe and not (tmp_path / "hf" / weights).is_file():
        # transformers 5 writes safetensors whatever safe_serialization says: write the .bin the way
        # transformers 4 did (torch.save of the state dict next to config.json)
        (tmp_path / "hf" / "model.safetensors").unlink()
        torch.save(model.state_dict(), tmp_path / "hf" / weights)
    assert (tmp_path / "hf" / "config.json").is_file()
    report = savegame.convert(tmp_path / "hf", tmp_path / "out")
    assert report.format == "huggingface" and report.items[0].source == weights
    config = savegame.load(tmp_path / "out")["config"]
    fresh = GPT2LMHeadModel(GPT2Config.from_dict(config))
    loaded = savegame.load(tmp_path / "out", {"model": fresh}, strict=False)
    tied = {f"model.{k}" for k in model.state_dict() if k.startswith("lm_head")}
    assert set(loaded.missing_keys) <= tied, loaded.missing_keys
    _same_tensors(model.state_dict(), fresh.state_dict())


# ---------------------------------------------------------------------------------------------------
# Keras


def _keras_model() -> Any:
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization(),
                              keras.layers.Dense(2)])  # fmt: skip
    model.compile(optimizer="adam", loss="mse")
    return model


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_keras_weights_and_keras_archive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import h5py

    from savegame.adapters.keras import KerasState

    model = _keras_model()
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(16, 4)), rng.normal(size=(16, 2)), verbose=0, epochs=2)
    model.save_weights(tmp_path / "m.weights.h5")
    model.save(tmp_path / "m.keras")
    expected = [np.array(w) for w in model.weights]

    # no model: every dataset by its path in the file, read with h5py
    report = savegame.convert(tmp_path / "m.weights.h5", tmp_path / "raw")
    assert report.format == "keras-weights"
    raw = savegame.load(tmp_path / "raw")
    with h5py.File(tmp_path / "m.weights.h5") as f:
        np.testing.assert_array_equal(raw["model"]["layers/dense/vars/0"], f["layers/dense/vars/0"][()])
        assert len(raw["model"]) + len(raw["optimizer"]) == sum(
            1 for _ in _datasets(f)
        )
    archive = savegame.convert(tmp_path / "m.keras", tmp_path / "raw-keras")
    assert archive.format == "keras"
    stored = savegame.load(tmp_path / "raw-keras")
    assert stored["keras_config"]["class_name"] == "Sequential"
    for key, value in raw["model"].items():
        assert np.array_equal(stored["model"][key], value)

    # with a model: by variable path, restorable into a fresh model (weights and optimizer)
    expected_optimizer = [np.array(v) for v in model.optimizer.variables]
    for source in ("m.weights.h5", "m.keras"):
        dest = tmp_path / f"state-{source}"
        report = savegame.convert(tmp_path / source, dest, keras_model=_keras_model())
        assert "with the optimizer" in " ".join(report.converted)
        fresh = _keras_model()
        savegame.load(dest, {"keras": KerasState(fresh, include_rng=False)})
        for want, got in zip(expected, fresh.weights, strict=True):
            assert np.array_equal(want, np.array(got)), source
        for want, got in zip(expected_optimizer, fresh.optimizer.variables, strict=True):
            assert np.array_equal(want, np.array(got)), source

    # the command line builds the model from --keras-model FILE.py:FUNCTION
    builder = tmp_path / "kmodel.py"
    builder.write_text("import keras\n\ndef build():\n"
                       "    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),\n"
                       "                              keras.layers.BatchNormalization(), keras.layers.Dense(2)])\n"
                       "    model.compile(optimizer='adam', loss='mse')\n    return model\n")  # fmt: skip
    assert main(["import", str(tmp_path / "m.keras"), str(tmp_path / "cli"), "--keras-model", f"{builder}:build",
                 "--json"]) == 0  # fmt: skip
    items = [i["name"] for i in json.loads(capsys.readouterr().out)["items"]]
    assert items == ["keras_config", "keras_metadata", "keras"]
    fresh = _keras_model()
    savegame.load(tmp_path / "cli", {"keras": KerasState(fresh, include_rng=False)})
    for want, got in zip(expected, fresh.weights, strict=True):
        assert np.array_equal(want, np.array(got))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_keras_config_with_a_lambda_is_never_deserialized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import keras
    from keras.src.saving import saving_lib, serialization_lib

    def build() -> Any:
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Lambda(lambda x: x * 2.0)])
        model.compile(optimizer="sgd", loss="mse")
        return model

    model = build()
    model.save(tmp_path / "lambda.keras")
    config = json.loads(zipfile.ZipFile(tmp_path / "lambda.keras").read("config.json"))
    assert "Lambda" in json.dumps(config)

    fresh = build()  # built before the patches: building a model deserializes its own initializers

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the Keras config was deserialized")

    for module, name in ((serialization_lib, "deserialize_keras_object"), (saving_lib, "load_model"),
                         (keras.saving, "deserialize_keras_object"), (keras.models, "load_model")):  # fmt: skip
        monkeypatch.setattr(module, name, forbidden)
    savegame.convert(tmp_path / "lambda.keras", tmp_path / "raw")
    assert savegame.load(tmp_path / "raw")["keras_config"] == config
    savegame.convert(tmp_path / "lambda.keras", tmp_path / "state", keras_model=fresh)
    for want, got in zip(model.weights, fresh.weights, strict=True):
        assert np.array_equal(np.array(want), np.array(got))


def _datasets(f: Any) -> list[str]:
    import h5py

    names: list[str] = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


def test_keras_zip_bomb_is_refused(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.keras"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("config.json", "{}")
        with z.open("model.weights.h5", "w", force_zip64=True) as member:
            block = b"\0" * (1 << 20)
            for _ in range(64):
                member.write(block)
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(DamagedSourceError, match="zip bomb"):
        savegame.convert(bomb, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_torch_zip_with_a_member_twice_is_refused(tmp_path: Path) -> None:
    """Zip readers disagree on which of two same-named members counts: the checked pickle might not be the
    one torch reads, so such an archive is refused."""
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    doubled = tmp_path / "doubled.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(doubled, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        data = next(i for i in src.infolist() if i.filename.endswith("/data.pkl"))
        dst.writestr(data.filename, src.read(data))
    with pytest.raises(DamagedSourceError, match="twice"):
        savegame.convert(doubled, tmp_path / "out")
    assert savegame.convert(good, tmp_path / "ok").tensors == 1


def test_hdf5_bomb_and_truncated_weights_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import h5py

    bomb = tmp_path / "bomb.weights.h5"
    with h5py.File(bomb, "w") as f:  # 1 GiB of zeros that take no room: chunks never written read as fill
        f.create_dataset("layers/dense/vars/0", shape=(1 << 28,), dtype="f4", chunks=(1 << 20,), compression="gzip")
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(DamagedSourceError, match="bomb"):
        savegame.convert(bomb, tmp_path / "out")
    good = tmp_path / "good.weights.h5"
    with h5py.File(good, "w") as f:
        f["layers/dense/vars/0"] = np.arange(12, dtype="f4").reshape(3, 4)
    savegame.convert(good, tmp_path / "ok")
    assert np.array_equal(savegame.load(tmp_path / "ok")["model"]["layers/dense/vars/0"],
                          np.arange(12, dtype="f4").reshape(3, 4))  # fmt: skip
    cut = tmp_path / "cut.weights.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    code, _, err = _cli(str(cut), str(tmp_path / "out-cut"), capsys=capsys)
    assert code == 2 and "truncated" in err and not (tmp_path / "out-cut").exists()


# ---------------------------------------------------------------------------------------------------
# A run directory (seed 004's file names)


def test_run_directory_becomes_a_run_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "checkpoints"
    runs.mkdir()
    models = {}
    for epoch, acc in ((1, 0.72), (3, 0.81), (7, 0.895), (8, 0.85)):
        models[epoch], _ = _trained(epoch)
        torch.save(models[epoch].state_dict(), runs / f"mobilenet_v2_{epoch:02d}_{acc:.3f}.pth")
    (runs / "notes.txt").write_text("not a checkpoint")
    template = "mobilenet_v2_{epoch:02d}_{val_acc:.3f}.pth"
    code, out, err = _cli(str(runs), str(tmp_path / "root"), "--template", template, "--json", capsys=capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["checkpoints"] == ["mobilenet_v2_01_0.720", "mobilenet_v2_03_0.810", "mobilenet_v2_07_0.895",
                                     "mobilenet_v2_08_0.850"]  # fmt: skip
    assert report["progress"]["best"] == "mobilenet_v2_07_0.895"
    assert "notes.txt: does not match the template" in report["skipped"]
    ckpt = savegame.Checkpointer(tmp_path / "root", monitor="val_acc", rng=False)
    try:
        records = {r.name: r for r in ckpt.list()}
        third = records["mobilenet_v2_03_0.810"]
        assert third.epoch == 3 and third.metrics == {"val_acc": 0.81}
        best = ckpt.best
        assert best is not None and best.name == "mobilenet_v2_07_0.895"
        fresh = _net()
        restored = ckpt.restore({"model": fresh}, "best")
        assert restored is not None and restored.epoch == 7
        _same_tensors(models[7].state_dict(), fresh.state_dict())
    finally:
        ckpt.close()
    assert main(["ls", str(tmp_path / "root")]) == 0
    assert "mobilenet_v2_07_0.895" in capsys.readouterr().out

    # one file that needs code: refused, and nothing is published (no half-imported run root)
    canary = tmp_path / "canary"
    (runs / "mobilenet_v2_09_0.900.pth").write_bytes(pickle.dumps({"w": Canary(str(canary))}, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"mobilenet_v2_09_0\.900\.pth"):
        savegame.convert(runs, tmp_path / "root2", template=template)
    assert not canary.exists() and not (tmp_path / "root2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "root"]


def test_keras_datasets_with_no_exact_form_are_left_out_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A weights file with datasets the codec cannot store (byte strings, text, records) imports the numeric
    ones and names each left-out dataset; a file of nothing else is a source that cannot be imported
    (exit status 2, nothing written), not a failed save."""
    import h5py

    mixed = tmp_path / "mixed.weights.h5"
    with h5py.File(mixed, "w") as f:
        f["layers/dense/vars/0"] = np.arange(4, dtype="f4")
        f["layers/dense/vars/1"] = np.array([b"abc", b"de"])
        f.create_dataset("layers/dense/vars/2", data=np.array(["x", "y"], dtype=object), dtype=h5py.string_dtype())
    code, _, err = _cli(str(mixed), str(tmp_path / "out"), capsys=capsys)
    assert code == 0, err
    assert "layers/dense/vars/1" in err and "layers/dense/vars/2" in err
    assert list(savegame.load(tmp_path / "out")["model"]) == ["layers/dense/vars/0"]
    strings = tmp_path / "strings.weights.h5"
    with h5py.File(strings, "w") as f:
        f["layers/dense/vars/0"] = np.zeros(3, dtype=[("a", "i4"), ("b", "f8")])
    code, _, err = _cli(str(strings), str(tmp_path / "out-strings"), capsys=capsys)
    assert code == 2 and str(strings) in err, err
    assert not (tmp_path / "out-strings").exists()


def test_lightning_keys_never_overwrite_the_model_item_and_odd_keys_are_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Lightning checkpoint that also holds a top-level ``model`` (or ``optimizer``) key keeps both under the
    file's names, as a torch dict does: the LightningModule's weights were silently replaced by that value.
    A top-level key that cannot be an item name (not a string, empty) is left out and named, not a failed save."""
    weights = {"w": torch.arange(3.0)}
    src = tmp_path / "odd.ckpt"
    optimizer_states = [{"state": {}, "param_groups": []}]
    torch.save({"state_dict": weights, "pytorch-lightning_version": "2.0", "model": 1,
                "optimizer_states": optimizer_states, "optimizer": "sgd", 5: 2, "": 3}, src)  # fmt: skip
    code, _, err = _cli(str(src), str(tmp_path / "out"), capsys=capsys)
    assert code == 0, err
    loaded = savegame.load(tmp_path / "out")
    assert torch.equal(loaded["state_dict"]["w"], weights["w"]) and loaded["model"] == 1
    assert loaded["optimizer"] == "sgd" and loaded["optimizer_states"] == [{"state": {}, "param_groups": []}]
    assert "top-level key 5" in err and "top-level key ''" in err


def test_two_keys_that_rename_to_one_item_both_keep_their_names(tmp_path: Path) -> None:
    """``model_state_dict`` and ``state_dict`` both rename to ``model``: the second silently replaced the first
    (one state dict lost, exit 0). When a rename is not unique, every key keeps the file's name."""
    torch.save({"model_state_dict": {"a": torch.ones(2)}, "state_dict": {"b": torch.ones(3)},
                "optimizer_state_dict": {"state": {}, "param_groups": []}, "epoch": 1},
               tmp_path / "two.pt")  # fmt: skip
    report = savegame.convert(tmp_path / "two.pt", tmp_path / "out")
    loaded = savegame.load(tmp_path / "out")
    assert {i.name for i in report.items} == {"model_state_dict", "state_dict", "optimizer", "epoch"}
    assert torch.equal(loaded["model_state_dict"]["a"], torch.ones(2))
    assert torch.equal(loaded["state_dict"]["b"], torch.ones(3))


def test_a_keras_dataset_named_optimizer_is_a_model_weight_not_an_internal_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Only datasets *under* the ``optimizer`` group are the optimizer's: a top-level dataset called
    ``optimizer`` made the raw reader fail with 'internal error: IndexError'."""
    import h5py

    src = tmp_path / "opt.weights.h5"
    with h5py.File(src, "w") as f:
        f["optimizer"] = np.ones(2, "f4")
        f["layers/dense/vars/0"] = np.arange(3, dtype="f4")
    code, _, err = _cli(str(src), str(tmp_path / "out"), capsys=capsys)
    assert code == 0, err
    assert sorted(savegame.load(tmp_path / "out")["model"]) == ["layers/dense/vars/0", "optimizer"]
