"""Ray Train with savegame checkpoints: a TorchTrainer on 2 CPU workers that resumes where it stopped.

    python examples/ray_train.py --storage-path runs/ray --name demo --epochs 6

Each epoch the training function reports its metrics with ``savegame.ray.report(metrics, state)``: rank 0
saves the model, optimizer, scheduler and epoch as a savegame checkpoint (atomic, verified, no pickle)
and Ray copies it to ``<storage-path>/<name>/checkpoint_*``, keeping ``--keep`` of them ranked by
``val_loss`` (``CheckpointConfig(num_to_keep, checkpoint_score_attribute)``). Run the same command again
after a crash (or a kill): Ray finds the run's checkpoints under the same name and storage path, and
``savegame.ray.restore(state)`` loads the newest intact one, so training continues from that epoch and
ends with the same parameters as a run that was never interrupted (DDP on CPU with gloo is
deterministic here: same data order, same reductions).

``--result FILE`` writes what the run did as JSON (the final and best checkpoints, the epoch it started
from), ``--metrics-log FILE`` appends every epoch's metrics (also those of checkpoints Ray deleted);
``--step-sleep`` slows each step down (for trying a kill by hand, and for the test that does).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import ray
import ray.train
import torch
from ray.train import CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model

import savegame.ray

SAMPLES, FEATURES, BATCH = 256, 8, 16


def make_data(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic regression data (train and validation), the same on every worker."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES + 64, FEATURES, generator=g)
    w = torch.randn(FEATURES, 1, generator=g)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(SAMPLES + 64, 1, generator=g)
    return x[:SAMPLES], y[:SAMPLES], x[SAMPLES:], y[SAMPLES:]


def train_loop(config: dict[str, Any]) -> None:
    """The training function each Ray worker runs."""
    torch.set_num_threads(1)
    torch.manual_seed(config["seed"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    x, y, x_val, y_val = make_data(config["seed"])
    net = torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    model = prepare_model(net)  # DistributedDataParallel over gloo
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    state = {"model": net, "optimizer": optimizer, "scheduler": scheduler, "epoch": 0}

    restored = savegame.ray.restore(state)  # None on a fresh run; otherwise state["epoch"] is the saved one
    start = int(state["epoch"])
    if restored is not None and rank == 0:
        print(f"resumed from {restored.path} at epoch {start}", flush=True)

    for epoch in range(start, config["epochs"]):
        order = torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(config["seed"] * 1000 + epoch))
        mine = order[rank::world]  # each worker its own half, in an order that depends only on the epoch
        model.train()
        total = 0.0
        for i in range(0, len(mine), BATCH):
            idx = mine[i : i + BATCH]
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            time.sleep(config["step_sleep"])
        scheduler.step()
        with torch.no_grad():
            val_loss = float(torch.nn.functional.mse_loss(net(x_val), y_val))
        state["epoch"] = epoch + 1
        metrics = {"epoch": epoch + 1, "loss": total / len(mine), "val_loss": val_loss, "start_epoch": start}
        savegame.ray.report(metrics, state)  # Ray names it checkpoint_<time>: unique, also across resumes
        if rank == 0 and config["metrics_log"]:  # every epoch's metrics, also those of checkpoints Ray deleted
            with open(config["metrics_log"], "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage-path", required=True, help="where Ray keeps the run's checkpoints")
    parser.add_argument("--name", default="savegame-ray-demo", help="the run's name (the same name resumes)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", type=int, default=2, help="CheckpointConfig(num_to_keep=...)")
    parser.add_argument("--order", choices=["min", "max"], default="min", help="how val_loss ranks checkpoints")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep after each step")
    parser.add_argument("--result", help="write a JSON summary of the run here")
    parser.add_argument("--metrics-log", help="append each epoch's metrics to this file (JSON lines)")
    args = parser.parse_args(argv)

    ray.init(num_cpus=args.workers, include_dashboard=False)
    try:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "epochs": args.epochs,
                "lr": args.lr,
                "seed": args.seed,
                "step_sleep": args.step_sleep,
                "metrics_log": os.path.abspath(args.metrics_log) if args.metrics_log else None,
            },
            scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=False),
            run_config=RunConfig(
                name=args.name,
                storage_path=os.path.abspath(args.storage_path),
                checkpoint_config=CheckpointConfig(
                    num_to_keep=args.keep, checkpoint_score_attribute="val_loss", checkpoint_score_order=args.order
                ),
            ),
        )
        result = trainer.fit()
    finally:
        ray.shutdown()
    summary = {
        "final_checkpoint": result.checkpoint.path,
        "metrics": result.metrics,
        "best_checkpoints": [[c.path, m] for c, m in result.best_checkpoints],
    }
    print(f"final checkpoint {summary['final_checkpoint']} after epoch {result.metrics['epoch']}", flush=True)
    if args.result:
        with open(args.result, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
