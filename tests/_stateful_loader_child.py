"""Training script for test_data_resume's SIGKILL test: a tiny model fed by torchdata's
StatefulDataLoader (shuffled, num_workers=2), saved after every batch through savegame.Checkpointer.

``python _stateful_loader_child.py ROOT OUT``: resumes from ROOT if it holds a checkpoint, trains to
the end of 2 epochs (10 batches each), appends each batch's sample indices to ROOT/seen.txt (cut
back to the checkpoint's step on resume: what came after it was lost with the process), prints
``batch N`` after each save, and saves the final weights to OUT.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import savegame

EPOCHS = 2


def main(root: Path, out: Path) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
    data = TensorDataset(x, x.sum(1, keepdim=True), torch.arange(40))
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # generator=: a resumed iterator draws its worker seed from this generator instead of the global
    # one, so dropout's stream after the resume is the uninterrupted run's (savegame.data, rule 4)
    loader = StatefulDataLoader(
        data, batch_size=4, shuffle=True, num_workers=2, generator=torch.Generator(), persistent_workers=True
    )
    state = {"model": model, "optimizer": opt, "loader": loader}
    seen = root / "seen.txt"
    with savegame.Checkpointer(root, every_n_steps=1, keep_last=2) as ckpt:
        restored = ckpt.restore(state)
        start, step = (restored.epoch or 0, restored.step or 0) if restored else (0, 0)
        if restored is not None:
            print(f"resumed at epoch {start}, step {step}", flush=True)
            seen.write_text("".join(line + "\n" for line in seen.read_text().splitlines()[:step]))
        for epoch in range(start, EPOCHS):
            for xb, yb, index in loader:
                opt.zero_grad()
                torch.nn.functional.mse_loss(model(xb), yb).backward()
                opt.step()
                step += 1
                with open(seen, "a") as log:
                    log.write(" ".join(str(int(i)) for i in index) + "\n")
                ckpt.step(state, epoch=epoch, step=step, epoch_end=False)
                print(f"batch {step}", flush=True)
            ckpt.step(state, epoch=epoch + 1, step=step)
    savegame.save(out, dict(model.state_dict()))


if __name__ == "__main__":
    root = Path(sys.argv[1])
    root.mkdir(parents=True, exist_ok=True)
    main(root, Path(sys.argv[2]))
