"""Lazy snapshots (``snapshot="lazy"``): parameters and optimizer state are copied during the next
forward/backward and only the next ``optimizer.step()`` waits for them (:mod:`savegame.engine.lazy`).

The deferred copies are held back by a gate on the snapshot worker's copy function, so the step is made
while the copy is pending (no sleeps, no timed assertions).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import savegame
from savegame.engine import lazy as engine_lazy
from savegame.engine.writer import encode_state
from savegame.errors import BackgroundSaveError, ConfigError, TornSnapshotError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """While the event is clear, the snapshot worker waits before each deferred (lazy) copy batch."""
    event = threading.Event()
    real = engine_lazy._copy_batch

    def gated(batch: Any) -> None:
        assert event.wait(60), "test gate never opened"
        real(batch)

    monkeypatch.setattr(engine_lazy, "_copy_batch", gated)
    yield event
    event.set()


def _model() -> nn.Module:
    """Parameters over the small-tensor limit (64 KB) go through the copy queue, so they are deferred;
    the BatchNorm's running stats (80 KB each) too, but they are buffers (they change in forward): eager."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 20480),
                         nn.BatchNorm1d(20480))  # fmt: skip


def _train(model: nn.Module, optimizers: list[torch.optim.Optimizer], x: torch.Tensor) -> None:
    for opt in optimizers:
        opt.zero_grad()
    model(x).square().mean().backward()
    for opt in optimizers:
        opt.step()


def _forward_backward(model: nn.Module, optimizers: list[torch.optim.Optimizer], x: torch.Tensor) -> None:
    for opt in optimizers:
        opt.zero_grad()
    model(x).square().mean().backward()  # BatchNorm's running stats change here


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return obj


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(map(str, a)) == set(map(str, b)) and all(
            _equal(v, b[k] if k in b else b[str(k)]) for k, v in a.items())
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _hooks(opt: torch.optim.Optimizer) -> int:
    return len(opt._optimizer_step_pre_hooks)


def _setup() -> tuple[nn.Module, list[torch.optim.Optimizer], dict[str, Any], torch.Tensor]:
    model = _model()
    head = list(model.parameters())
    opt_a = torch.optim.AdamW(head[:2], lr=1e-2)
    opt_b = torch.optim.SGD(head[2:], lr=1e-2, momentum=0.9)
    x = torch.randn(16, 128)
    _train(model, [opt_a, opt_b], x)  # the optimizers have state (moments, momentum buffers)
    state = {"model": model, "adamw": opt_a, "sgd": opt_b, "epoch": 3}
    return model, [opt_a, opt_b], state, x


def _expected(state: dict[str, Any]) -> dict[str, Any]:
    return {"model": _clone(state["model"].state_dict()), "adamw": _clone(state["adamw"].state_dict()),
            "sgd": _clone(state["sgd"].state_dict()), "epoch": state["epoch"]}


def test_the_next_step_waits_for_the_copy_and_the_snapshot_is_never_torn(
    tmp_path: Path, gate: threading.Event
) -> None:
    model, opts, state, x = _setup()
    expected = _expected(state)
    handle = savegame.save(tmp_path / "c", state, background=True, snapshot="lazy")
    assert all(_hooks(o) == 1 for o in opts)
    _forward_backward(model, opts, x)  # runs while the copy is pending; buffers were captured already

    stepped = threading.Event()

    def step() -> None:
        for opt in opts:
            opt.step()
        stepped.set()

    worker = threading.Thread(target=step)
    worker.start()
    # The step must wait for the gated copy. (Without the hook it would run now; giving it time to do so
    # only makes this test stricter, it cannot make it fail when the hook works.)
    stepped.wait(1.0)
    assert not stepped.is_set()
    gate.set()
    worker.join(60)
    assert stepped.is_set()
    handle.result()
    loaded = savegame.load(tmp_path / "c")
    assert _equal(expected["model"], loaded["model"])  # parameters and the BatchNorm stats as of save()
    assert _equal(expected["adamw"], loaded["adamw"]) and _equal(expected["sgd"], loaded["sgd"])
    assert loaded["epoch"] == 3
    assert not torch.equal(model[0].weight, expected["model"]["0.weight"])  # the live model moved on
    assert all(_hooks(o) == 0 for o in opts)


