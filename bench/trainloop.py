"""Training loop with a background full-state checkpoint every K steps (issue 19, item 4).

A GPT-like model trains on random tokens with AdamW on the CPU. Blocks of ``steps`` training steps run
without checkpointing and with ``savegame.Checkpointer(background=True, every_n_steps=K)`` saving the
model, the optimizer and the RNGs, for K = 1, 4, 16, under two save policies:

* ``wait`` (the Checkpointer's default): a save requested while the previous one is still being written
  waits for it to commit;
* ``skip``: ``if_busy="skip"`` coalesces such a request into the save in flight, and
  ``writer_nice=10`` lowers the writer threads' priority;
* ``lazy`` and ``lazy-skip``: the same two with ``snapshot="lazy"``: the model's parameters and the AdamW
  state are copied during the next forward/backward, and only the next ``optimizer.step()`` waits for
  that copy (:mod:`savegame.engine.lazy`);
* ``paced``: ``lazy-skip`` with ``write_rate`` = state bytes / (K x the step time without
  checkpointing): each save's write is spread over the interval until the next one is due
  (:mod:`savegame.engine.pacing`).

The physical floor is measured in the same run (:func:`floors`): the CPU seconds of one background
full-state save with no training running (process CPU time, all threads), and the time to write and
fsync the same number of bytes alone. Per K, the CPU floor is that CPU time / (K x step time x the
cores training uses) -- the overhead no scheduling can avoid when training keeps every core busy --
and the disk ratio is the write time / (K x step time): above 1 the disk cannot keep up with a save
every K steps (a coalescing policy writes at most 1 in that many).

Measured, not only computed: ``burn-kK`` blocks run the same loop with no savegame at all while, every K
steps, a thread spends the save's CPU seconds on memory copies (:func:`_burn_block`); their overhead is
what that much background CPU work costs this loop, whoever does it. ``plain-kK`` blocks are the
simplest background checkpoint there is (:func:`_plain_block`): every K steps the state is copied into
reused buffers on the training thread and a thread writes those bytes to one file and fsyncs it, no
format, no hashes, no manifest: what writing this state every K steps costs this machine (the kernel's
page-cache and writeback work included, which a process's CPU seconds do not show).

The blocks of all modes are interleaved (rotated every repetition) in one process; the result of a
mode is the median over its blocks of the mean step time, reported as a ratio to the median of the
blocks without checkpointing (the overhead), with the machine's load average, and for ``skip`` the
saves actually written per block.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

KS = (1, 4, 16)
POLICIES = {
    "wait": {},
    "skip": {"if_busy": "skip", "writer_nice": 10},
    "lazy": {"snapshot": "lazy"},
    "lazy-skip": {"snapshot": "lazy", "if_busy": "skip", "writer_nice": 10},
    "paced": {"snapshot": "lazy", "if_busy": "skip", "writer_nice": 10},  # + write_rate per K: see paced_rates
}
FLOORS = ("burn", "plain")
"""The measured floors' modes (no savegame): :func:`_burn_block`, :func:`_plain_block`."""
COALESCING = ("skip", "lazy-skip", "paced")
"""The policies whose saves may be coalesced (saves written per block shown)."""
BATCH, SEQ = 4, 64
REFERENCE = {"d": 512, "layers": 6, "vocab": 8192}
"""Scale 1: ~27M parameters, ~313 MiB of model + AdamW state (the issue's reference)."""


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.ff(self.ln2(x))


