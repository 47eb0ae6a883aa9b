"""A plain DataLoader wrapped with ``savegame.data.resumable`` resumes mid-epoch exactly.

Each case runs the same loop three times in this process, each "process" starting from a different
global seed as a fresh one would: once uninterrupted, once stopped in the middle of an epoch right
after a Checkpointer save, and once resumed from that checkpoint with freshly built objects. The
sample indices the loop received must be the uninterrupted run's, and the resumed run must load
(``__getitem__``) only the samples of the batches it yields.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

import savegame
from savegame.data import ResumableLoader, ResumableRandomSampler, resumable

ROOT = Path(__file__).resolve().parents[1]
Batches = list[list[int]]


class Indices(Dataset[torch.Tensor]):
    """Sample ``i`` is ``i``; every ``__getitem__`` is appended to ``log`` (a file: workers write it too)."""

    def __init__(self, size: int, log: Path | None = None) -> None:
        self.size, self.log = size, log

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.log is not None:
            with open(self.log, "a", encoding="ascii") as out:
                out.write(f"{index}\n")
        return torch.tensor(index)


def loaded(log: Path) -> list[int]:
    return sorted(int(line) for line in log.read_text(encoding="ascii").split()) if log.exists() else []


def flat(batches: Batches) -> list[int]:
    return sorted(i for batch in batches for i in batch)


Factory = Callable[[Dataset[torch.Tensor]], DataLoader[Any]]


def _sampler_loader(ds: Dataset[torch.Tensor]) -> DataLoader[Any]:
    return DataLoader(ds, batch_size=4, sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(3)))


VARIANTS: dict[str, Factory] = {
    "shuffle": lambda ds: DataLoader(ds, batch_size=4, shuffle=True),
    "no-shuffle": lambda ds: DataLoader(ds, batch_size=4),
    "drop-last": lambda ds: DataLoader(ds, batch_size=5, shuffle=True, drop_last=True),
    "generator": lambda ds: DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1)),
    "batch-sampler": lambda ds: DataLoader(
        ds, batch_sampler=BatchSampler(RandomSampler(ds, generator=torch.Generator().manual_seed(2)), 3, False)
    ),
    "sampler-own-generator": _sampler_loader,
    "subset-weighted": lambda ds: DataLoader(ds, batch_size=4, sampler=WeightedRandomSampler([1.0] * 30, 30)),
    "subset-random": lambda ds: DataLoader(ds, batch_size=4, sampler=SubsetRandomSampler(list(range(0, 30, 2)))),
    "no-auto-batching": lambda ds: DataLoader(ds, batch_size=None, shuffle=True),
    "resumable-sampler": lambda ds: DataLoader(ds, batch_size=4, sampler=ResumableRandomSampler(ds, seed=5)),
    "workers": lambda ds: DataLoader(ds, batch_size=4, shuffle=True, num_workers=2),
    "workers-persistent": lambda ds: DataLoader(ds, batch_size=4, shuffle=True, num_workers=2, persistent_workers=True),
}
SLOW = {"workers", "workers-persistent"}


def loop(loader: Any, *, epochs: range, stop: tuple[int, int] | None = None, ckpt: Any = None,
         state: Any = None) -> Batches:  # fmt: skip
    """The training loop: batch indices received, one global-RNG draw per batch (like dropout).

    ``stop=(epoch, batch)``: save after that many batches of that epoch and stop there.
    """
    seen: Batches = []
    for epoch in epochs:
        for number, batch in enumerate(loader, start=1):
            seen.append([int(i) for i in torch.atleast_1d(batch)])
            torch.rand(1)
            if stop == (epoch, number):
                ckpt.save(state, epoch=epoch, step=len(seen), epoch_end=False)
                return seen
    return seen


def run_interrupted(tmp_path: Path, make: Factory, *, size: int, stop: tuple[int, int], epochs: int,
                    log: Path | None = None) -> tuple[Batches, Batches]:  # fmt: skip
    """(batches before the interruption, batches after the resume)."""
    ckpt = savegame.Checkpointer(tmp_path / "run")
    torch.manual_seed(11)
    loader = resumable(make(Indices(size)))
    state = {"loader": loader}
    before = loop(loader, epochs=range(epochs), stop=stop, ckpt=ckpt, state=state)
    ckpt.close()
    torch.manual_seed(99)  # another process
    ckpt = savegame.Checkpointer(tmp_path / "run")
    loader = resumable(make(Indices(size, log)))
    state = {"loader": loader}
    restored = ckpt.restore(state)
    assert restored is not None and restored.epoch == stop[0]
    after = loop(loader, epochs=range(restored.epoch, epochs))
    ckpt.close()
    return before, after


def uninterrupted(make: Factory, *, size: int, epochs: int) -> Batches:
    torch.manual_seed(11)
    return loop(resumable(make(Indices(size))), epochs=range(epochs))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.slow) if v in SLOW else v for v in VARIANTS])
def test_mid_epoch_resume_gives_the_uninterrupted_order(tmp_path: Path, variant: str) -> None:
    make, size, epochs = VARIANTS[variant], 30, 3
    expected = uninterrupted(make, size=size, epochs=epochs)
    log = tmp_path / "getitem.log"
    before, after = run_interrupted(tmp_path, make, size=size, stop=(1, 3), epochs=epochs, log=log)
    assert before + after == expected
    assert loaded(log) == flat(after)  # the skipped batches were never loaded, not even by workers


def test_the_wrapper_changes_nothing_about_the_order() -> None:
    """Wrapped or not, the same batches from the same global RNG (and the same RNG state afterwards)."""
    ds = Indices(30)
    torch.manual_seed(4)
    plain = [b.tolist() for _ in range(2) for b in DataLoader(ds, batch_size=4, shuffle=True)]
    after_plain = torch.get_rng_state()
    torch.manual_seed(4)
    wrapped = [b.tolist() for _ in range(2) for b in resumable(DataLoader(ds, batch_size=4, shuffle=True))]
    assert wrapped == plain
    assert torch.equal(torch.get_rng_state(), after_plain)


def test_resume_at_an_epoch_boundary_and_at_its_last_batch(tmp_path: Path) -> None:
    make = VARIANTS["shuffle"]
    expected = uninterrupted(make, size=30, epochs=3)
    for stop in ((0, 8), (1, 1)):  # 8 = the last batch of epoch 0 (30 samples / 4)
        before, after = run_interrupted(tmp_path / str(stop), make, size=30, stop=stop, epochs=3)
        assert before + after == expected, stop


def test_a_restored_position_saved_again_before_iterating_is_kept(tmp_path: Path) -> None:
    """A save right after a restore (a preemption before the first batch) keeps the restored position."""
    make = VARIANTS["shuffle"]
    expected = uninterrupted(make, size=30, epochs=2)
    torch.manual_seed(11)
    loader = resumable(make(Indices(30)))
    with savegame.Checkpointer(tmp_path / "a") as ckpt:
        before = loop(loader, epochs=range(2), stop=(0, 3), ckpt=ckpt, state={"loader": loader})
        assert ckpt.latest is not None
        path = ckpt.latest.path
    torch.manual_seed(99)  # another process
    restored = resumable(make(Indices(30)))
    savegame.load(path, {"loader": restored, "rng": savegame.RNGState()})
    savegame.save(tmp_path / "b", {"loader": restored, "rng": savegame.RNGState()})
    again = resumable(make(Indices(30)))
    torch.manual_seed(98)  # and another
    savegame.load(tmp_path / "b", {"loader": again, "rng": savegame.RNGState()})
    assert before + loop(again, epochs=range(2)) == expected


def test_the_state_is_plain_and_the_position_counts_what_the_loop_received(tmp_path: Path) -> None:
    loader = resumable(DataLoader(Indices(30), batch_size=4, shuffle=True, num_workers=2))
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    state = loader.state_dict()
    assert (state["batches"], state["epochs_completed"], state["length"]) == (3, 0, 8)  # workers fetched more
    savegame.save(tmp_path / "c", {"loader": loader})
    stored = savegame.load(tmp_path / "c")["loader"]
    assert stored["batches"] == 3 and torch.equal(stored["start"]["generators"]["global"],
                                                  state["start"]["generators"]["global"])  # fmt: skip
    del iterator


def test_a_plain_loader_in_the_state_is_refused_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(savegame.UnsupportedTypeError, match=r"loader: .*savegame\.data\.resumable\(loader\)"):
        savegame.save(tmp_path / "c", {"loader": DataLoader(Indices(4))})
    assert not (tmp_path / "c").exists()


def test_resumable_returns_stateful_loaders_unchanged_and_refuses_others() -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    stateful = StatefulDataLoader(Indices(4))
    assert resumable(stateful) is stateful
    wrapped = resumable(DataLoader(Indices(4)))
    assert isinstance(wrapped, ResumableLoader) and resumable(wrapped) is wrapped
    assert len(wrapped) == 4 and wrapped.batch_size == 1

    class Custom(DataLoader[Any]):
        pass

    with pytest.raises(savegame.ConfigError, match="Custom"):
        resumable(Custom(Indices(4)))
    with pytest.raises(savegame.ConfigError, match=r"expected a torch\.utils\.data\.DataLoader"):
        resumable([1, 2, 3])


def test_a_loader_of_another_length_or_a_damaged_state_is_refused(tmp_path: Path) -> None:
    loader = resumable(DataLoader(Indices(30), batch_size=4, shuffle=True))
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()
    other = resumable(DataLoader(Indices(30), batch_size=5, shuffle=True))
    with pytest.raises(savegame.StateMismatchError, match="8 batches per epoch, this loader has 6"):
        other.load_state_dict(state)
    with pytest.raises(savegame.StateMismatchError, match="invalid"):
        other.load_state_dict({**state, "batches": -1})
    with pytest.raises(savegame.StateMismatchError, match="missing"):
        other.load_state_dict({"version": 1})
    seeded = resumable(DataLoader(Indices(30), batch_size=4, shuffle=True, generator=torch.Generator()))
    with pytest.raises(savegame.StateMismatchError, match="build the loader as the interrupted run did"):
        seeded.load_state_dict(state)


class Stream(IterableDataset[torch.Tensor]):
    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(torch.arange(12))


class Reversed(Sampler[int]):
    """A sampler savegame does not know."""

    def __iter__(self) -> Iterator[int]:
        return iter(range(29, -1, -1))

    def __len__(self) -> int:
        return 30


def _restore_twice(tmp_path: Path, make: Callable[[], DataLoader[Any]]) -> tuple[list[warnings.WarningMessage], Any]:
    loader = resumable(make())
    iterator = iter(loader)
    next(iterator), next(iterator)
    savegame.save(tmp_path / "c", {"train_data": loader})
    fresh = resumable(make())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        savegame.load(tmp_path / "c", {"train_data": fresh})
        savegame.load(tmp_path / "c", {"train_data": fresh})
    return [w for w in caught if issubclass(w.category, savegame.ResumeWarning)], fresh


def test_an_iterable_dataset_warns_once_and_restarts_the_epoch(tmp_path: Path) -> None:
    found, fresh = _restore_twice(tmp_path, lambda: DataLoader(Stream(), batch_size=4))
    assert len(found) == 1
    message = str(found[0].message)
    assert "train_data" in message and "IterableDataset" in message and "StatefulDataLoader" in message
    assert next(iter(fresh)).tolist() == [0, 1, 2, 3]  # not silently skipped: restarted, as it said


def test_an_unknown_sampler_warns_once_and_still_skips(tmp_path: Path) -> None:
    found, fresh = _restore_twice(tmp_path, lambda: DataLoader(Indices(30), batch_size=4, sampler=Reversed()))
    assert len(found) == 1
    message = str(found[0].message)
    assert "train_data" in message and "Reversed" in message and "state_dict()" in message
    assert next(iter(fresh)).tolist() == [21, 20, 19, 18]


def test_known_samplers_do_not_warn(tmp_path: Path) -> None:
    found, _ = _restore_twice(tmp_path, lambda: DataLoader(Indices(30), batch_size=4, shuffle=True))
    assert found == []


def test_one_cycle_lr_resumed_mid_epoch_finishes_like_the_uninterrupted_run(tmp_path: Path) -> None:
    """The issue's crash: replaying the interrupted epoch from batch 0 stepped OneCycleLR past its
    total (the issue's ``Tried to step 126 times``; here it would be 51 of 50); resumed at the next
    unseen batch, the run ends where an uninterrupted one does, bit for bit."""
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    y = x.sum(1, keepdim=True)
    epochs = 5

    def build() -> tuple[dict[str, Any], ResumableLoader]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loader = resumable(DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=epochs * len(loader))
        return {"model": model, "optimizer": opt, "scheduler": sched, "loader": loader}, loader

    def train(state: dict[str, Any], loader: ResumableLoader, ckpt: Any, start: int, stop: int | None) -> None:
        step = ckpt.latest.step if ckpt.latest is not None and start else 0
        for epoch in range(start, epochs):
            for xb, yb in loader:
                state["optimizer"].zero_grad()
                torch.nn.functional.mse_loss(state["model"](xb), yb).backward()
                state["optimizer"].step()
                state["scheduler"].step()
                step += 1
                ckpt.step(state, epoch=epoch, step=step, epoch_end=False)
                if step == stop:
                    return
            ckpt.step(state, epoch=epoch + 1, step=step)

    state, loader = build()
    with savegame.Checkpointer(tmp_path / "straight", every_n_steps=5, keep_last=1) as ckpt:
        train(state, loader, ckpt, 0, None)
    expected = {k: v.clone() for k, v in state["model"].state_dict().items()}

    state, loader = build()
    with savegame.Checkpointer(tmp_path / "run", every_n_steps=5, keep_last=1) as ckpt:
        train(state, loader, ckpt, 0, 25)  # 25 = epoch 2, batch 5 of 10: saved there, then "killed"
    state, loader = build()
    with savegame.Checkpointer(tmp_path / "run", every_n_steps=5, keep_last=1) as ckpt:
        restored = ckpt.restore(state)
        assert restored is not None and (restored.epoch, restored.step) == (2, 25)
        train(state, loader, ckpt, restored.epoch, None)
    assert state["scheduler"].last_epoch == epochs * len(loader)
    for key, value in state["model"].state_dict().items():
        assert torch.equal(value, expected[key]), key


CHILD = ROOT / "tests" / "_stateful_loader_child.py"


def _child(root: Path, out: Path, *, kill_after: int | None = None) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("TORCHDYNAMO_DISABLE", "1")
    args = [sys.executable, str(CHILD), str(root), str(out)]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(ROOT), start_new_session=True)  # fmt: skip


def _wait_for_batches(proc: subprocess.Popen[str], count: int) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("batch ") and int(line.split()[1]) >= count:
            return
    raise AssertionError(f"the child ended before {count} batches: {proc.wait()} {proc.stderr and proc.stderr.read()}")


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.timeout(300)
def test_stateful_dataloader_sigkill_mid_epoch_resumes_bit_identical(tmp_path: Path) -> None:
    """torchdata's StatefulDataLoader (num_workers=2) as a state item, unchanged: SIGKILL after 13
    batches (mid-epoch: 10 batches per epoch), resume through the Checkpointer, and the final model
    (with dropout: the global RNG stream matters) and the sample order equal an uninterrupted run's."""
    straight = _child(tmp_path / "straight", tmp_path / "straight.pt")  # at the same time as the killed one
    killed = _child(tmp_path / "run", tmp_path / "unused.pt")
    _wait_for_batches(killed, 13)
    os.killpg(killed.pid, 9)  # the child and its two workers, at once
    killed.wait(timeout=30)
    assert killed.returncode == -9
    _, err = straight.communicate(timeout=240)
    assert straight.returncode == 0, err
    trained_before = len((tmp_path / "run" / "seen.txt").read_text().splitlines())
    assert trained_before >= 13
    resumed = _child(tmp_path / "run", tmp_path / "resumed.pt")
    out_resumed, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    step = int(out_resumed.split("resumed at epoch 1, step ")[1].split()[0])  # mid-epoch 1 (10 batches each)
    assert 13 <= step <= trained_before and step % 10, out_resumed
    final = savegame.load(tmp_path / "resumed.pt")
    expected = savegame.load(tmp_path / "straight.pt")
    assert final.keys() == expected.keys()
    for key in expected:
        assert torch.equal(final[key], expected[key]), key
    order = (tmp_path / "run" / "seen.txt").read_text().splitlines()
    assert len(order) == 20 and order == (tmp_path / "straight" / "seen.txt").read_text().splitlines()


def _forbid_pickle(patch: pytest.MonkeyPatch) -> None:
    import pickle

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pickle-style call while saving or loading")

    for module, names in ((pickle, ("dump", "dumps", "load", "loads")), (torch, ("save", "load"))):
        for name in names:
            patch.setattr(module, name, forbidden)


def test_both_loaders_are_saved_and_restored_without_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wrapper's and StatefulDataLoader's (num_workers=2) states go through savegame's own format,
    and come back as they were: no pickle, torch.save or torch.load on the way."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    def make_stateful() -> StatefulDataLoader[Any]:
        return StatefulDataLoader(Indices(30), batch_size=4, shuffle=True, num_workers=2, generator=torch.Generator())

    wrapped, stateful = resumable(DataLoader(Indices(30), batch_size=4, shuffle=True)), make_stateful()
    iterators = iter(wrapped), iter(stateful)
    for _ in range(3):
        next(iterators[0]), next(iterators[1])

    with monkeypatch.context() as patch:
        _forbid_pickle(patch)
        savegame.save(tmp_path / "c", {"wrapped": wrapped, "stateful": stateful})
    expected = [b.tolist() for b in iterators[1]]
    with monkeypatch.context() as patch:
        _forbid_pickle(patch)
        fresh_wrapped = resumable(DataLoader(Indices(30), batch_size=4, shuffle=True))
        fresh_stateful = make_stateful()
        savegame.load(tmp_path / "c", {"wrapped": fresh_wrapped, "stateful": fresh_stateful})
    assert fresh_wrapped.batches == 3 and len(expected) == 5
    assert [b.tolist() for b in fresh_stateful] == expected


@pytest.mark.timeout(60)
def test_a_dropped_wrapper_is_freed_at_once_and_stops_its_persistent_workers() -> None:
    """No reference cycle through the persistent iterator's index stream: a wrapper left in the middle of
    an epoch is freed when dropped (not at a later garbage collection, where stopping the workers waited
    for their 5 s join timeouts), and its worker processes end."""
    import gc
    import weakref

    loader = resumable(DataLoader(Indices(30), batch_size=4, shuffle=True, num_workers=2, persistent_workers=True))
    for number, _ in enumerate(loader):
        if number == 2:
            break
    workers = list(loader._inner._iterator._workers)
    ref = weakref.ref(loader)
    gc.disable()
    try:
        del loader
        assert ref() is None
    finally:
        gc.enable()
    for worker in workers:
        worker.join(timeout=10)
        assert not worker.is_alive()


@pytest.mark.parametrize("variant", ["generator", "sampler-own-generator", "batch-sampler", "resumable-sampler"])
def test_an_epoch_end_save_resumes_later_epochs_in_the_uninterrupted_order(tmp_path: Path, variant: str) -> None:
    """A save after an epoch's last batch (``epoch_end=True``, 0 batches into the next epoch) restores the
    private generators and stateful samplers the next epochs draw their order from, as a mid-epoch one does:
    without them a fresh process drew every later epoch from the generators' initial states."""
    make, epochs = VARIANTS[variant], 3
    expected = uninterrupted(make, size=30, epochs=epochs)
    torch.manual_seed(11)
    loader = resumable(make(Indices(30)))
    with savegame.Checkpointer(tmp_path / "run") as ckpt:
        before = loop(loader, epochs=range(1))
        ckpt.save({"loader": loader}, epoch=1, step=len(before))
    torch.manual_seed(99)  # another process, its objects built afresh
    loader = resumable(make(Indices(30)))
    with savegame.Checkpointer(tmp_path / "run") as ckpt:
        restored = ckpt.restore({"loader": loader})
        assert restored is not None and restored.epoch == 1
        after = loop(loader, epochs=range(1, epochs))
    assert before + after == expected


def test_a_damaged_generator_state_is_refused_at_restore(tmp_path: Path) -> None:
    """A generator state that is not one (wrong size, not bytes) is a StateMismatchError when the state is
    loaded, mid-epoch or between epochs, not a bare RuntimeError/TypeError from torch later in the loop."""
    loader = resumable(VARIANTS["generator"](Indices(30)))
    for batches in (0, 2):
        for bad in ("abc", [1, 2, 3], torch.zeros(5, dtype=torch.uint8)):
            state = {"version": 1, "epochs_completed": 1, "batches": batches, "length": 8,
                     "start": {"generators": {"loader": bad, "global": torch.get_rng_state()}, "samplers": {}}}
            if batches == 0:
                del state["start"]["generators"]["global"]
            with pytest.raises(savegame.StateMismatchError, match="loader generator"):
                loader.load_state_dict(state)
