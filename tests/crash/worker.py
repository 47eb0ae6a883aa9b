"""Child processes of the reliability tests: real processes, real files, killed for real.

    python tests/crash/worker.py serve            a fork server: imports torch once, then forks one
                                                  training child per JSON config read on stdin
    python tests/crash/worker.py train CONFIG     one training child (the same code, without forking)
    python tests/crash/worker.py write-loop ROOT N [MODE]     numpy saves for the reader-poll tests
    python tests/crash/worker.py preempt ROOT ACTION MODE     a torch loop with a PreemptionHandler
    python tests/crash/worker.py ckpt-preempt ROOT ACTION MODE sync|background
                                                              the same with Checkpointer(save_on_signal=True)
    python tests/crash/worker.py hold-checkpointer ROOT       a Checkpointer holding ROOT's writer lock
    python tests/crash/worker.py hold-lock ROOT [fork]        take a WriterLock and sleep

The training child trains a small torch model and saves it over and over with ``savegame.save`` (sync,
or ``background=True``), logging every save to an append-only event log (see ``common.py``): the digest
of the state *before* the save starts and a commit line *after* it returns. Every storage system call
goes through :class:`PhaseOps`, which records the call in progress in a shared byte (so the parent can
tell where its SIGKILL landed) and can sleep a little before each call (so kills land in every step).

Why a fork server: importing torch takes ~1.5 s; forking a child from a process that has it imported
takes ~5 ms, so a trial costs what the training until the kill costs.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import sys
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

PHASES = ("train", "mkdir", "open", "write", "fsync", "close", "fsync_dir", "rename", "exchange", "rmtree", "link")
"""Codes of the phase byte: 0 when no storage call is in progress, else the call."""

MAIN_PHASES = ("resume", "train", "save", "delete", "done")


class Phase:
    """Two bytes in a shared file: [0] the main loop's phase, [1] the storage call in progress."""

    def __init__(self, path: str | None) -> None:
        self._map: mmap.mmap | None = None
        if path:
            fd = os.open(path, os.O_RDWR)
            try:
                self._map = mmap.mmap(fd, 16)
            finally:
                os.close(fd)

    def main(self, name: str) -> None:
        if self._map is not None:
            self._map[0] = MAIN_PHASES.index(name)

    def op(self, code: int) -> None:
        if self._map is not None:
            self._map[1] = code


def make_phase_ops(phase: Phase, *, slow: float, exchange: bool, seed: int) -> Any:
    from savegame.storage.local import FileOps

    rng = random.Random(seed)

    class PhaseOps(FileOps):
        """Real system calls; marks the call in progress and optionally sleeps before each one."""

        def _enter(self, name: str) -> None:
            if slow:
                time.sleep(rng.uniform(0, slow))
            phase.op(PHASES.index(name))

        def open_new(self, path: str) -> int:
            self._enter("open")
            try:
                return super().open_new(path)
            finally:
                phase.op(0)

        def write(self, fd: int, data: memoryview) -> int:
            self._enter("write")
            try:
                return super().write(fd, data)
            finally:
                phase.op(0)

        def fsync(self, fd: int) -> None:
            self._enter("fsync")
            try:
                super().fsync(fd)
            finally:
                phase.op(0)

        def close(self, fd: int) -> None:
            self._enter("close")
            try:
                super().close(fd)
            finally:
                phase.op(0)

        def link(self, src: str, dst: str) -> None:
            self._enter("link")
            try:
                super().link(src, dst)
            finally:
                phase.op(0)

        def mkdir(self, path: str) -> None:
            self._enter("mkdir")
            try:
                super().mkdir(path)
            finally:
                phase.op(0)

        def rename(self, src: str, dst: str) -> None:
            self._enter("rename")
            try:
                super().rename(src, dst)
            finally:
                phase.op(0)

        def exchange(self, a: str, b: str) -> bool:
            if not exchange:
                return False  # as on kernels or filesystems without renameat2(RENAME_EXCHANGE)
            self._enter("exchange")
            try:
                return super().exchange(a, b)
            finally:
                phase.op(0)

        def fsync_dir(self, path: str) -> None:
            self._enter("fsync_dir")
            try:
                super().fsync_dir(path)
            finally:
                phase.op(0)

        def rmtree(self, path: str) -> None:
            self._enter("rmtree")
            try:
                super().rmtree(path)
            finally:
                phase.op(0)

    return PhaseOps()


# ---------------------------------------------------------------------------------------------------
# The training child