def test_without_the_step_hook_the_version_check_still_refuses_the_torn_copy(
    tmp_path: Path, gate: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hook removed (what the test above guards against): the step changes the tensors while their
    copy is pending; the version counters see it and the save is not committed."""

    class NoHook:
        def remove(self) -> None:
            pass

    monkeypatch.setattr(torch.optim.Optimizer, "register_step_pre_hook", lambda self, hook: NoHook())
    model, opts, state, x = _setup()
    handle = savegame.save(tmp_path / "c", state, background=True, snapshot="lazy")
    _train(model, opts, x)
    gate.set()
    with pytest.raises(TornSnapshotError, match=r"model\.\d\.(weight|bias)"):
        handle.result()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # written, then aborted: no staging data left


def test_an_in_place_change_outside_step_fails_the_save_at_the_next_step(
    tmp_path: Path, gate: threading.Event
) -> None:
    model, opts, state, _ = _setup()
    ckpt = savegame.Checkpointer(tmp_path, background=True, snapshot="lazy", rng=False)
    ckpt.save(state, step=1)
    with torch.no_grad():
        model[4].weight.mul_(2.0)  # counted by the version counter; the copy may be torn
    gate.set()
    before = model[4].weight.detach().clone()
    with pytest.raises(TornSnapshotError, match=r"model\.4\.weight.*snapshot='eager'"):
        opts[1].step()
    assert torch.equal(model[4].weight, before)  # the step did not run
    assert all(_hooks(o) == 0 for o in opts)
    ckpt.close()  # delivered by the step: not raised again
    assert savegame.Checkpointer(tmp_path).list() == []
    assert not [p.name for p in tmp_path.iterdir() if "staging" in p.name]


def test_the_final_save_is_eager_so_loading_the_best_weights_afterwards_keeps_it(
    tmp_path: Path, gate: threading.Event
) -> None:
    """No ``optimizer.step()`` follows the final save, and the end of a run often changes the model in place
    (loading the best weights back): under a lazy snapshot that failed the last checkpoint at close()."""
    model, opts, state, _ = _setup()
    best = _clone(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    expected = _expected(state)
    ckpt = savegame.Checkpointer(tmp_path, background=True, snapshot="lazy", rng=False)
    result = ckpt.step(state, epoch=0, step=7, epoch_end=True, final=True)
    assert result is not None and all(_hooks(o) == 0 for o in opts)  # nothing deferred
    model.load_state_dict(best)
    gate.set()
    ckpt.close()
    loaded = savegame.load(result.path)
    assert _equal(expected["model"], loaded["model"]) and _equal(expected["adamw"], loaded["adamw"])


def test_result_with_a_timeout_does_not_wait_longer_for_the_copies(tmp_path: Path, gate: threading.Event) -> None:
    """``result(timeout)`` waited for the lazy copies without a limit (as long as they took) before it
    looked at the timeout; it raises ``TimeoutError`` and the save goes on."""
    model, opts, state, x = _setup()
    expected = _expected(state)
    handle = savegame.save(tmp_path / "c", state, background=True, snapshot="lazy")
    with pytest.raises(TimeoutError):
        handle.result(timeout=0.05)  # the gate holds the copies: they cannot be done
    assert all(_hooks(o) == 1 for o in opts)  # nothing confirmed nor failed
    gate.set()
    _train(model, opts, x)
    handle.result()
    assert _equal(expected["model"], savegame.load(tmp_path / "c")["model"])


def test_a_copy_error_surfaces_at_the_next_step_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(batch: Any) -> None:
        raise RuntimeError("copy failed (injected)")

    monkeypatch.setattr(engine_lazy, "_copy_batch", broken)
    model, opts, state, x = _setup()
    ckpt = savegame.Checkpointer(tmp_path, background=True, snapshot="lazy", rng=False)
    ckpt.save(state, step=1)
    _forward_backward(model, opts, x)
    with pytest.raises(BackgroundSaveError, match="injected"):
        opts[0].step()
    assert all(_hooks(o) == 0 for o in opts)
    opts[0].step()  # the next step runs normally
    ckpt.close()
    assert savegame.Checkpointer(tmp_path).list() == []


def test_a_copy_error_surfaces_at_close_without_a_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_lazy, "_copy_batch", lambda batch: (_ for _ in ()).throw(RuntimeError("boom")))
    _, opts, state, _ = _setup()
    ckpt = savegame.Checkpointer(tmp_path, background=True, snapshot="lazy", rng=False)
    ckpt.save(state, step=1)
    with pytest.raises(BackgroundSaveError, match="boom"):
        ckpt.close()
    assert all(_hooks(o) == 0 for o in opts)


def test_no_hook_leaks_over_many_saves_and_close(tmp_path: Path) -> None:
    model, opts, state, x = _setup()
    with savegame.Checkpointer(tmp_path, every_n_steps=1, background=True, snapshot="lazy", keep_last=2,
                               rng=False) as ckpt:  # fmt: skip
        for step in range(1, 8):
            _train(model, opts, x)
            ckpt.step(state, step=step, epoch_end=False)
            assert all(_hooks(o) <= 1 for o in opts)
    assert all(_hooks(o) == 0 for o in opts)
    # a save never followed by a step: close() confirms it, commits it and removes the hooks
    handle = savegame.save(tmp_path / "last", state, background=True, snapshot="lazy")
    assert all(_hooks(o) == 1 for o in opts)
    handle.result()
    assert all(_hooks(o) == 0 for o in opts)
    assert _equal(_clone(model.state_dict()), savegame.load(tmp_path / "last")["model"])


def test_a_user_hook_registered_after_the_save_still_runs(tmp_path: Path) -> None:
    """Torch iterates over the pre-hooks while calling them: the lazy hook, done, is not removed from
    under that loop when another hook follows it (it is removed at the next wait instead)."""
    model, opts, state, x = _setup()
    handle = savegame.save(tmp_path / "c", state, background=True, snapshot="lazy")
    calls: list[int] = []
    user = opts[0].register_step_pre_hook(lambda opt, args, kwargs: calls.append(1))
    _train(model, opts, x)
    _train(model, opts, x)
    assert calls == [1, 1]
    handle.result()
    assert _hooks(opts[0]) == 1 and _hooks(opts[1]) == 0  # only the user's hook is left
    user.remove()


def _weight_clip(calls: list[int]) -> Any:
    """A step pre-hook that changes the parameters (clamps them), counting its calls in ``calls``."""

    def clip(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        calls.append(1)
        with torch.no_grad():
            for group in opt.param_groups:
                for p in group["params"]:
                    p.clamp_(-0.05, 0.05)

    return clip


def test_a_user_pre_hook_that_changes_the_parameters_runs_after_the_copy(tmp_path: Path) -> None:
    """A step pre-hook is part of the step and may change the parameters (here a weight clip). One
    registered before the save ran before the lazy hook, so the copy was always reported torn."""
    model, opts, state, x = _setup()
    calls: list[int] = []
    clip = _weight_clip(calls)
    users = [opt.register_step_pre_hook(clip) for opt in opts]
    expected = _expected(state)
    handle = savegame.save(tmp_path / "c", state, background=True, snapshot="lazy")
    _train(model, opts, x)
    handle.result()
    loaded = savegame.load(tmp_path / "c")
    assert _equal(expected["model"], loaded["model"]) and _equal(expected["sgd"], loaded["sgd"])
    assert calls == [1, 1]  # the user's hooks ran
    assert all(_hooks(o) == 1 for o in opts)  # only theirs is left
    for user in users:
        user.remove()


def test_round_trip_with_adamw_and_sgd_momentum(tmp_path: Path) -> None:
    model, opts, state, x = _setup()
    expected = _expected(state)
    handle = savegame.save(tmp_path / "c", state, background=True, snapshot="lazy")
    for _ in range(3):  # training goes on; the first step waits for the copy
        _train(model, opts, x)
    handle.result()
    fresh_model, fresh_opts, fresh_state, _ = _setup()
    savegame.load(tmp_path / "c", fresh_state)
    assert _equal(expected["model"], _clone(fresh_model.state_dict()))
    assert _equal(expected["adamw"], _clone(fresh_opts[0].state_dict()))
    assert _equal(expected["sgd"], _clone(fresh_opts[1].state_dict()))


def test_an_accelerate_wrapped_optimizer_hooks_the_optimizer_it_wraps(tmp_path: Path) -> None:
    """accelerate's ``AcceleratedOptimizer`` subclasses ``Optimizer`` without initialising it: it has no
    step hooks of its own (registering one raised ``AttributeError``), and its ``step`` calls the wrapped
    optimizer's, which is the one whose next step must wait."""
    accelerate = pytest.importorskip("accelerate")
    model, (opt_a, opt_b), _, x = _setup()
    accelerator = accelerate.Accelerator(cpu=True)
    wrapped_a, wrapped_b = accelerator.prepare(opt_a, opt_b)
    state = {"model": model, "adamw": wrapped_a, "sgd": wrapped_b, "epoch": 3}
    expected = _expected(state)
    handle = savegame.save(tmp_path / "c", state, background=True, snapshot="lazy")
    assert _hooks(opt_a) == 1 and _hooks(opt_b) == 1
    _train(model, [wrapped_a, wrapped_b], x)
    handle.result()
    loaded = savegame.load(tmp_path / "c")
    assert _equal(expected["model"], loaded["model"])
    assert _equal(expected["adamw"], loaded["adamw"]) and _equal(expected["sgd"], loaded["sgd"])
    assert _hooks(opt_a) == 0 and _hooks(opt_b) == 0


def test_a_sparse_parameter_gets_the_same_error_as_an_eager_save(tmp_path: Path) -> None:
    """A sparse parameter has no single data pointer: finding the lazily copied tensors raised a bare
    RuntimeError ("Cannot access data pointer of Tensor that doesn't have storage")."""
    indices = torch.tensor([[0, 1], [1, 0]])
    param = nn.Parameter(torch.sparse_coo_tensor(indices, torch.ones(2), (100, 100)))
    sgd = torch.optim.SGD([param], lr=0.1)
    for snapshot in ("eager", "lazy"):
        with pytest.raises(savegame.UnsupportedTypeError, match="sparse_coo tensor"):
            savegame.save(tmp_path / snapshot, {"sgd": sgd, "weights": {"w": param}}, background=True,
                          snapshot=snapshot)  # fmt: skip
        assert not (tmp_path / snapshot).exists()
        handle = savegame.save(tmp_path / snapshot, {"model": nn.Linear(128, 256), "sgd": sgd}, background=True,
                               snapshot=snapshot)  # fmt: skip
        handle.result()  # (the optimizer's state dict refers to its parameters by index)
        assert _hooks(sgd) == 0


def test_only_module_and_optimizer_items_are_deferred() -> None:
    model, _, state, _ = _setup()
    state = {**state, "bare": model[4].weight, "nested": {"w": model[4].weight.detach()}}
    lazy = engine_lazy.lazy_snapshot(state)
    assert lazy is not None
    encode_state(state, copy=True, lazy=lazy)
    try:
        from savegame.adapters.torch import SMALL_TENSOR_BYTES

        def big(t: object) -> bool:
            return isinstance(t, torch.Tensor) and t.numel() * t.element_size() > SMALL_TENSOR_BYTES

        owned = [p for p in model.parameters() if big(p)]
        owned += [t for opt in (state["adamw"], state["sgd"]) for s in opt.state.values() for t in s.values() if big(t)]
        assert len(owned) == 11  # 5 parameters, AdamW's 2 moments of one, SGD's 4 momentum buffers
        assert lazy.deferred == len(owned)  # not the bare or nested item, not the running stats
        assert lazy.hooked() == 2
    finally:
        lazy.settle()
    assert lazy.hooked() == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_has_no_hooks(tmp_path: Path, gate: threading.Event) -> None:
    model, opts, state, x = _setup()
    handle = savegame.save(tmp_path / "c", state, background=True, snapshot="lazy")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the copy thread is the parent's, so a hooked step would wait forever
        # (only the hooks are checked: torch compute in a forked child of a process that used OpenMP hangs)
        ok = all(_hooks(o) == 0 for o in opts)
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == b"1"
    gate.set()
    _train(model, opts, x)
    handle.result()


def test_lazy_with_if_busy_skip_commits_the_state_of_each_saved_step(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # loss -sum(p): every step adds exactly 1
    state = {"model": model, "optimizer": opt}
    written: list[int] = []
    with savegame.Checkpointer(tmp_path, every_n_steps=1, background=True, if_busy="skip", snapshot="lazy",
                               rng=False) as ckpt:  # fmt: skip
        for step in range(1, 12):
            opt.zero_grad()
            sum(-p.sum() for p in model.parameters()).backward()  # type: ignore[union-attr]
            opt.step()
            result = ckpt.step(state, step=step, epoch_end=False)
            if result is not None and not result.skipped:
                written.append(step)
    assert _hooks(opt) == 0
    records = savegame.Checkpointer(tmp_path).list()
    assert [r.step for r in records] == written and written[0] == 1
    for record in records:
        loaded = savegame.load(record.path)
        assert all(torch.all(t == float(record.step or 0)) for t in loaded["model"].values())


@pytest.mark.parametrize("kwargs", [{"snapshot": "later"}, {"snapshot": "lazy"}, {"snapshot": None}])
def test_bad_snapshot_options_raise_config_error(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="snapshot"):
        savegame.Checkpointer(tmp_path, **kwargs)  # "lazy" without background=True
    with pytest.raises(ConfigError, match="snapshot"):
        savegame.save(tmp_path / "x", {"a": 1}, **kwargs)
    with pytest.raises(ConfigError, match="snapshot"):
        savegame.Checkpointer(tmp_path, background=True, snapshot="bogus")


_CHILD = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import savegame
    model = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    state = {"model": model, "optimizer": opt}
    ckpt = savegame.Checkpointer(sys.argv[1], every_n_steps=1, background=True, if_busy="skip",
                                 snapshot="lazy", keep_last=3)
    step = 0
    while True:
        step += 1
        opt.zero_grad()
        sum(-p.sum() for p in model.parameters()).backward()
        opt.step()  # waits for the lazy copy of the previous save
        result = ckpt.step(state, step=step, epoch_end=False)
        if result is not None and not result.skipped and step % 5 == 0:
            result.pending.result()
            print(step, flush=True)
""")


@pytest.mark.subprocess
def test_kill_while_saving_lazily_every_step_leaves_only_complete_checkpoints(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             env=env)
    try:
        assert child.stdout is not None
        committed = [int(child.stdout.readline()) for _ in range(4)]
        child.send_signal(signal.SIGKILL)  # most likely mid-copy, mid-step or mid-write
    finally:
        child.kill()
        child.wait(60)
    records = savegame.Checkpointer(tmp_path).list()
    assert records and records[-1].step is not None and records[-1].step >= committed[-1]
    for record in records:  # every visible checkpoint is whole and holds the state of its own step
        savegame.verify(record.path)
        loaded = savegame.load(record.path.rstrip("/"))
        assert all(torch.all(t == float(record.step or 0)) for t in loaded["model"].values())


@pytest.mark.subprocess
def test_a_lazy_save_never_waited_for_is_committed_at_exit(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import sys, torch
        from torch import nn
        import savegame
        model = nn.Linear(256, 256)
        opt = torch.optim.AdamW(model.parameters())
        model(torch.randn(2, 256)).sum().backward()
        opt.step()
        savegame.save(sys.argv[1], {"model": model, "optimizer": opt}, background=True, snapshot="lazy")
        torch.save(model.state_dict(), sys.argv[1] + ".expected.pt")
    """)  # no step, no result(): the exit hook confirms the copy and commits
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    target = str(tmp_path / "c")
    subprocess.run([sys.executable, "-c", script, target], env=env, check=True, timeout=120)
    savegame.verify(target)
    expected = torch.load(target + ".expected.pt", weights_only=True)
    assert _equal(dict(expected), savegame.load(target)["model"])


def _until(ckpt: savegame.Checkpointer, state: dict[str, Any], step: list[int], done: Any) -> Any:
    """Call ``ckpt.step`` (one step further each time) until ``done(result)``; fail instead of looping forever."""
    import time

    deadline = time.monotonic() + 120
    while True:
        step[0] += 1
        result = ckpt.step(state, step=step[0], epoch_end=False)
        if done(result):
            return result
        assert time.monotonic() < deadline, "every save was skipped: the lazy save in flight never finished"
        time.sleep(0.005)


def test_a_lazy_save_is_committed_by_the_next_step_calls_without_an_optimizer_step(tmp_path: Path) -> None:
    """``if_busy="skip"`` polls the save in flight: one whose copies are done is confirmed there, so it
    commits (and the next save is made) even while no ``optimizer.step()`` runs (evaluation, a phase
    where only other parts train). Before, each such call was skipped until the next step or a wait."""
    _, _, state, _ = _setup()
    expected = _expected(state)
    ckpt = savegame.Checkpointer(tmp_path, background=True, snapshot="lazy", if_busy="skip", every_n_steps=1,
                                 rng=False)  # fmt: skip
    step = [1]
    first = ckpt.step(state, step=1, epoch_end=False)
    assert first is not None and not first.skipped
    second = _until(ckpt, state, step, lambda r: r is not None and not r.skipped)
    assert _equal(expected["model"], savegame.load(first.path)["model"])
    assert second.pending is not None
    ckpt.close()
    assert [r.step for r in savegame.Checkpointer(tmp_path).list()] == [1, step[0]]


def test_a_save_whose_optimizer_was_replaced_fails_at_a_later_step_instead_of_skipping_every_save(
    tmp_path: Path,
) -> None:
    """A new optimizer over the same parameters (a second training phase) steps them without waiting for
    the copy: the save made with the old one can never be confirmed by a step. It was "in flight" until
    close(), and ``if_busy="skip"`` silently skipped every save of the run meanwhile."""
    model, opts, state, x = _setup()
    ckpt = savegame.Checkpointer(tmp_path, background=True, snapshot="lazy", if_busy="skip", every_n_steps=1,
                                 rng=False)  # fmt: skip
    ckpt.step(state, step=1, epoch_end=False)
    phase2 = torch.optim.SGD(model.parameters(), lr=1e-2)
    state = {"model": model, "sgd": phase2}
    _train(model, [phase2], x)  # not hooked: changes the parameters whose copy is not confirmed

    def torn(result: Any) -> bool:
        _train(model, [phase2], x)
        return False

    step = [1]
    with pytest.raises(TornSnapshotError, match=r"model\.\d\.(weight|bias).*another optimizer"):
        _until(ckpt, state, step, torn)
    later = _until(ckpt, state, step, lambda r: r is not None and not r.skipped)  # saving goes on
    ckpt.close()
    assert [r.step for r in savegame.Checkpointer(tmp_path).list()] == [later.step]
    assert _hooks(opts[0]) == 0 and _hooks(opts[1]) == 0


def test_a_global_step_pre_hook_that_changes_the_parameters_runs_after_the_copy(tmp_path: Path) -> None:
    """torch runs the global step pre-hooks (register_optimizer_step_pre_hook) before an optimizer's own:
    a global weight clip ran before the lazy hook, and every lazy save failed as torn."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    model, opts, state, x = _setup()
    calls: list[int] = []
    user = register_optimizer_step_pre_hook(_weight_clip(calls))
    try:
        for round_ in range(2):
            expected = _expected(state)
            handle = savegame.save(tmp_path / f"c{round_}", state, background=True, snapshot="lazy")
            _train(model, opts, x)
            handle.result()
            loaded = savegame.load(tmp_path / f"c{round_}")
            assert _equal(expected["model"], loaded["model"]) and _equal(expected["sgd"], loaded["sgd"])
        assert len(calls) == 4  # the user's hook ran at every step
    finally:
        user.remove()


def test_a_save_in_a_forked_child_does_not_wait_for_the_parents(tmp_path: Path) -> None:
    """The child of a fork taken while a background save is in flight (here: a lazy one, not confirmed
    before the next step) has no writer thread: its own first background save waited for the parent's
    save forever."""
    import numpy as np

    model, opts, state, x = _setup()
    handle = savegame.save(tmp_path / "parent", state, background=True, snapshot="lazy")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child (NumPy only: torch compute in a forked child of an OpenMP process can hang)
        signal.alarm(60)
        try:
            savegame.save(tmp_path / "child", {"x": np.arange(3.0)}, background=True).result()
            ok = savegame.load(tmp_path / "child")["x"].tolist() == [0.0, 1.0, 2.0]
        except BaseException:
            ok = False
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert answer == b"1" and status == 0
    _train(model, opts, x)
    handle.result()
    savegame.verify(tmp_path / "parent")


def test_a_finished_save_thread_holds_none_of_its_state(tmp_path: Path) -> None:
    """Once a handle completes, its thread holds no encoded item any more: it dropped them while the caller
    waited. Freed by the daemon thread after the caller went on to exit, a torch tensor's deallocator ran
    during interpreter shutdown and the process aborted (SIGABRT, exit code 134) in about one exit in six."""
    from savegame.engine import background

    model, opts, state, x = _setup()
    handle = savegame.save(tmp_path / "c", state, background=True, snapshot="lazy")
    _train(model, opts, x)
    handle.result()
    thread = background.default_writer()._thread
    assert thread is not None
    run = getattr(thread, "_target", None)  # None once the thread ended
    if run is not None:
        cells = dict(zip(run.__code__.co_freevars, (cell.cell_contents for cell in run.__closure__ or ())))
        assert cells["job"] is background._done_job


def test_exiting_right_after_lazy_saves_never_aborts(tmp_path: Path) -> None:
    script = textwrap.dedent("""
        import sys, torch
        import savegame
        model = torch.nn.Linear(2048, 1024)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(4, 2048)).sum().backward()
        opt.step()
        savegame.save(sys.argv[1], {"model": model, "opt": opt}, background=True, snapshot="lazy")
    """)  # the exit hook confirms the copy and commits; then the interpreter shuts down
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for i in range(6):
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"c{i}")], env=env, timeout=120,
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
        savegame.verify(tmp_path / f"c{i}")
