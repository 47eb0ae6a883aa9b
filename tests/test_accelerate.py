"""savegame.accelerate with the real accelerate on CPU: round trip, SIGKILL and exact resume, no pickle,
fallback past a damaged checkpoint, and the errors for what it cannot restore.

The training run is tests/_accelerate_worker.py (dropout, AdamW, StepLR, gradient accumulation, a seedable
shuffled sampler, a registered object), started as a real subprocess.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import savegame
import savegame.accelerate as sga
from _accelerate_worker import Counter, build
from savegame.errors import (
    ForeignCheckpointError,
    HashMismatchError,
    IntegrationMismatchError,
    MissingExtraError,
    StateMismatchError,
)
from savegame.run.resume import ResumeWarning

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(Path(__file__).with_name("_accelerate_worker.py"))
EXAMPLE = str(ROOT / "examples" / "accelerate_resume.py")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(*args: str, expect: int = 0) -> dict[str, Any]:
    """Run the worker; return the JSON line it printed about where it resumed."""
    proc = subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True, env=_env(), timeout=180)
    assert proc.returncode == expect, f"worker {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return dict(json.loads(proc.stdout.splitlines()[0]))


def _same_tensors(a: str | Path, b: str | Path) -> list[str]:
    """The names whose tensors differ (bit for bit) between two safetensors files."""
    left, right = load_file(str(a)), load_file(str(b))
    assert set(left) == set(right)
    return [k for k in left if not torch.equal(left[k], right[k])]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run's final parameters (and its run root, next to them)."""
    base = tmp_path_factory.mktemp("acc-ref")
    (base / "root").mkdir()
    (base / "root" / "notes.txt").write_text("not a checkpoint: retention must leave it alone")
    _run(str(base / "root"), str(base / "final.safetensors"))
    return base


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run root whose run was SIGKILLed after batch 17 (last saves: step 10 epoch end, step 14 mid-epoch)."""
    base = tmp_path_factory.mktemp("acc-killed")
    proc = subprocess.run([sys.executable, WORKER, str(base / "root"), str(base / "unused"), "--kill-at", "17"],
                          capture_output=True, text=True, env=_env(), timeout=180)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not (base / "unused").exists()
    return base


def _checkpoints(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file())


# --------------------------------------------------------------------------------------------------
# Kill and resume


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigkill_mid_epoch_then_resume_is_bit_identical(reference: Path, killed: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(killed / "root", root)
    assert _checkpoints(root) == ["epoch=001-step=000010", "epoch=001-step=000014"]
    resumed = _run(str(root), str(tmp_path / "final.safetensors"))
    assert resumed["resumed"].endswith("epoch=001-step=000014")
    assert (resumed["epoch"], resumed["batches_seen"], resumed["step"]) == (1, 4, 14)
    assert _same_tensors(reference / "final.safetensors", tmp_path / "final.safetensors") == []
    # retention (keep_last=2) kept the two newest of the run and never touched what it did not write
    assert _checkpoints(root) == _checkpoints(reference / "root") == ["epoch=002-step=000028", "epoch=003-step=000030"]
    assert (reference / "root" / "notes.txt").is_file()


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_flipped_byte_in_newest_falls_back_to_the_previous_one(reference: Path, killed: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(killed / "root", root)
    _flip_byte(root / "epoch=001-step=000014" / "model.safetensors")
    resumed = _run(str(root), str(tmp_path / "final.safetensors"))
    assert resumed["resumed"].endswith("epoch=001-step=000010")
    assert resumed["quarantined"] and (resumed["epoch"], resumed["batches_seen"]) == (1, 0)
    assert _same_tensors(reference / "final.safetensors", tmp_path / "final.safetensors") == []


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_explicit_directories_sigkill_and_resume(reference: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    _run(str(root), str(tmp_path / "unused"), "--explicit", "--kill-at", "27", expect=-9)
    assert sorted(os.listdir(root), key=lambda n: int(n.split("-")[1]))[-1] == "step-24"
    resumed = _run(str(root), str(tmp_path / "final.safetensors"), "--explicit")
    assert (resumed["epoch"], resumed["batches_seen"], resumed["step"]) == (2, 4, 24)
    assert _same_tensors(reference / "final.safetensors", tmp_path / "final.safetensors") == []
    _assert_no_pickle(root)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # in the tensor data, after the header
    path.write_bytes(bytes(data))


def _torchrun(*args: str, expect_ok: bool = True) -> subprocess.CompletedProcess[str]:
    """The worker on 2 local processes (torchrun, gloo on CPU): accelerate runs it as MULTI_CPU with DDP."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", WORKER, *args], capture_output=True,
                          text=True, env=_env(), timeout=300)  # fmt: skip
    if expect_ok:
        assert proc.returncode == 0, f"{args}: {proc.returncode}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_processes_sigkill_and_resume_is_bit_identical(tmp_path: Path) -> None:
    """2 ranks, 5 batches each per epoch: saves at steps 4 (mid-epoch), 5, 9 (mid-epoch), 10...; killed
    after step 10, before its epoch-end save, so both ranks resume from the mid-epoch checkpoint 9."""
    _torchrun(str(tmp_path / "ref"), str(tmp_path / "ref.safetensors"))
    killed = _torchrun(str(tmp_path / "root"), str(tmp_path / "unused"), "--kill-at", "10", expect_ok=False)
    assert killed.returncode != 0 and not (tmp_path / "unused").exists()
    assert _checkpoints(tmp_path / "root") == ["epoch=001-step=000005", "epoch=001-step=000009"]
    manifest = savegame.read_manifest(tmp_path / "root" / "epoch=001-step=000009")
    assert {"rng.rank0", "rng.rank1", "model", "optimizer"} <= set(manifest.items)  # RNG per rank, the rest once
    assert manifest.metadata["num_processes"] == 2
    resumed = _torchrun(str(tmp_path / "root"), str(tmp_path / "final.safetensors"))
    lines = [json.loads(line) for line in resumed.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 2 and all((x["epoch"], x["batches_seen"], x["step"]) == (1, 4, 9) for x in lines)
    assert _same_tensors(tmp_path / "ref.safetensors", tmp_path / "final.safetensors") == []
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == [
        ".lock", "epoch=002-step=000014", "epoch=003-step=000015",
    ]  # one committed checkpoint per save, nothing half-written left, keep_last=2
    _assert_no_pickle(tmp_path / "root")


# --------------------------------------------------------------------------------------------------
# No pickle


def _assert_no_pickle(root: Path) -> None:
    """Every file under ``root`` is a JSON manifest or a valid safetensors file (the checks of
    tests/distributed/test_dist_no_pickle.py), and none starts like a pickle or a torch.save zip."""
    files = [p for p in root.rglob("*") if p.is_file() and p.name != "notes.txt"]
    assert files
    for f in files:
        if f.name == ".lock":  # the run root's writer lock: empty, or its (killed) owner as JSON
            assert f.stat().st_size == 0 or isinstance(json.loads(f.read_text()), dict)
            continue
        head = f.read_bytes()[:4]
        assert not head.startswith((b"\x80", b"PK\x03\x04")), f
        if f.name == "manifest.json":
            json.loads(f.read_text())
            continue
        assert f.suffix == ".safetensors", f
        with safe_open(str(f), framework="pt") as opened:
            assert list(opened.keys())


@pytest.mark.subprocess
@pytest.mark.slow
def test_no_file_written_is_a_pickle(reference: Path, killed: Path) -> None:
    _assert_no_pickle(reference / "root")
    _assert_no_pickle(killed / "root")


@pytest.fixture
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every pickle-style writer and reader raises while the test runs."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("savegame.accelerate called a pickle-style function")

    for module, names in ((pickle, ("dump", "dumps", "load", "loads")), (torch, ("save", "load"))):
        for name in names:
            monkeypatch.setattr(module, name, forbidden)
    yield


# --------------------------------------------------------------------------------------------------
# Round trip in one process


def _train(parts: tuple[Any, ...], batches: int) -> None:
    acc, model, opt, sched, loader, counter = parts
    for i, (x, y) in enumerate(loader):
        if i == batches:
            break
        with acc.accumulate(model):
            acc.backward(torch.nn.functional.mse_loss(model(x), y))
            opt.step()
            sched.step()
            opt.zero_grad()
        counter.seen += 1


def _flat(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _flat(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_flat(v) for v in value]
    return value


def test_round_trip_restores_every_part(tmp_path: Path, no_pickle: None) -> None:
    saved = build(seed=0)
    acc, model, opt, sched, loader, counter = saved
    acc.scaler = torch.amp.GradScaler("cpu")  # accelerate makes none on CPU; a real one to carry
    acc.scaler.scale(torch.ones(()))
    acc.scaler.update(new_scale=512.0)
    _train(saved, 5)
    loader.iteration = 2
    with pytest.warns(ResumeWarning, match="middle of a gradient accumulation"):  # 5 batches, accumulating 2
        manifest = sga.save_state(acc, tmp_path / "ckpt", epoch=2, batches_seen=5, step=25, metadata={"note": "x"})
    assert manifest.metadata["savegame.integration"] == "accelerate" and manifest.metadata["note"] == "x"
    assert acc.save_iteration == 1

    other = build(seed=7)
    acc2, model2, opt2, sched2, loader2, counter2 = other
    acc2.scaler = torch.amp.GradScaler("cpu")
    _train(other, 2)
    assert not torch.equal(model.state_dict()["0.weight"], model2.state_dict()["0.weight"])
    resumed = sga.load_state(acc2, tmp_path / "ckpt")

    assert (resumed.epoch, resumed.batches_seen, resumed.step) == (2, 5, 25)
    assert resumed.path == str(tmp_path / "ckpt")
    assert _flat(model2.state_dict()) == _flat(model.state_dict())
    assert _flat(opt2.state_dict()) == _flat(opt.state_dict())
    assert sched2.state_dict() == sched.state_dict()
    assert acc2.scaler.state_dict() == acc.scaler.state_dict() and acc2.scaler.get_scale() == 512.0
    assert counter2.seen == counter.seen == 5
    assert acc2.step == acc.step == 5 and acc2.save_iteration == 1
    assert loader2.iteration == 2
    sampler, sampler2 = loader.get_sampler(), loader2.get_sampler()
    assert (sampler2.epoch, sampler2.initial_seed) == (sampler.epoch, sampler.initial_seed)


def test_rng_state_is_the_one_at_save_time(tmp_path: Path) -> None:
    acc, *_ = build(seed=0)
    sga.save_state(acc, tmp_path / "ckpt")
    expected = (torch.rand(3).tolist(), random.random(), float(np.random.rand()))
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    sga.load_state(acc, tmp_path / "ckpt")
    assert (torch.rand(3).tolist(), random.random(), float(np.random.rand())) == expected


def test_resumed_dataloader_skips_and_then_moves_to_the_next_epoch(tmp_path: Path) -> None:
    """The resumed epoch yields the batches not yet seen, in the interrupted epoch's order, and the next
    epoch gets the next order (``skip_first_batches`` alone would replay the resumed one)."""
    _, _, _, _, loader, _ = build(seed=0)
    orders = [[x.sum().item() for x, _ in loader] for _ in range(2)]
    acc2, _, _, _, loader2, _ = build(seed=0)
    resumed = sga.Resumed(epoch=0, batches_seen=3)
    got = [[x.sum().item() for x, _ in resumed.dataloader(acc2, loader2, epoch)] for epoch in range(2)]
    assert got == [orders[0][3:], orders[1]]
    assert len(resumed.dataloader(acc2, loader2, 0)) == len(orders[0]) - 3


# --------------------------------------------------------------------------------------------------
# What it refuses


def test_damaged_explicit_checkpoint_fails_and_changes_nothing(tmp_path: Path) -> None:
    acc, *_ = build(seed=0)
    sga.save_state(acc, tmp_path / "ckpt")
    _flip_byte(tmp_path / "ckpt" / "model.safetensors")
    acc2, model2, *_ = build(seed=3)
    before = _flat(model2.state_dict())
    with pytest.raises(HashMismatchError, match=r"model\.safetensors"):
        sga.load_state(acc2, tmp_path / "ckpt")
    assert _flat(model2.state_dict()) == before


def test_stock_accelerate_directory_gets_a_specific_error(tmp_path: Path) -> None:
    acc, *_ = build(seed=0)
    acc.save_state(str(tmp_path / "stock"))  # accelerate's own format (torch.save pickles)
    assert (tmp_path / "stock" / "optimizer.bin").is_file()
    expected = r"Accelerator\.save_state.*optimizer\.bin.*accelerator\.load_state"
    with pytest.raises(ForeignCheckpointError, match=expected):
        sga.load_state(acc, tmp_path / "stock")
    assert issubclass(ForeignCheckpointError, savegame.NotACheckpointError)


def test_run_root_of_stock_checkpoints_refuses_to_start_over(tmp_path: Path) -> None:
    acc, *_ = build(seed=0)
    acc.save_state(str(tmp_path / "run" / "checkpoints" / "checkpoint_0"))
    with pytest.raises(ForeignCheckpointError, match="would start over"):
        sga.Checkpoints(acc, tmp_path / "run").resume()


def test_checkpoint_of_another_writer_is_refused(tmp_path: Path) -> None:
    acc, model, *_ = build(seed=0)
    savegame.save(tmp_path / "plain", {"model": model})
    with pytest.raises(IntegrationMismatchError, match=r"savegame\.save"):
        sga.load_state(acc, tmp_path / "plain")
    savegame.save(tmp_path / "lt", {"model": model}, metadata={"savegame.integration": "lightning"})
    with pytest.raises(IntegrationMismatchError, match="lightning integration"):
        sga.load_state(acc, tmp_path / "lt")


def test_different_registered_objects_are_refused_before_any_change(tmp_path: Path) -> None:
    acc, *_ = build(seed=0)
    sga.save_state(acc, tmp_path / "ckpt")
    acc2, model2, *_ = build(seed=5)
    acc2.register_for_checkpointing(Counter())
    before = _flat(model2.state_dict())
    with pytest.raises(StateMismatchError, match=r"custom_1.*register_for_checkpointing"):
        sga.load_state(acc2, tmp_path / "ckpt")
    assert _flat(model2.state_dict()) == before


def test_plain_random_sampler_mid_epoch_save_warns(tmp_path: Path) -> None:
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    loader = acc.prepare(torch.utils.data.DataLoader(list(range(8)), batch_size=2, shuffle=True))
    assert loader is not None
    with pytest.warns(ResumeWarning, match="use_seedable_sampler=True"):
        sga.save_state(acc, tmp_path / "mid", epoch=0, batches_seen=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sga.save_state(acc, tmp_path / "end", epoch=1, batches_seen=0)


def test_bad_position_is_a_config_error(tmp_path: Path) -> None:
    acc, *_ = build(seed=0)
    with pytest.raises(savegame.ConfigError, match="batches_seen"):
        sga.save_state(acc, tmp_path / "ckpt", batches_seen=-1)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.subprocess
@pytest.mark.timeout(120)
def test_import_is_lazy_and_missing_accelerate_names_the_extra() -> None:
    code = (
        "import sys\n"
        "import savegame\n"
        "assert 'accelerate' not in sys.modules and 'savegame.accelerate' not in sys.modules\n"
        "sys.modules['accelerate'] = None\n"
        "try:\n"
        "    import savegame.accelerate\n"
        "except savegame.errors.MissingExtraError as exc:\n"
        "    assert isinstance(exc, ImportError)\n"
        "    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=100)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'savegame[accelerate]'" in proc.stdout
    assert issubclass(MissingExtraError, savegame.CheckpointError)


# --------------------------------------------------------------------------------------------------
# The example


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_example_runs_and_resumes(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, EXAMPLE, str(tmp_path / "run")], capture_output=True, text=True,
                          env=_env(), timeout=280)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "resumed run matches the uninterrupted one bit for bit" in proc.stdout


class _Opaque:
    """A registered object whose state holds something that cannot be stored without pickle."""

    def state_dict(self) -> dict[str, Any]:
        return {"fine": 1, "callback": object()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise AssertionError("never loaded")


def test_unstorable_registered_state_is_refused_at_save_time(tmp_path: Path) -> None:
    acc, *_ = build(seed=0)
    acc.register_for_checkpointing(_Opaque())
    with pytest.raises(savegame.UnsupportedTypeError, match="custom_1"):
        sga.save_state(acc, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_run_root_retention_keeps_the_best_and_what_it_did_not_write(tmp_path: Path) -> None:
    acc, *_ = build(seed=0)
    root = tmp_path / "run"
    (root / "mine").mkdir(parents=True)  # a user's folder: never touched
    (root / "mine" / "notes.txt").write_text("keep me")
    ckpts = sga.Checkpoints(acc, root, keep_last=1, monitor="loss")
    for step, loss in enumerate([1.0, 0.1, 0.5, 0.7], start=1):
        ckpts.save(epoch=step, step=step, metrics={"loss": loss})
    ckpts.close()
    assert _checkpoints(root) == ["epoch=002-step=000002", "epoch=004-step=000004"]  # the best and the newest
    assert (root / "mine" / "notes.txt").read_text() == "keep me"
    best = sga.Checkpoints(acc, root, monitor="loss").resume("best")
    assert (best.epoch, best.step) == (2, 2)


# --------------------------------------------------------------------------------------------------
# Attack-pass regressions: bad arguments, positions that cannot resume, half-restores, lost orders


def test_something_else_than_an_accelerator_is_a_config_error(tmp_path: Path) -> None:
    acc, model, *_ = build(seed=0)
    sga.save_state(acc, tmp_path / "ok")
    with pytest.raises(savegame.ConfigError, match=r"must be the accelerate\.Accelerator.*got Sequential"):
        sga.save_state(model, tmp_path / "model")
    with pytest.raises(savegame.ConfigError, match=r"must be the accelerate\.Accelerator.*got str"):
        sga.save_state(str(tmp_path / "swapped"), acc)  # type: ignore[arg-type]
    with pytest.raises(savegame.ConfigError, match=r"must be the accelerate\.Accelerator.*got str"):
        sga.load_state(str(tmp_path / "ok"), acc)  # type: ignore[arg-type]
    with pytest.raises(savegame.ConfigError, match=r"must be the accelerate\.Accelerator"):
        sga.Checkpoints(model, tmp_path / "run")
    with pytest.raises(savegame.ConfigError, match="root must be a directory path"):
        sga.Checkpoints(acc, None)  # type: ignore[arg-type]
    assert sorted(os.listdir(tmp_path)) == ["ok"]


def test_bad_metadata_and_overwrite_are_config_errors(tmp_path: Path) -> None:
    acc, *_ = build(seed=0)
    with pytest.raises(savegame.ConfigError, match="metadata must be a dict"):
        sga.save_state(acc, tmp_path / "a", metadata="note")  # type: ignore[arg-type]
    sga.save_state(acc, tmp_path / "b", epoch=1)
    with pytest.raises(savegame.ConfigError, match="overwrite must be True or False"):
        sga.save_state(acc, tmp_path / "b", epoch=2, overwrite="no")  # type: ignore[arg-type]
    assert not (tmp_path / "a").exists() and sga.load_state(acc, tmp_path / "b").epoch == 1
    assert acc.save_iteration == 1  # the refused saves did not count


def test_a_position_that_cannot_resume_is_refused(tmp_path: Path) -> None:
    """epoch=None or batches_seen=None used to save a checkpoint whose load raised a bare TypeError (after
    restoring everything); now the save refuses it, and such a checkpoint is refused before any change."""
    acc, *_ = build(seed=0)
    for position in ({"epoch": None}, {"batches_seen": None}):
        with pytest.raises(savegame.ConfigError, match="must be an int >= 0, got None"):
            sga.save_state(acc, tmp_path / "none", **position)  # type: ignore[arg-type]
    assert not (tmp_path / "none").exists()
    with pytest.raises(savegame.ConfigError, match="epoch must be an int"):
        sga.Checkpoints(acc, tmp_path / "run").save(epoch=None)  # type: ignore[arg-type]
    # a checkpoint holding such a position (written before the check existed)
    bad = {**sga.accelerator_state(acc), "position": {"epoch": None, "batches_seen": 0, "step": None}}
    sga._dist.save(tmp_path / "legacy", bad, metadata=sga._metadata(acc, None))
    acc.step = 42
    with pytest.raises(IntegrationMismatchError, match="cannot say where to resume"):
        sga.load_state(acc, tmp_path / "legacy")
    assert acc.step == 42


def _two_models(hidden: int, *, groups: bool = False, seed: int = 0) -> tuple[Any, torch.nn.Module, torch.nn.Module]:
    """An accelerator with two prepared models (the second of width ``hidden``), one SGD optimizer and a
    prepared dataloader."""
    from accelerate import Accelerator

    torch.manual_seed(seed)
    acc = Accelerator(cpu=True)
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, hidden)
    params: Any = (
        [{"params": first.parameters()}, {"params": second.parameters()}]
        if groups
        else [*first.parameters(), *second.parameters()]
    )
    opt = torch.optim.SGD(params, lr=0.1)
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2)
    acc.prepare(first, second, opt, loader)
    return acc, first, second


@pytest.mark.parametrize("case", ["first model's shapes", "second model's shapes", "optimizer groups"])
def test_a_strict_mismatch_changes_nothing(tmp_path: Path, case: str) -> None:
    """A model or optimizer that does not match raised only once the items saved before it were restored:
    ``accelerator.step``, ``save_iteration``, the loader position, even the first model had changed."""
    acc, *_ = _two_models(3)
    acc.step = 5
    acc._dataloaders[0].iteration = 3
    sga.save_state(acc, tmp_path / "ckpt", epoch=3)
    if case == "first model's shapes":
        from accelerate import Accelerator

        other = Accelerator(cpu=True)
        first, second = torch.nn.Linear(4, 6), torch.nn.Linear(4, 3)
        opt = torch.optim.SGD([*first.parameters(), *second.parameters()], lr=0.1)
        other.prepare(first, second, opt, torch.utils.data.DataLoader(list(range(8)), batch_size=2))
    else:
        other, first, _ = _two_models(5 if case == "second model's shapes" else 3, groups=case == "optimizer groups",
                                      seed=1)  # fmt: skip
    before = first.weight.detach().clone()
    with pytest.raises(StateMismatchError, match=r"shape|groups"):
        sga.load_state(other, tmp_path / "ckpt")
    assert (other.step, other.save_iteration, other._dataloaders[0].iteration) == (0, 0, 0)
    assert torch.equal(first.weight, before)


@pytest.mark.parametrize("kind", ["subset", "weighted"])
def test_other_random_samplers_warn_on_a_mid_epoch_save(tmp_path: Path, kind: str) -> None:
    """``use_seedable_sampler`` replaces only a RandomSampler: a SubsetRandomSampler or WeightedRandomSampler
    still draws its order when the epoch starts, so a mid-epoch resume silently used another order."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    sampler: Any = (
        torch.utils.data.SubsetRandomSampler(list(range(8)))
        if kind == "subset"
        else torch.utils.data.WeightedRandomSampler([1.0] * 8, 8)
    )
    acc.prepare(torch.utils.data.DataLoader(list(range(8)), batch_size=2, sampler=sampler))
    with pytest.warns(ResumeWarning, match="RandomSampler"):
        sga.save_state(acc, tmp_path / "mid", epoch=0, batches_seen=2)


def test_checkpoints_honours_rng_false_and_refuses_weights_only(tmp_path: Path) -> None:
    acc, *_ = build(seed=0)
    ckpts = sga.Checkpoints(acc, tmp_path / "run", rng=False)
    saved = ckpts.save(epoch=1, step=3)
    ckpts.close()
    assert not any(name.startswith("rng") for name in savegame.read_manifest(saved.path).items)
    state = torch.get_rng_state()
    resumed = sga.Checkpoints(acc, tmp_path / "run", rng=False, quiet=True).resume()
    assert (resumed.epoch, resumed.step) == (1, 3) and torch.equal(torch.get_rng_state(), state)
    with pytest.raises(savegame.ConfigError, match="weights_only"):
        sga.Checkpoints(acc, tmp_path / "weights", weights_only=True)
    assert not (tmp_path / "weights").exists()


def test_checkpoint_at_the_last_batch_of_an_epoch_resumes_the_next_orders(tmp_path: Path) -> None:
    """A save inside the loop at an epoch's last batch (``batches_seen == len(loader)``): the resumed epoch
    skips every batch, and accelerate's loader then ends without counting the epoch, so every later epoch
    replayed the previous one's order."""
    _, _, _, _, loader, _ = build(seed=0)
    orders = [[x.sum().item() for x, _ in loader] for _ in range(3)]
    acc2, _, _, _, loader2, _ = build(seed=0)
    resumed = sga.Resumed(epoch=0, batches_seen=len(loader2))
    got = [[x.sum().item() for x, _ in resumed.dataloader(acc2, loader2, epoch)] for epoch in range(3)]
    assert got == [[], orders[1], orders[2]]
    assert loader2.iteration == 3


@pytest.mark.parametrize("which", ["latest", "best", "epoch=001"])
def test_run_root_resume_of_another_setup_changes_nothing(tmp_path: Path, which: str) -> None:
    acc, *_ = _two_models(3)
    ckpts = sga.Checkpoints(acc, tmp_path / "run", monitor="loss", quiet=True)
    ckpts.save(epoch=1, metrics={"loss": 0.5})
    ckpts.close()
    other, first, _ = _two_models(5, seed=1)
    before = first.weight.detach().clone()
    with pytest.raises(StateMismatchError, match="model_1: weight has shape"):
        sga.Checkpoints(other, tmp_path / "run", monitor="loss", quiet=True).resume(which)
    assert torch.equal(first.weight, before)


def test_a_save_in_the_middle_of_a_gradient_accumulation_warns(tmp_path: Path) -> None:
    """The accumulated ``.grad`` is in no checkpoint (accelerate's neither): a resume from a save between two
    synchronisation steps silently stepped with part of the gradients."""
    parts = build(seed=0)  # gradient_accumulation_steps=2
    acc = parts[0]
    _train(parts, 1)
    assert not acc.sync_gradients
    with pytest.warns(ResumeWarning, match="middle of a gradient accumulation"):
        sga.save_state(acc, tmp_path / "mid", epoch=0, batches_seen=1)
    _train(parts, 1)
    assert acc.sync_gradients
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sga.save_state(acc, tmp_path / "synced", epoch=0, batches_seen=2)


def test_mid_epoch_checkpoint_of_a_seedable_sampler_into_a_plain_one_warns(tmp_path: Path) -> None:
    """The sampler's epoch, seed and generator of the checkpoint have nowhere to go: the resumed epoch would
    skip batches of another order without a word."""
    from accelerate import Accelerator

    acc, *_ = build(seed=0)  # use_seedable_sampler=True
    sga.save_state(acc, tmp_path / "mid", epoch=1, batches_seen=2)
    sga.save_state(acc, tmp_path / "end", epoch=1, batches_seen=0)
    plain = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    plain.prepare(model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3))
    plain.prepare(torch.utils.data.DataLoader(list(range(40)), batch_size=4, shuffle=True))
    plain.register_for_checkpointing(Counter())
    with pytest.warns(ResumeWarning, match="SeedableRandomSampler.*different order"):
        sga.load_state(plain, tmp_path / "mid")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sga.load_state(plain, tmp_path / "end")  # at an epoch end the order is the next epoch's anyway


def test_save_and_load_state_hooks_are_not_skipped_silently(tmp_path: Path) -> None:
    """diffusers-style training scripts save an EMA model in a register_save_state_pre_hook hook: only
    Accelerator.save_state runs it, so a savegame checkpoint silently lacked it."""
    acc, *_ = build(seed=0)
    acc.register_save_state_pre_hook(lambda models, weights, output_dir: None)
    with pytest.warns(ResumeWarning, match="register_save_state_pre_hook.*register_for_checkpointing"):
        sga.save_state(acc, tmp_path / "ckpt")
    acc.register_load_state_pre_hook(lambda models, input_dir: None)
    with pytest.warns(ResumeWarning, match="register_load_state_pre_hook"):
        sga.load_state(acc, tmp_path / "ckpt")
    with pytest.warns(ResumeWarning, match=r"register_(save|load)_state_pre_hook"):
        sga.Checkpoints(acc, tmp_path / "run").close()


def test_mid_epoch_resume_into_a_fresh_seedable_loader_does_not_warn(tmp_path: Path) -> None:
    """A fresh SeedableRandomSampler has no generator until its first pass (it reseeds it every pass): that
    is no lost order."""
    parts = build(seed=0)
    _train(parts, 4)
    sga.save_state(parts[0], tmp_path / "mid", epoch=0, batches_seen=4)
    acc2, *_ = build(seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sga.load_state(acc2, tmp_path / "mid").batches_seen == 4