class TrainGPT(nn.Module):
    """A small causal transformer language model (what a training step runs)."""

    def __init__(self, vocab: int, d: int, layers: int, ctx: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList([_Block(d, max(1, d // 64)) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t))
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        for block in self.blocks:
            x = block(x, mask)
        out: torch.Tensor = self.head(self.ln_f(x))
        return out


def model_config(scale: float, quick: bool) -> dict[str, int]:
    """Width scaled by sqrt(scale) (parameters by ~scale), depth and tokens per step kept."""
    if quick:
        return {"d": 32, "layers": 1, "vocab": 256}
    d = max(32, round(REFERENCE["d"] * math.sqrt(scale) / 32) * 32)
    return {"d": d, "layers": REFERENCE["layers"], "vocab": 16 * d}


class Trainer:
    def __init__(self, cfg: dict[str, int]) -> None:
        torch.manual_seed(0)
        self.vocab = cfg["vocab"]
        self.model = TrainGPT(cfg["vocab"], cfg["d"], cfg["layers"], SEQ)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.loss = nn.CrossEntropyLoss()
        self.step()  # AdamW state exists from here on

    def step(self) -> None:
        idx = torch.randint(0, self.vocab, (BATCH, SEQ + 1))
        logits = self.model(idx[:, :-1])
        loss = self.loss(logits.reshape(-1, self.vocab), idx[:, 1:].reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor of the model's and the optimizer's state (what a full-state checkpoint holds)."""
        out = [t.detach() for t in self.model.state_dict().values()]
        for per_param in self.opt.state.values():
            out += [v for v in per_param.values() if isinstance(v, torch.Tensor)]
        return out

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_tensors())


def _block(
    trainer: Trainer, mode: str, steps: int, tmp: str, rates: dict[int, float] | None = None,
    burn_seconds: float | None = None,
) -> tuple[float, int, list[float]]:
    """Mean step time of ``steps`` steps in ``mode``, the number of saves written and how long each
    ``ckpt.step`` call that saved blocked (seconds). ``burn-kK`` modes: see :func:`_burn_block`,
    ``plain-kK``: :func:`_plain_block`."""
    import savegame

    if mode == "none":
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        return (time.perf_counter() - t0) / steps, 0, []
    policy, k = mode.rsplit("-k", 1)
    if policy == "burn":
        return _burn_block(trainer, int(k), steps, burn_seconds or 0.0)
    if policy == "plain":
        return _plain_block(trainer, int(k), steps, tmp)
    d = os.path.join(tmp, f"trainloop-{mode}")
    shutil.rmtree(d, ignore_errors=True)
    extra: dict[str, Any] = dict(POLICIES[policy])
    if policy == "paced" and rates:
        extra["write_rate"] = rates[int(k)]
    ckpt = savegame.Checkpointer(d, every_n_steps=int(k), background=True, keep_last=2, quiet=True, **extra)
    state = {"model": trainer.model, "optimizer": trainer.opt}
    written = 0
    calls: list[float] = []
    try:
        ckpt.save(state, step=0)  # not timed: a long-lived Checkpointer's first-save costs (index, lock, writer)
        ckpt.wait()
        t0 = time.perf_counter()
        for i in range(1, steps + 1):
            trainer.step()
            c0 = time.perf_counter()
            result = ckpt.step(state, step=i, epoch_end=False)
            if result is not None and not result.skipped:
                written += 1
                calls.append(time.perf_counter() - c0)
        elapsed = time.perf_counter() - t0
    finally:
        ckpt.close()  # not timed: the last write must not spill into the next block
        shutil.rmtree(d, ignore_errors=True)
    return elapsed / steps, written, calls


def _burn(cpu_seconds: float, src: Any, dst: Any) -> None:
    """Memory copies (NumPy, GIL released) until this thread has used ``cpu_seconds`` of CPU."""
    import numpy as np

    end = time.thread_time() + cpu_seconds
    while time.thread_time() < end:
        np.copyto(dst, src)


def _every_k_in_thread(
    trainer: Trainer, k: int, steps: int, start: Callable[[int], Callable[[], None]]
) -> tuple[float, int, list[float]]:
    """``steps`` training steps; after every ``k``-th step ``i``, once the previous thread finished (as
    the ``wait`` policy waits for the save in flight), ``start(i)`` runs on the training thread and the
    function it returns runs on a new thread. The mean step time, the threads started, no call times."""
    worker: threading.Thread | None = None
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        trainer.step()
        if i % k == 0:
            if worker is not None:
                worker.join()
            worker = threading.Thread(target=start(i), daemon=True)
            worker.start()
    elapsed = time.perf_counter() - t0
    if worker is not None:
        worker.join()  # not timed, as a Checkpointer's close() is not
    return elapsed / steps, steps // k, []


def _burn_block(trainer: Trainer, k: int, steps: int, cpu_seconds: float) -> tuple[float, int, list[float]]:
    """No savegame, no disk: every ``k`` steps a thread starts (after the previous one finished, as the
    ``wait`` policy does) that spends ``cpu_seconds`` of CPU on memory copies, the CPU a background save
    takes (:func:`floors`). The overhead it causes is what that much background CPU work costs this
    training loop, whoever does it: the measured floor of a background save every ``k`` steps."""
    import numpy as np

    src = np.ones(32 << 20, dtype=np.uint8)
    dst = np.empty_like(src)
    return _every_k_in_thread(trainer, k, steps, lambda i: functools.partial(_burn, cpu_seconds, src, dst))


def _write_fsync(path: str, buffers: list[torch.Tensor]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for b in buffers:
            os.write(fd, b.reshape(-1).numpy().data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain_block(trainer: Trainer, k: int, steps: int, tmp: str) -> tuple[float, int, list[float]]:
    """No savegame: every ``k`` steps the state is copied into reused buffers on the training thread,
    then a thread (started after the previous one finished, as the ``wait`` policy does) writes the copy
    to one file and fsyncs it (two files in turn, as ``keep_last=2`` keeps two checkpoints). The
    overhead is what the bytes of a checkpoint every ``k`` steps cost this loop with nothing else done:
    no format, hashes or manifest."""
    buffers = [torch.empty_like(t) for t in trainer.state_tensors()]
    paths = [os.path.join(tmp, f"trainloop-plain-{n}") for n in range(2)]

    def start(i: int) -> Callable[[], None]:
        for b, t in zip(buffers, trainer.state_tensors()):
            b.copy_(t)
        return functools.partial(_write_fsync, paths[i // k % 2], buffers)

    try:
        return _every_k_in_thread(trainer, k, steps, start)
    finally:
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def floors(trainer: Trainer, tmp: str, *, reps: int = 3) -> dict[str, Any]:
    """The CPU seconds of one background full-state save with no training running, and the seconds
    to write + fsync the same bytes alone (medians of ``reps``)."""
    import numpy as np

    import savegame

    d = os.path.join(tmp, "trainloop-floor")
    shutil.rmtree(d, ignore_errors=True)
    state = {"model": trainer.model, "optimizer": trainer.opt}
    cpu: list[float] = []
    wall: list[float] = []
    with savegame.Checkpointer(d, background=True, keep_last=1, quiet=True) as ckpt:
        ckpt.save(state, step=0)
        ckpt.wait()
        for i in range(1, reps + 1):
            c0, w0 = time.process_time(), time.perf_counter()
            ckpt.save(state, step=i)
            ckpt.wait()
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    shutil.rmtree(d, ignore_errors=True)
    nbytes = trainer.state_bytes()
    buf = memoryview(np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8))
    disk: list[float] = []
    path = os.path.join(tmp, "trainloop-disk")
    for _ in range(reps):
        w0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for start in range(0, nbytes, 64 << 20):
                os.write(fd, buf[start : start + (64 << 20)])
            os.fsync(fd)
        finally:
            os.close(fd)
        disk.append(time.perf_counter() - w0)
        os.unlink(path)
    return {"save_cpu_seconds": statistics.median(cpu), "save_wall_seconds": statistics.median(wall),
            "disk_seconds": statistics.median(disk), "bytes": nbytes,
            "cores": min(torch.get_num_threads(), os.cpu_count() or 1)}


def floor_per_k(fl: dict[str, Any], step: float) -> dict[int, dict[str, float]]:
    """Per K: the CPU floor (fraction of the training's CPU time a save every K steps takes) and the
    disk ratio (write time / interval; > 1: the disk cannot keep up)."""
    return {k: {"cpu": fl["save_cpu_seconds"] / (k * step * fl["cores"]), "disk": fl["disk_seconds"] / (k * step)}
            for k in KS}


def run(*, tmp: str, scale: float, quick: bool, reps: int, steps: int, log: Any) -> dict[str, Any]:
    """All modes, interleaved; returns medians, ratios to ``none`` and the raw samples."""
    cfg = model_config(scale, quick)
    trainer = Trainer(cfg)
    params = sum(p.numel() for p in trainer.model.parameters())
    modes = ["none"] + [f"{p}-k{k}" for p in POLICIES for k in KS] + [f"{f}-k{k}" for f in FLOORS for k in KS]
    samples: dict[str, list[float]] = {m: [] for m in modes}
    written: dict[str, list[int]] = {m: [] for m in modes}
    calls: dict[str, list[float]] = {m: [] for m in modes if m.split("-k")[0] in POLICIES}
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    warm, _, _ = _block(trainer, "none", max(2, steps // 4), tmp)  # warm-up: allocator, threads
    fl = floors(trainer, tmp)  # first: the burn blocks spend the CPU it measures
    state_bytes = trainer.state_bytes()
    rates = {k: state_bytes / (k * warm) / 1e6 for k in KS}  # MB/s: one save spread over K steps
    for rep in range(reps):
        order = modes[rep % len(modes):] + modes[: rep % len(modes)]
        for mode in order:
            mean, n, blocked = _block(trainer, mode, steps, tmp, rates, fl["save_cpu_seconds"])
            samples[mode].append(mean)
            written[mode].append(n)
            if mode in calls:
                calls[mode] += blocked
        log(f"  trainloop rep {rep + 1}/{reps} done ({time.perf_counter() - t0:.0f} s)")
    median = {m: statistics.median(v) for m, v in samples.items()}
    base = median["none"]
    return {
        "floors": {**fl, "per_k": {str(k): v for k, v in floor_per_k(fl, base).items()}},
        "write_rate_mb_s": {str(k): v for k, v in rates.items()},
        "description": (f"GPT-like {cfg['layers']}x{cfg['d']}, vocab {cfg['vocab']}, {params / 1e6:.1f}M params "
                        f"+ AdamW, batch {BATCH}x{SEQ} tokens"),
        "config": {**cfg, "scale": scale, "quick": quick, "reps": reps, "steps_per_block": steps,
                   "policies": {k: dict(v) for k, v in POLICIES.items()}},
        "state_bytes": trainer.state_bytes(),
        "params": params,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "seconds": round(time.perf_counter() - t0, 1),
        "samples": samples,
        "saves_written": written,
        "save_call_seconds": {m: statistics.median(v) if v else None for m, v in calls.items()},
        "median_step_seconds": median,
        "overhead": {m: median[m] / base - 1.0 for m in modes if m != "none"},
    }


def markdown(tl: dict[str, Any]) -> list[str]:
    """The report section: one row per K, the overhead of each policy."""
    cfg = tl["config"]
    lb, la = tl["loadavg_before"], tl["loadavg_after"]
    lines = [
        "## Training loop: background checkpoint every K steps",
        "",
        f"{tl['description']}; state {tl['state_bytes'] / 2**20:.0f} MiB; {cfg['reps']} interleaved blocks of "
        f"{cfg['steps_per_block']} steps per mode (scale {cfg['scale']:g}{', quick' if cfg['quick'] else ''}); "
        f"load average {lb[0]:.1f} before, {la[0]:.1f} after. Overhead = median block step time / median "
        f"without checkpointing - 1. `wait`: the default (the next save waits for the one in flight); "
        f"`skip`: `if_busy=\"skip\", writer_nice=10` (saves requested while one is written are coalesced "
        f"into it: saves written per block shown); `lazy`, `lazy-skip`: the same with `snapshot=\"lazy\"` "
        f"(parameters and optimizer state copied during the next forward/backward, the next "
        f"`optimizer.step()` waits for the copy); `paced`: `lazy-skip` with `write_rate` = state / (K x step "
        f"time) (each save's write spread over the interval until the next is due).",
        "",
        f"Step time without checkpointing: {tl['median_step_seconds']['none'] * 1000:.1f} ms (median)"
        + (f"; its blocks varied by ±{noise * 100:.1f}% (half their range), so overheads within that are noise."
           if (noise := baseline_noise(tl)) is not None else "."),
        "",
    ]
    policies = [p for p in POLICIES if any(m.startswith(f"{p}-k") for m in tl["overhead"])]
    coalescing = [p for p in COALESCING if p in policies]
    lines.append("| every K steps | " + " | ".join(f"overhead, {p}" for p in policies) + " | "
                 + " | ".join(f"saves written per block, {p}" for p in coalescing) + " |")
    lines.append("|---:|" + "---:|" * (len(policies) + len(coalescing)))
    for k in KS:
        cells = [_pct(tl["overhead"].get(f"{p}-k{k}")) for p in policies]
        for p in coalescing:
            n = tl["saves_written"].get(f"{p}-k{k}", [])
            cells.append(f"{statistics.median(n) if n else '—'} of {cfg['steps_per_block'] // k}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    fl = tl.get("floors")
    if fl:
        lines += ["", f"Physical floor, measured in the same run: one background full-state save with no training "
                  f"takes {fl['save_cpu_seconds']:.3f} CPU s ({fl['save_wall_seconds']:.3f} s wall); writing + "
                  f"fsyncing its {fl['bytes'] / 2**20:.0f} MiB alone takes {fl['disk_seconds']:.3f} s "
                  f"({fl['bytes'] / fl['disk_seconds'] / 1e6:.0f} MB/s); training uses {fl['cores']} core(s). "
                  "CPU floor = save CPU / (K x step time x cores): the overhead that remains when training keeps "
                  "every core busy, whatever the scheduling. Disk = write time / (K x step time): above 1 the disk "
                  "cannot keep up with a save every K steps (a coalescing policy writes at most 1 in that many).",
                  "", "Measured floor: blocks in which, every K steps, a thread (no savegame, no disk) spends the "
                  "same CPU seconds on memory copies, after the previous one finished: what that much "
                  "background CPU work costs this loop, whoever does it (training's intra-op threads wait for "
                  "each other, so CPU taken from one core delays the whole step). Plain write: blocks in which, "
                  "every K steps, the state is copied into reused buffers and a thread writes the copy to one "
                  "file and fsyncs it (no savegame: no format, hashes or manifest): what the bytes of a "
                  "checkpoint every K steps cost this loop, the kernel's page-cache and writeback work included.",
                  "", "| every K steps | CPU floor | measured floor (same CPU in a thread) | plain write "
                  "(copy + write + fsync in a thread) | disk time / interval | paced write_rate (MB/s) |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for k in KS:
            f = fl["per_k"][str(k)]
            rate = tl.get("write_rate_mb_s", {}).get(str(k))
            lines.append(f"| {k} | {_pct(f['cpu'])} | {_pct(tl['overhead'].get(f'burn-k{k}'))} | "
                         f"{_pct(tl['overhead'].get(f'plain-k{k}'))} | {f['disk']:.2f}"
                         f"{' (cannot keep up)' if f['disk'] > 1 else ''} | "
                         f"{'—' if rate is None else f'{rate:.0f}'} |")
    blocked = tl.get("save_call_seconds")
    if blocked:
        lines += ["", "Median time a `ckpt.step` call that saved blocked the loop (ms; for `wait` policies it "
                  "includes waiting for the previous save; for `lazy` ones the copy of parameters and "
                  "optimizer state is not in it: the next `optimizer.step()` waits for it instead):", "",
                  "| every K steps | " + " | ".join(policies) + " |", "|---:|" + "---:|" * len(policies)]
        for k in KS:
            vals = [blocked.get(f"{p}-k{k}") for p in policies]
            lines.append(f"| {k} | " + " | ".join("—" if v is None else f"{v * 1000:.1f}" for v in vals) + " |")
    lines.append("")
    return lines


def baseline_noise(tl: dict[str, Any]) -> float | None:
    """How much the blocks without checkpointing varied in this run: half their range over their median
    (None with fewer than two blocks). An overhead smaller than this cannot be told from noise."""
    blocks = tl.get("samples", {}).get("none") or []
    if len(blocks) < 2:
        return None
    mid = statistics.median(blocks)
    return (max(blocks) - min(blocks)) / 2 / mid if mid > 0 else None


def floor_note(tl: dict[str, Any], k: int) -> str:
    """The floor of every-K saving, for a target's row: "floor: CPU +X%, disk keeps up / 1 in N"."""
    fl = tl.get("floors")
    if not fl:
        return ""
    f = fl["per_k"][str(k)]
    disk = "disk keeps up" if f["disk"] <= 1 else f"disk writes at most 1 in {math.ceil(f['disk'])}"
    burn = tl.get("overhead", {}).get(f"burn-k{k}")
    measured = f", measured {_pct(burn)} for the same CPU work in a thread" if burn is not None else ""
    plain = tl.get("overhead", {}).get(f"plain-k{k}")
    written = f", {_pct(plain)} for a plain copy + write + fsync of the state in a thread" if plain is not None else ""
    return f" (floor: CPU {_pct(f['cpu'])}{measured}{written}, {disk})"


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v * 100:+.1f}%"
