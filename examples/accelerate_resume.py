"""Hugging Face accelerate + savegame: kill a training run with SIGKILL mid-epoch, resume it, get the same model.

    python examples/accelerate_resume.py [RUN_DIR]

The training function is an ordinary accelerate loop; the savegame lines are marked ``# savegame``. The
script runs it three times as child processes: uninterrupted, killed after batch 13 (the last checkpoint
is the mid-epoch one at batch 12), and resumed from that run root; then it checks that the resumed run's
final weights equal the uninterrupted run's bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

import savegame.accelerate  # savegame

EPOCHS = 2


def train(run_dir: str, out: str, kill_at: int | None) -> None:
    set_seed(0)
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS * 16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=gen)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(128, 1, generator=gen))
    loader = DataLoader(data, batch_size=8, shuffle=True)
    model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)

    checkpoints = savegame.accelerate.Checkpoints(accelerator, run_dir, keep_last=2)  # savegame
    resumed = checkpoints.resume()  # savegame: Resumed(path=None) on a fresh start
    if resumed.path:
        print(f"resumed from {resumed.path} (epoch {resumed.epoch}, {resumed.batches_seen} batches done)")
    step = resumed.step or 0
    for epoch in range(resumed.epoch, EPOCHS):
        for batch, (inputs, targets) in enumerate(resumed.dataloader(accelerator, loader, epoch),  # savegame
                                                  start=resumed.batches_seen if epoch == resumed.epoch else 0):
            loss = torch.nn.functional.mse_loss(model(inputs), targets)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # a crash: no cleanup, no goodbye
            if (batch + 1) % 6 == 0:
                checkpoints.save(epoch=epoch, batches_seen=batch + 1, step=step)  # savegame
        checkpoints.save(epoch=epoch + 1, step=step)  # savegame: epoch end
    checkpoints.close()  # savegame
    save_file({k: v.contiguous() for k, v in accelerator.unwrap_model(model).state_dict().items()}, out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        train(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else None)
        return
    base = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="savegame-accelerate-")

    def child(*args: str) -> int:
        return subprocess.run([sys.executable, __file__, "--child", *args]).returncode

    child(os.path.join(base, "uninterrupted"), os.path.join(base, "a.safetensors"))
    code = child(os.path.join(base, "crashed"), os.path.join(base, "b.safetensors"), "13")
    kept = sorted(n for n in os.listdir(os.path.join(base, "crashed")) if not n.startswith("."))
    print(f"training killed (exit code {code}); checkpoints: {kept}")
    child(os.path.join(base, "crashed"), os.path.join(base, "b.safetensors"))
    a, b = load_file(os.path.join(base, "a.safetensors")), load_file(os.path.join(base, "b.safetensors"))
    if not all(torch.equal(a[k], b[k]) for k in a):
        sys.exit("the resumed run differs from the uninterrupted one")
    print("resumed run matches the uninterrupted one bit for bit")


if __name__ == "__main__":
    main()