def train(cfg: dict[str, Any]) -> None:
    """Train and save until killed (or ``max_saves`` saves). See the module docstring."""
    import numpy as np
    import torch

    import savegame
    from crash.common import EventLog, digest
    from savegame.storage.local import LocalStorage
    from savegame.storage.local import ops as local_ops

    torch.set_num_threads(1)
    root, naming, background = cfg["root"], cfg["naming"], cfg["background"]
    rng = random.Random(cfg["seed"])
    phase = Phase(cfg.get("phase"))
    phase.main("resume")
    local_ops.DEFAULT_OPS = make_phase_ops(phase, slow=cfg.get("slow", 0.0), exchange=cfg.get("exchange", True),
                                           seed=cfg["seed"])  # fmt: skip
    if cfg.get("broken") == "publish-early":
        from crash.broken import install_publish_early

        install_publish_early()
    log = EventLog(cfg["log"])
    storage = LocalStorage(root)
    storage.cleanup()  # what every new writer does first

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 10))  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    buffer = np.zeros(1 << 20, dtype=np.float32)  # 4 MiB of extra state: saves take a while
    incremental = bool(cfg.get("incremental"))  # each save links the unchanged "frozen" array from the last one
    frozen = np.arange(1 << 20, dtype=np.float32)
    step = 0
    names = storage.committed()
    resume_from = "last" if naming == "overwrite" and "last" in names else (names[-1] if names else None)
    if resume_from is not None:
        saved = savegame.load(os.path.join(root, resume_from))
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        buffer[:] = saved["buffer"]
        step = int(saved["step"])
    log.event("R", step, resume_from or "-")

    pending: Any = None
    pending_name = ""
    for _ in range(cfg.get("max_saves", 10**9)):
        phase.main("train")
        for _ in range(cfg.get("steps_per_save", 3)):
            gen = torch.Generator().manual_seed(step)
            x = torch.randn(32, 64, generator=gen)
            y = torch.randint(0, 10, (32,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            buffer += 1.0
            step += 1
        name = "last" if naming == "overwrite" else f"step-{step:08d}"
        state = {"model": model, "optimizer": opt, "buffer": buffer, "step": step}
        extra = {"frozen": frozen} if incremental else {}
        state.update(extra)
        committed = storage.committed()
        base = os.path.join(root, committed[-1]) if incremental and committed else None
        phase.main("save")
        if background and pending is not None:
            pending.result()
            log.event("C", pending_name)
            _rotate(storage, log, phase, naming, cfg)
        log.event("S", name, digest({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                     "buffer": buffer, "step": step, **extra}))  # fmt: skip
        if background:
            pending = savegame.save(os.path.join(root, name), state, background=True, base=base)
            pending_name = name
        else:
            savegame.save(os.path.join(root, name), state, base=base)
            log.event("C", name)
            _rotate(storage, log, phase, naming, cfg)
        if cfg.get("pause"):
            time.sleep(rng.uniform(0, cfg["pause"]))
    if pending is not None:
        pending.result()
        log.event("C", pending_name)
    phase.main("done")
    log.close()


def _rotate(storage: Any, log: Any, phase: Phase, naming: str, cfg: dict[str, Any]) -> None:
    """Keep the ``keep`` newest named checkpoints (retention, as a Checkpointer would)."""
    if naming != "named":
        return
    names = storage.committed()
    keep = cfg.get("keep", 3)
    for old in names[: max(0, len(names) - keep)]:
        phase.main("delete")
        log.event("D", old)
        storage.delete(old)


def serve() -> None:
    """Fork server: read one JSON config per line, fork a training child, report its pid and status."""
    import shutil
    import tempfile

    import torch

    import savegame.engine.background

    # Warm up once (torch imports dynamo, sympy... at the first optimizer step; savegame its adapters
    # at the first save), with one intra-op thread so no thread pool exists when we fork.
    torch.set_num_threads(1)
    warm = tempfile.mkdtemp(prefix="savegame-warmup-")
    try:
        for background in (False, True):
            train({"root": os.path.join(warm, str(background)), "log": os.path.join(warm, "log"),
                   "naming": "named", "background": background, "seed": 0, "max_saves": 2})  # fmt: skip
    finally:
        shutil.rmtree(warm, ignore_errors=True)
    savegame.engine.background._default_writer = None
    out = sys.stdout
    out.write(json.dumps({"ready": os.getpid()}) + "\n")
    out.flush()
    for line in sys.stdin:
        cfg = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                devnull = os.open(os.devnull, os.O_RDWR)
                os.dup2(devnull, 0)
                os.dup2(devnull, 1)
                err = os.open(cfg["log"] + ".err", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(err, 2)
                random.seed(cfg["seed"])
                train(cfg)
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
                code = 1
            os._exit(code)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        out.write(json.dumps({"pid": pid, "status": status}) + "\n")
        out.flush()


# ---------------------------------------------------------------------------------------------------
# Other children


def write_loop(root: str, count: int, mode: str) -> None:
    """Save ``count`` self-describing numpy checkpoints, for the reader-poll tests.

    ``mode``: ``named`` (``ckpt-NNNNNN``, keeping the 5 newest), ``overwrite`` (always ``last``), or
    ``publish-early`` (named, through the broken protocol of ``broken.py``).
    """
    import numpy as np

    import savegame
    from savegame.storage.local import LocalStorage

    if mode == "publish-early":
        from crash.broken import install_publish_early

        install_publish_early()
    storage = LocalStorage(root)
    for i in range(count):
        a = np.full(200_000, i, dtype=np.int64)
        name = "last" if mode == "overwrite" else f"ckpt-{i:06d}"
        savegame.save(os.path.join(root, name), {"step": i, "a": a, "b": {"c": a[:1000] * 2}})
        if mode != "overwrite":
            names = storage.committed()
            for old in names[: max(0, len(names) - 5)]:
                storage.delete(old)
    print("done", flush=True)


def preempt(root: str, action: str, mode: str) -> None:
    """A torch training loop that saves on SIGTERM/SIGUSR1 and exits as ``action`` says.

    ``mode``: ``safe-point`` (save after the current step) or ``immediate`` (the loop spends its time
    "waiting for data" in ``between_steps``, where a signal saves at once).
    """
    import torch

    import savegame
    from savegame.run.signals import PreemptionHandler

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = 0

    def save(signum: int) -> None:
        path = os.path.join(root, f"preempted-step-{step:06d}")
        savegame.save(path, {"model": model, "optimizer": opt, "step": step}, metadata={"signal": signum})
        print(f"saved {path}", flush=True)

    with PreemptionHandler(action=action, on_preempt=save) as handler:  # type: ignore[arg-type]
        while True:
            if mode == "immediate" and step > 0:
                with handler.between_steps():
                    time.sleep(60)  # "waiting for the next batch": a signal here saves at once
            x = torch.randn(16, 32)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if mode != "immediate":
                time.sleep(0.01)
            print(f"step {step}", flush=True)
            if handler.safe_point():
                print("continuing", flush=True)


def ckpt_preempt(root: str, action: str, mode: str, background: bool) -> None:
    """The same loop as :func:`preempt`, with ``Checkpointer(save_on_signal=True)`` doing the work."""
    import torch

    import savegame
    from savegame.policies import Never

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = 0
    ckpt = savegame.Checkpointer(
        root, save=Never(), name="preempted-step-{step:06d}", save_on_signal=True, signal_action=action,  # type: ignore[arg-type]
        background=background,
    )  # fmt: skip
    with ckpt:
        while True:
            if mode == "immediate" and step > 0:
                with ckpt.between_steps({"model": model, "optimizer": opt, "step": step}, step=step):
                    time.sleep(60)  # "waiting for the next batch": a signal here saves at once
            x = torch.randn(16, 32)
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if mode != "immediate":
                time.sleep(0.01)
            print(f"step {step}", flush=True)
            result = ckpt.step({"model": model, "optimizer": opt, "step": step}, step=step, epoch_end=False)
            if result is not None:
                print(f"saved {result.path}", flush=True)
            if ckpt.preempted:
                print("continuing", flush=True)
                ckpt.preempted = None


def hold_checkpointer(root: str) -> None:
    """Hold a Checkpointer on ``root`` (and with it the writer lock) and sleep."""
    import savegame

    ckpt = savegame.Checkpointer(root)
    print("locked", os.getpid(), flush=True)
    time.sleep(60)
    ckpt.close()


def hold_lock(root: str, fork: bool) -> None:
    """Take the writer lock of ``root``, optionally fork a long-lived child, and sleep."""
    from savegame.run.lock import WriterLock

    WriterLock(root).acquire()
    if fork and os.fork() == 0:
        time.sleep(60)
        os._exit(0)
    print("locked", os.getpid(), flush=True)
    time.sleep(60)


def main(argv: list[str]) -> None:
    cmd = argv[0]
    if cmd == "serve":
        serve()
    elif cmd == "train":
        train(json.loads(argv[1]))
    elif cmd == "write-loop":
        write_loop(argv[1], int(argv[2]), argv[3] if len(argv) > 3 else "named")
    elif cmd == "preempt":
        preempt(argv[1], argv[2], argv[3])
    elif cmd == "ckpt-preempt":
        ckpt_preempt(argv[1], argv[2], argv[3], argv[4] == "background")
    elif cmd == "hold-checkpointer":
        hold_checkpointer(argv[1])
    elif cmd == "hold-lock":
        hold_lock(argv[1], len(argv) > 2 and argv[2] == "fork")
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
