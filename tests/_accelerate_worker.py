"""A tiny accelerate training run for tests/test_accelerate.py (CPU, synthetic data, deterministic).

``python _accelerate_worker.py ROOT OUT [--kill-at STEP] [--explicit]``: trains 3 epochs of 10 batches
with dropout, AdamW, a StepLR, gradient accumulation (2), a seedable shuffled sampler and a registered
counter; saves every 4 optimizer-visible batches and at each epoch end, into the run root ``ROOT``
(``savegame.accelerate.Checkpoints``, ``keep_last=2``) or, with ``--explicit``, into ``ROOT/step-N``
directories through ``save_state`` (resuming from the newest one with ``load_state``). ``--kill-at``
SIGKILLs the process after that many batches (between saves). The final parameters go to the
safetensors file ``OUT``; one JSON line on stdout says where the run resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

import savegame.accelerate as sga

EPOCHS, BATCHES, SAVE_EVERY = 3, 10, 4


class Counter:
    """A registered object (``register_for_checkpointing``): counts the batches trained on."""

    def __init__(self) -> None:
        self.seen = 0

    def state_dict(self) -> dict[str, int]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seen = int(state["seen"])


def build(seed: int = 0) -> tuple[Accelerator, torch.nn.Module, object, object, DataLoader, Counter]:
    set_seed(seed)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2,
                      dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
    gen = torch.Generator().manual_seed(123)
    data = TensorDataset(torch.randn(BATCHES * 4, 6, generator=gen), torch.randn(BATCHES * 4, 1, generator=gen))
    loader = DataLoader(data, batch_size=4, shuffle=True)
    model, opt, sched, loader = acc.prepare(model, opt, sched, loader)
    counter = Counter()
    acc.register_for_checkpointing(counter)
    return acc, model, opt, sched, loader, counter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("out")
    parser.add_argument("--kill-at", type=int, default=-1)
    parser.add_argument("--explicit", action="store_true")
    args = parser.parse_args()
    acc, model, opt, sched, loader, counter = build()
    ckpts = None if args.explicit else sga.Checkpoints(acc, args.root, keep_last=2)
    if ckpts is not None:
        resumed = ckpts.resume()
    else:
        names = sorted(os.listdir(args.root), key=lambda n: int(n.split("-")[1])) if os.path.isdir(args.root) else []
        resumed = sga.load_state(acc, os.path.join(args.root, names[-1])) if names else sga.Resumed()
    line = json.dumps({"resumed": resumed.path, "epoch": resumed.epoch, "batches_seen": resumed.batches_seen,
                       "step": resumed.step, "quarantined": list(resumed.quarantined)}) + "\n"
    # One write(2) of the whole line: under torchrun both ranks share the pipe, and print() writes the text and
    # its newline separately, so two ranks' lines could interleave; a pipe write under PIPE_BUF bytes is atomic.
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), line.encode())
    step = resumed.step or 0

    def save(epoch: int, seen: int) -> None:
        if ckpts is not None:
            ckpts.save(epoch=epoch, batches_seen=seen, step=step)
        else:
            sga.save_state(acc, os.path.join(args.root, f"step-{step}"), epoch=epoch, batches_seen=seen, step=step)

    for epoch in range(resumed.epoch, EPOCHS):
        seen = resumed.batches_seen if epoch == resumed.epoch else 0
        for x, y in resumed.dataloader(acc, loader, epoch):
            with acc.accumulate(model):
                loss = torch.nn.functional.mse_loss(model(x), y)
                acc.backward(loss)
                opt.step()
                sched.step()
                opt.zero_grad()
            step += 1
            seen += 1
            counter.seen += 1
            if step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if seen % SAVE_EVERY == 0 and seen < BATCHES:
                save(epoch, seen)
        save(epoch + 1, 0)
    if ckpts is not None:
        ckpts.close()
    params = {k: v.detach().clone().contiguous() for k, v in acc.unwrap_model(model).state_dict().items()}
    params["counter"] = torch.tensor([counter.seen])
    params["lr"] = torch.tensor(sched.get_last_lr())
    params["rng"] = torch.rand(4)  # the RNG after training must continue identically too
    if acc.is_main_process:  # several processes (torchrun): rank 0 reports
        save_file(params, args.out)


if __name__ == "__main__":
    main()
