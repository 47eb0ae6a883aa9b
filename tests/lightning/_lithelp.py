"""A tiny deterministic LightningModule on synthetic data, the Trainer the tests use, and file checks.

Shared by the in-process tests and the scripts they start (``_fit_script.py``), so both train the
same model the same way. Shuffling draws from the global torch RNG and the model has dropout, so a
resume is bit-identical to an uninterrupted run only if the RNG state comes back too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, TensorDataset

import savegame.lightning as sl

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BATCHES_PER_EPOCH = 4


@dataclasses.dataclass
class Config:
    """A dataclass hyper-parameter (must come back as this type)."""

    hidden: int = 16
    dropout: float = 0.25
    data: pathlib.Path = pathlib.Path("data")


class LitMLP(pl.LightningModule):
    """An MLP regressor with dropout, SGD with momentum and a StepLR schedule; logs ``val_loss``."""

    def __init__(self, lr: float = 0.05, config: Config | None = None, extra: argparse.Namespace | None = None,
                 val_schedule: list[float] | None = None) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        cfg = config or Config()
        layers = [torch.nn.Linear(6, cfg.hidden), torch.nn.ReLU(), torch.nn.Dropout(cfg.dropout)]
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(cfg.hidden, 1))

    def training_step(self, batch: Any, index: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, index: int) -> None:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        schedule = self.hparams.val_schedule
        if schedule:  # a chosen metric per epoch (retention tests), independent of training
            loss = torch.tensor(schedule[min(self.current_epoch, len(schedule) - 1)])
        self.log("val_loss", loss)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)]


def data(batch_size: int = 8) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """Synthetic regression data (fixed generator): a shuffled train loader and a validation loader."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(BATCHES_PER_EPOCH * batch_size, 6, generator=g)
    y = x @ torch.randn(6, 1, generator=g) + 0.1 * torch.randn(len(x), 1, generator=g)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch_size, shuffle=True), DataLoader(ds, batch_size=16)


def trainer(root: Path, *, epochs: int, io: sl.SavegameIO | None = None, callbacks: list[Any] | None = None,
            **kwargs: Any) -> pl.Trainer:  # fmt: skip
    """A quiet, deterministic CPU Trainer writing through ``io`` (a fresh SavegameIO by default)."""
    options: dict[str, Any] = dict(accelerator="cpu", devices=1, deterministic=True, logger=False,
                                   enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    options.update(kwargs)
    return pl.Trainer(max_epochs=epochs, default_root_dir=str(root), plugins=[io or sl.SavegameIO()],
                      callbacks=callbacks or [], **options)  # fmt: skip


def model_checkpoint(root: Path, **kwargs: Any) -> pl.callbacks.ModelCheckpoint:
    return pl.callbacks.ModelCheckpoint(dirpath=str(root / "ckpts"), **kwargs)


def fit(root: Path, *, epochs: int, ckpt_path: str | None = None, io: sl.SavegameIO | None = None,
        model_kwargs: dict[str, Any] | None = None, **checkpoint: Any) -> tuple[LitMLP, pl.Trainer]:  # fmt: skip
    """Seed, build a fresh model (as a fresh script would) and fit it, resuming from ``ckpt_path``."""
    pl.seed_everything(0, verbose=False)
    model = LitMLP(**(model_kwargs or {}))
    t = trainer(root, epochs=epochs, io=io, callbacks=[model_checkpoint(root, **checkpoint)])
    train, val = data()
    t.fit(model, train, val, ckpt_path=ckpt_path)
    return model, t


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def assert_no_pickle(root: Path) -> list[Path]:
    """Every file under ``root`` is a JSON manifest or a safetensors file (nothing a pickle loader reads)."""
    files = [p for p in root.rglob("*") if p.is_file()]
    for f in files:
        head = f.read_bytes()[:4]
        assert not head.startswith((b"PK\x03\x04", b"\x80")), f"{f} looks like a torch/pickle file"
        if any(part.startswith(".staging-") for part in f.relative_to(root).parts):
            # a killed writer's unfinished save: never a checkpoint (nothing lists or loads it; `savegame gc`
            # removes it), and its files may end anywhere, so only the no-pickle check above applies
            continue
        if f.name == "manifest.json":
            json.loads(f.read_text())
        else:
            assert f.suffix == ".safetensors", f
            try:
                with safe_open(str(f), framework="pt") as opened:
                    list(opened.keys())
            except Exception as exc:  # which file, and what else is there, so a failure says what was left
                listing = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
                size = f.stat().st_size
                raise AssertionError(f"{f} ({size} bytes) is not a safetensors file ({exc}); {listing}") from exc
    return files


def script_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), str(HERE), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("TORCHDYNAMO_DISABLE", "1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``_fit_script.py`` with ``args`` in a fresh interpreter (returns even when it was killed)."""
    return subprocess.run([sys.executable, str(HERE / "_fit_script.py"), *args], capture_output=True, text=True,
                          env=script_env(), timeout=timeout, cwd=str(ROOT))  # fmt: skip
