"""A tiny GPT-2 trained by ``savegame.transformers.Trainer`` on synthetic data, on CPU, offline.

Imported by tests/test_transformers.py, and run as a script by it (the SIGKILL test)::

    python tests/_hf_train.py OUT --max-steps 12 [--kill-at 7] [--resume true|PATH] [--final FILE]

``--kill-at``: the process SIGKILLs itself at the end of that optimizer step (before its save, if any).
``--final``: the trained parameters are written there (safetensors) when training ends.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments

import savegame.transformers

VOCAB, LENGTH = 64, 16


class TokenData(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Fixed random token sequences (labels = inputs: language modelling)."""

    def __init__(self, n: int, seed: int) -> None:
        self.tokens = torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def tiny_model() -> GPT2LMHeadModel:
    transformers.set_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
                        eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(config)


def arguments(output_dir: str, **overrides: Any) -> TrainingArguments:
    options: dict[str, Any] = dict(
        output_dir=output_dir, max_steps=12, per_device_train_batch_size=4, learning_rate=5e-3,
        save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=8,
        logging_steps=2, report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
        disable_tqdm=True, warmup_steps=2, lr_scheduler_type="linear",
    )  # fmt: skip
    options.update(overrides)
    return TrainingArguments(**options)


class KillAt(TrainerCallback):
    """SIGKILL this process at the end of optimizer step ``step``, before that step's save."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def build_trainer(output_dir: str, *, callbacks: list[Any] | None = None, trainer_class: Any = None,
                  **overrides: Any) -> Any:  # fmt: skip
    cls = trainer_class or savegame.transformers.Trainer
    return cls(model=tiny_model(), args=arguments(output_dir, **overrides), train_dataset=TokenData(48, 1),
               eval_dataset=TokenData(16, 2), callbacks=callbacks)  # fmt: skip


def parameters(source: Any) -> dict[str, torch.Tensor]:
    """A copy of the parameters of a Trainer's model (or of a model)."""
    model = source.model if isinstance(source, transformers.Trainer) else source
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--resume")
    parser.add_argument("--final")
    a = parser.parse_args(argv)
    callbacks = [KillAt(a.kill_at)] if a.kill_at else []
    trainer = build_trainer(a.out, callbacks=callbacks, max_steps=a.max_steps)
    resume: str | bool | None = {"true": True, None: None}.get(a.resume, a.resume)
    trainer.train(resume_from_checkpoint=resume)
    if a.final:
        from safetensors.torch import save_file

        save_file({k: v for k, v in parameters(trainer).items() if k != "lm_head.weight"}, a.final)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
