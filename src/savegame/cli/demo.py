"""``savegame demo``: kill a training run with SIGKILL mid-epoch, resume it, get bit-identical weights.

The demo trains a small MLP on scikit-learn's bundled digits data (no download) in a child process
that checkpoints every 16 steps and at every epoch end into ``DIR/checkpoints`` (``--dir``, default
``./runs/demo``), keeping the 3 newest and the 3 best by validation accuracy. In the middle of an
epoch the child is killed with ``SIGKILL`` -- no cleanup, no chance to save. A second child resumes
from the newest checkpoint (model, optimizer, RNGs and the position in the shuffled data) and
finishes. Meanwhile an uninterrupted reference run trains alongside in ``DIR/reference``. The demo
prints the checkpoint table and compares the SHA-256 of the final parameters of both runs: they are
identical, bit for bit.

Determinism comes from fixed seeds, ``torch.use_deterministic_algorithms(True)``, one CPU thread and
:class:`savegame.data.ResumableRandomSampler`. Run it with ``savegame demo`` or
``python -m savegame.cli.demo``; the exit status is 0 when the hashes match.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from savegame.run.checkpointer import Checkpointer, CheckpointRecord

if TYPE_CHECKING:  # torch is imported when training starts, so ``--help`` and the parent stay light
    import torch
    from torch import nn

__all__ = ["main", "parameter_hash", "train"]

REQUIREMENTS = (("torch", "torch"), ("sklearn", "scikit-learn"))
"""(module, pip package) the demo needs beyond savegame itself: ``pip install 'savegame[demo]'``."""

BATCH_SIZE = 32
SAVE_EVERY_STEPS = 16
MONITOR = "val_accuracy"


@dataclass(frozen=True)
class Digits:
    """The digits data split into train and validation tensors (deterministic split)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


def load_data(seed: int) -> Digits:
    """scikit-learn's 8x8 digits, scaled to [0, 1], 80/20 split by a seeded permutation."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.from_numpy(np.random.RandomState(seed).permutation(len(x)))
    cut = int(0.8 * len(x))
    train, val = order[:cut], order[cut:]
    return Digits(x[train], y[train], x[val], y[val])


def make_model() -> nn.Module:
    """64 -> 128 -> 10 MLP with dropout (so the resumed run must also restore the RNG)."""
    from torch import nn

    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 10))


def parameter_hash(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape and raw bytes)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def train(
    directory: str,
    *,
    epochs: int,
    seed: int = 0,
    pause_at_step: int | None = None,
    out: Callable[[str], None] = print,
) -> str:
    """Train (resuming from ``directory`` if it has checkpoints); return the final parameter hash.

    ``pause_at_step``: stop making progress at that global step (print ``PAUSED`` and sleep) so the
    demo can kill the process at a known point. Events are printed as ``WORD key=value ...`` lines.
    """
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from savegame.data import ResumableRandomSampler

    _seed_everything(seed)
    data = load_data(seed)
    dataset = TensorDataset(data.x_train, data.y_train)
    sampler = ResumableRandomSampler(dataset, seed=seed)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, sampler=sampler, generator=torch.Generator())
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ckpt = Checkpointer(
        directory,
        monitor=MONITOR,
        every_n_epochs=1,
        every_n_steps=SAVE_EVERY_STEPS,
        keep_last=3,
        keep_best=3,
        name="epoch={epoch:02d}-step={step:04d}",
        max_epochs=epochs,
        metadata={"demo": "digits-mlp", "seed": seed},
    )
    state = {"model": model, "optimizer": optimizer, "sampler": sampler}
    restored = ckpt.restore(state)
    start, step = 0, 0
    if restored is not None:
        start, step = restored.epoch or 0, restored.step or 0
        out(f"RESUMED name={restored.name} epoch={start} step={step} position={sampler.position}")
    for epoch in range(start, epochs):
        sampler.set_epoch(epoch)
        model.train()
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            step += 1
            saved = ckpt.step(state, epoch=epoch, step=step, epoch_end=False)
            if saved is not None:
                out(f"SAVED name={saved.name} step={step}")
            if pause_at_step is not None and step == pause_at_step:
                out(f"PAUSED epoch={epoch + 1} batch={sampler.position // BATCH_SIZE} step={step}")
                time.sleep(3600)
        model.eval()
        with torch.no_grad():
            logits = model(data.x_val)
            val_loss = F.cross_entropy(logits, data.y_val).item()
            val_acc = (logits.argmax(1) == data.y_val).float().mean().item()
        saved = ckpt.step(state, epoch=epoch + 1, step=step, metrics={"val_loss": val_loss, MONITOR: val_acc})
        out(f"EPOCH epoch={epoch + 1} step={step} val_loss={val_loss:.4f} {MONITOR}={val_acc:.4f}")
        if saved is not None:
            out(f"SAVED name={saved.name} step={step}" + (" best" if saved.is_best else ""))
    ckpt.close()
    digest = parameter_hash(model)
    out(f"FINAL sha256={digest}")
    return digest


# --------------------------------------------------------------------------------------------------
# The orchestrating parent process


def _child(directory: str, *, epochs: int, seed: int, pause_at_step: int | None) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "savegame.cli.demo", "--worker", "--dir", directory,
               "--epochs", str(epochs), "--seed", str(seed)]  # fmt: skip
    if pause_at_step is not None:
        command += ["--pause-at-step", str(pause_at_step)]
    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    # Nothing here uses torch.compile; without this the first backward() imports TorchDynamo (~3 s).
    env.setdefault("TORCHDYNAMO_DISABLE", "1")
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, bufsize=1)


def _fields(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)


def _run_to_end(proc: subprocess.Popen[str], echo: Callable[[str], None]) -> str:
    """Relay a child's events; return its final hash (RuntimeError if it failed)."""
    assert proc.stdout is not None
    digest = ""
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("FINAL"):
            digest = _fields(line)["sha256"]
        else:
            echo(line)
    if proc.wait() != 0 or not digest:
        raise RuntimeError(f"training process failed with exit status {proc.returncode}")
    return digest


