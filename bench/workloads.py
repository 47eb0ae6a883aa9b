"""The benchmark workloads: live PyTorch models (and optimizers) of the sizes named in issue 5.

Each workload is an ``nn.Module`` plus an optional AdamW optimizer with its state populated, built
deterministically. Every contender saves the same objects; ``flat_tensors`` gives the raw tensors for the
physical limits (memcpy, write+fsync).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Workload:
    name: str
    description: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    extra: dict[str, Any] = field(default_factory=dict)

    def savegame_state(self) -> dict[str, Any]:
        """Live objects, as savegame takes them."""
        state: dict[str, Any] = {"model": self.model}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer
        return state

    def state_dicts(self) -> dict[str, Any]:
        """The usual ``{"model": sd, "optimizer": sd}`` dict of torch.save / DCP."""
        state: dict[str, Any] = {"model": self.model.state_dict()}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def flat_tensors(self) -> list[torch.Tensor]:
        """Every tensor of the state once (what the physical limits copy and write)."""
        out: list[torch.Tensor] = []
        seen: set[int] = set()

        def add(t: torch.Tensor) -> None:
            if t.data_ptr() in seen and t.numel() > 0:
                return
            seen.add(t.data_ptr())
            out.append(t.detach())

        for t in self.model.state_dict().values():
            add(t)
        if self.optimizer is not None:
            opt_state = self.optimizer.state_dict()["state"]
            for pid in sorted(opt_state):  # canonical order: loaders may reorder the dicts
                per_param = opt_state[pid]
                for key in sorted(per_param):
                    if isinstance(per_param[key], torch.Tensor):
                        add(per_param[key])
        return out

    @property
    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.flat_tensors())

    @property
    def n_tensors(self) -> int:
        return len(self.flat_tensors())


# ---------------------------------------------------------------------------------------------------
# Models


class Blob(nn.Module):
    """A bag of parameters (what a big checkpoint looks like to the I/O path)."""

    def __init__(self, shapes: list[tuple[int, ...]]) -> None:
        super().__init__()
        self.params = nn.ParameterList([nn.Parameter(torch.empty(s)) for s in shapes])


class Block(nn.Module):
    def __init__(self, d: int, ff: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, ff)
        self.ff2 = nn.Linear(ff, d)


class TinyGPT(nn.Module):
    """A GPT-shaped parameter layout (no forward needed: the benchmark only moves its state)."""

    def __init__(self, vocab: int, d: int, layers: int, ctx: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList([Block(d, 4 * d) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)


def _fill_random(model: nn.Module) -> None:
    """Non-trivial values, fast: one random block, copied (shifted) into every parameter (nothing in the
    benchmark compresses or deduplicates content, so this is as good as fresh random data per tensor)."""
    params = list(model.parameters())
    if not params:
        return
    block = torch.empty(max(p.numel() for p in params)).uniform_(-0.05, 0.05)
    with torch.no_grad():
        for i, p in enumerate(params):
            flat = p.view(-1)
            flat.copy_(block[: flat.numel()])
            flat.add_(i * 1e-3)


def _adamw_with_state(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW after one step with random gradients: exp_avg, exp_avg_sq and step for every parameter."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def blob(n_tensors: int, total_bytes: int, name: str, description: str) -> Workload:
    per = max(1, total_bytes // n_tensors // 4)
    rows = 512 if per >= 512 * 4 else 1
    shapes = [(rows, max(1, per // rows)) for _ in range(n_tensors)]
    model = Blob(shapes)
    _fill_random(model)
    return Workload(name, description, model, None)


def transformer(vocab: int, d: int, layers: int, ctx: int, name: str) -> Workload:
    model = TinyGPT(vocab, d, layers, ctx)
    _fill_random(model)
    opt = _adamw_with_state(model)
    n = sum(p.numel() for p in model.parameters())
    return Workload(name, f"GPT-like {layers}x{d}, vocab {vocab}, {n / 1e6:.1f}M params + AdamW", model, opt)


def mlp(name: str) -> Workload:
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16))
    _fill_random(model)
    opt = _adamw_with_state(model)
    n = sum(p.numel() for p in model.parameters())
    return Workload(name, f"MLP 64-128-16 ({n} params) + AdamW", model, opt)


# ---------------------------------------------------------------------------------------------------
# Registry: name -> builder(scale, quick)

GiB = 1 << 30
MiB = 1 << 20


def _big(scale: float, quick: bool) -> Workload:
    if quick:
        return blob(40, 4 * MiB, "1gib-400", "quick: 4 MiB in 40 fp32 tensors")
    total = int(GiB * scale)
    return blob(400, total, "1gib-400", f"{total / GiB:.2f} GiB in 400 fp32 tensors")


def _gpt(scale: float, quick: bool) -> Workload:
    if quick:
        return transformer(256, 32, 2, 64, "transformer-adamw")
    layers = max(1, round(12 * scale))
    return transformer(8192, 512, layers, 1024, "transformer-adamw")


def _tiny(scale: float, quick: bool) -> Workload:
    n = 200 if quick else 10_000
    return blob(n, n * 4096, "10k-tiny", f"{n} fp32 tensors of 4 KB")


def _mlp(scale: float, quick: bool) -> Workload:
    return mlp("mlp-10k")


BUILDERS: dict[str, Callable[[float, bool], Workload]] = {
    "1gib-400": _big,
    "transformer-adamw": _gpt,
    "10k-tiny": _tiny,
    "mlp-10k": _mlp,
}

LARGE = ("1gib-400", "transformer-adamw")
"""Workloads on which the throughput, blocking, load and memory targets are judged."""


def build(name: str, *, scale: float = 1.0, quick: bool = False) -> Workload:
    torch.manual_seed(0)
    return BUILDERS[name](scale, quick)
