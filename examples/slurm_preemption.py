"""Train under SLURM: save when warned, requeue, resume -- nothing since the last step is lost.

Submit it with this batch script (``sbatch train.sbatch``)::

    #!/bin/bash
    #SBATCH --job-name=savegame-preempt
    #SBATCH --time=00:30:00
    #SBATCH --signal=USR1@90          # SIGUSR1 to the job step 90 s before the time limit
    #SBATCH --requeue                 # the job may be requeued (by us on SIGUSR1, by SLURM on preemption)
    #SBATCH --open-mode=append        # keep the output of every attempt
    #SBATCH --output=slurm-%j.out
    srun python examples/slurm_preemption.py --dir runs/slurm-preemption

``--signal=USR1@90`` (without ``B:``) signals the job *steps*, i.e. the python started by ``srun``.
SLURM also sends SIGTERM on preemption and ``scancel``, then SIGKILL after ``KillWait`` (30 s by
default). Either signal saves at the next step boundary (well inside the grace period: a save of this
model takes milliseconds; a multi-GB state takes seconds at disk speed) and exits with code 0. On
SIGUSR1 (time limit near) the script requeues its own job with ``scontrol requeue``; a preempted job is
requeued by SLURM. The requeued job starts again from the top and resumes from the newest checkpoint.

Without SLURM: run it, ``kill -USR1 <pid>`` (or ``kill <pid>``), run it again: it resumes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

import torch
from torch import nn

import savegame
from savegame.policies import Never


def requeue() -> None:
    """Put this job back in the queue (it restarts from the top and resumes from the checkpoint)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        print("not under SLURM: run me again to resume", flush=True)
        return
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    print(f"scontrol requeue {job}: exit {result.returncode} {result.stderr.strip()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="SLURM preemption-safe training with savegame")
    parser.add_argument("--dir", default="runs/slurm-preemption")
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--step-seconds", type=float, default=0.01, help="simulated work per step")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    # save=Never(): no periodic saves in this example, only on a signal and at the end. The Checkpointer
    # holds the directory's writer lock (a second copy of this job fails at once), cleans the debris of an
    # attempt killed mid-save, and catches SIGTERM and SIGUSR1. "continue": after the preemption save,
    # step() returns and we requeue before exiting with code 0 (SLURM must not count the attempt as failed).
    with savegame.Checkpointer(
        args.dir, save=Never(), keep_last=2, name="step-{step:09d}",
        save_on_signal=("SIGTERM", "SIGUSR1"), signal_action="continue",
        metadata={"slurm_job": os.environ.get("SLURM_JOB_ID")},
    ) as ckpt:  # fmt: skip
        step = 0
        restored = ckpt.restore({"model": model, "optimizer": optimizer, "step": 0})
        if restored is not None:
            step = int(restored.data["step"])
            print(f"resumed from {restored.name} at step {step}", flush=True)

        while step < args.steps:
            x = torch.randn(64, 32)
            loss = (model(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            time.sleep(args.step_seconds)
            if step % 100 == 0:
                print(f"step {step} loss {loss.item():.4f}", flush=True)
            # A safe point: saves here (and only here) if a signal arrived during this step.
            result = ckpt.step({"model": model, "optimizer": optimizer, "step": step}, step=step, epoch_end=False)
            if ckpt.preempted:
                assert result is not None
                print(f"saved {result.name} in {result.seconds:.2f} s after {ckpt.preempted}", flush=True)
                if ckpt.preempted != "SIGTERM":  # SIGUSR1: our time is up; SLURM requeues preempted jobs itself
                    requeue()
                return
        ckpt.save({"model": model, "optimizer": optimizer, "step": step}, step=step)
        print("training finished", flush=True)


if __name__ == "__main__":
    main()