def _size(n: int) -> str:
    """Bytes in human units (``10.7 KiB``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def format_table(records: Sequence[CheckpointRecord]) -> str:
    """The checkpoint table: name, epoch, step, metrics, best/latest marks, size."""
    rows = [("name", "epoch", "step", "val_loss", MONITOR, "mark", "size")]
    for r in records:
        marks = " ".join(m for m, on in (("best", r.is_best), ("latest", r.is_latest)) if on)
        rows.append((
            r.name, str(r.epoch), str(r.step),
            f"{r.metrics['val_loss']:.4f}" if "val_loss" in r.metrics else "-",
            f"{r.metrics[MONITOR]:.4f}" if MONITOR in r.metrics else "-",
            marks, _size(r.size),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def missing_requirements() -> list[str]:
    """The pip names of the :data:`REQUIREMENTS` that cannot be imported here (found without importing
    them, so the parent stays light: the training children import them)."""
    missing = []
    for module, package in REQUIREMENTS:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # an import hook refusing it; a module set to None
            found = False
        if not found:
            missing.append(package)
    return missing


def run_demo(directory: str, *, epochs: int, seed: int, kill_at_step: int) -> int:
    """The whole demo (see the module docstring); returns the exit status."""
    started = time.monotonic()
    run_dir = os.path.join(directory, "checkpoints")
    ref_dir = os.path.join(directory, "reference")
    for path in (run_dir, ref_dir):
        shutil.rmtree(path, ignore_errors=True)
    steps_per_epoch = -(-int(0.8 * 1797) // BATCH_SIZE)
    print(f"savegame demo: MLP on scikit-learn digits, {epochs} epochs of {steps_per_epoch} steps, "
          f"checkpoints every {SAVE_EVERY_STEPS} steps and every epoch in {run_dir}")  # fmt: skip

    def echo(line: str) -> None:
        if line.startswith(("SAVED", "RESUMED", "EPOCH")):
            print(f"  | {line}")

    # The uninterrupted reference run trains alongside (its output is read at the end).
    reference_proc = _child(ref_dir, epochs=epochs, seed=seed, pause_at_step=None)

    print("\n1. training (child process) ...")
    proc = _child(run_dir, epochs=epochs, seed=seed, pause_at_step=kill_at_step)
    assert proc.stdout is not None
    killed_at = ""
    for raw in proc.stdout:
        line = raw.strip()
        echo(line)
        if line.startswith("PAUSED"):
            proc.send_signal(signal.SIGKILL)
            killed_at = line
            break
    proc.wait()
    if not killed_at:
        print("the training process ended before it could be killed", file=sys.stderr)
        reference_proc.kill()
        reference_proc.wait()
        return 1
    where = _fields(killed_at)
    print(f"   SIGKILL -> pid {proc.pid} at epoch {where['epoch']}, batch {where['batch']} "
          f"(global step {where['step']}), exit status {proc.returncode}")  # fmt: skip

    print("\n2. resuming (new child process) ...")
    resumed = _run_to_end(_child(run_dir, epochs=epochs, seed=seed, pause_at_step=None), echo)

    print("\n3. checkpoints in", run_dir)
    print(format_table(Checkpointer(run_dir, monitor=MONITOR, lock=False).list()))

    print(f"\n4. uninterrupted reference run (trained alongside in {ref_dir})")
    reference = _run_to_end(reference_proc, lambda line: None)

    print("\nfinal parameters, SHA-256:")
    print(f"  killed + resumed : {resumed}")
    print(f"  uninterrupted    : {reference}")
    same = resumed == reference
    print("  identical: yes -- the resumed run is bit-identical" if same else "  identical: NO (mismatch)")
    print(f"\ndone in {time.monotonic() - started:.1f} s")
    return 0 if same else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``savegame demo`` and ``python -m savegame.cli.demo``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="savegame demo", description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--dir", default=os.path.join("runs", "demo"), help="output directory (default runs/demo)")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--kill-at-step", type=int, default=None,
                        help="global step at which to SIGKILL the first run (default: middle of epoch 3)")  # fmt: skip
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pause-at-step", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2")
    if args.worker:

        def emit(line: str) -> None:
            print(line, flush=True)

        train(args.dir, epochs=args.epochs, seed=args.seed, pause_at_step=args.pause_at_step, out=emit)
        return 0
    steps_per_epoch = -(-int(0.8 * 1797) // BATCH_SIZE)
    middle = min(args.epochs - 1, 2) * steps_per_epoch + steps_per_epoch // 2 + 3
    kill_at = args.kill_at_step if args.kill_at_step is not None else middle
    if not 0 < kill_at < args.epochs * steps_per_epoch:
        parser.error(f"--kill-at-step must be between 1 and {args.epochs * steps_per_epoch - 1}")
    missing = missing_requirements()
    if missing:
        print(f"savegame demo: needs {' and '.join(missing)}, not installed here: pip install 'savegame[demo]' "
              "(or run 'make demo' in the savegame repository)", file=sys.stderr)  # fmt: skip
        return 1
    return run_demo(args.dir, epochs=args.epochs, seed=args.seed, kill_at_step=kill_at)


if __name__ == "__main__":
    sys.exit(main())
