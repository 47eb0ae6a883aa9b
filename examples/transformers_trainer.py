"""Hugging Face ``Trainer`` with savegame checkpoints: train, get interrupted, resume exactly.

    python examples/transformers_trainer.py [OUTPUT_DIR]

The one-line change is the import: ``from savegame.transformers import Trainer``. A tiny GPT-2 (built
from a config: nothing is downloaded) learns synthetic token sequences on the CPU. The first run is
interrupted at step 7 (a callback stops it, as a crash or a preemption would); ``train(resume_from_checkpoint=True)``
continues from ``checkpoint-6`` and ends with exactly the parameters of an uninterrupted run.
``save_total_limit=1`` with ``load_best_model_at_end`` keeps the best checkpoint, which
``from_pretrained`` opens as it is. Prints one JSON line with the results.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments, set_seed

from savegame.transformers import Trainer


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int, seed: int) -> None:
        self.x = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


class StopAt(TrainerCallback):
    """Stands in for a crash: training stops at the end of step ``step``, before it is saved."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            control.should_training_stop, control.should_save, control.should_evaluate = True, False, False


def make_trainer(output_dir: str, callbacks: list[Any]) -> Trainer:
    set_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                       bos_token_id=0, eos_token_id=0))  # fmt: skip
    args = TrainingArguments(
        output_dir=output_dir, max_steps=12, per_device_train_batch_size=4, learning_rate=5e-3, seed=0,
        save_steps=2, save_total_limit=1, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
        metric_for_best_model="eval_loss", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=4,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=Tokens(48, 1), eval_dataset=Tokens(16, 2),
                   callbacks=callbacks)  # fmt: skip


def final_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def main(root: str) -> dict[str, Any]:
    run = os.path.join(root, "interrupted")
    make_trainer(run, [StopAt(7)]).train()  # checkpoints up to checkpoint-6 are committed
    resumed = make_trainer(run, [])
    resumed.train(resume_from_checkpoint=True)  # the newest checkpoint that verifies
    straight = make_trainer(os.path.join(root, "uninterrupted"), [])
    straight.train()
    a, b = final_weights(resumed), final_weights(straight)
    best = resumed.state.best_model_checkpoint
    reopened = GPT2LMHeadModel.from_pretrained(best)  # a savegame checkpoint is a from_pretrained folder
    return {
        "resumed_equals_uninterrupted": all(torch.equal(a[k], b[k]) for k in a),
        "best_checkpoint": best,
        "best_kept": best is not None and os.path.isdir(best),
        "checkpoints_left": sorted(os.listdir(run)),
        "best_reopened_equals_loaded_best": all(
            torch.equal(v, a[k]) for k, v in reopened.state_dict().items()
        ),
    }


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(json.dumps(main(sys.argv[1])))
    else:
        with tempfile.TemporaryDirectory() as scratch:
            print(json.dumps(main(scratch)))
