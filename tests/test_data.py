"""Tests for savegame.data: the resumable shuffling sampler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

import savegame
from savegame.data import ResumableRandomSampler
from savegame.errors import ConfigError, StateMismatchError


def test_each_epoch_is_a_seeded_permutation() -> None:
    sampler = ResumableRandomSampler(range(50), seed=3)
    first = list(sampler)
    second = list(sampler)  # the sampler moved to epoch 1 by itself
    assert sorted(first) == list(range(50)) and sorted(second) == list(range(50))
    assert first != second
    assert first == ResumableRandomSampler(range(50), seed=3).order(0)
    assert first != ResumableRandomSampler(range(50), seed=4).order(0)
    assert len(sampler) == 50 and sampler.epoch == 2


def test_order_does_not_touch_the_global_rng() -> None:
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    list(ResumableRandomSampler(range(10), seed=1))
    assert torch.equal(torch.rand(2), expected)


def test_no_shuffle() -> None:
    assert list(ResumableRandomSampler(range(5), shuffle=False)) == [0, 1, 2, 3, 4]


def test_set_epoch_keeps_position_of_the_same_epoch() -> None:
    sampler = ResumableRandomSampler(range(10), seed=0)
    sampler.set_epoch(2)
    it = iter(sampler)
    taken = [next(it) for _ in range(4)]
    sampler.set_epoch(2)
    assert sampler.position == 4
    assert taken + list(iter(sampler)) == sampler.order(2)
    sampler.set_epoch(5)
    assert (sampler.epoch, sampler.position) == (5, 0)


@settings(max_examples=30, deadline=None)
@given(size=st.integers(1, 40), cut=st.integers(0, 40), epoch=st.integers(0, 5), seed=st.integers(0, 2**31))
def test_state_dict_resumes_exactly(size: int, cut: int, epoch: int, seed: int) -> None:
    cut = min(cut, size)
    original = ResumableRandomSampler(range(size), seed=seed)
    original.set_epoch(epoch)
    it = iter(original)
    consumed = [next(it) for _ in range(cut)]
    state = original.state_dict()
    rest = list(it)

    resumed = ResumableRandomSampler(range(size), seed=0)
    resumed.load_state_dict(state)
    resumed.set_epoch(epoch)
    assert consumed + list(resumed) == original.order(epoch)
    assert list(resumed) == original.order(epoch + 1)
    assert consumed + rest == original.order(epoch)


def test_dataloader_resume_mid_epoch_gives_the_same_batches(tmp_path: Path) -> None:
    dataset = TensorDataset(torch.arange(37).float())

    def loader(sampler: ResumableRandomSampler) -> DataLoader[tuple[torch.Tensor, ...]]:
        return DataLoader(dataset, batch_size=5, sampler=sampler, generator=torch.Generator())

    full = ResumableRandomSampler(dataset, seed=11)
    reference = []
    for epoch in range(2):
        full.set_epoch(epoch)
        reference += [b[0].tolist() for b in loader(full)]

    sampler = ResumableRandomSampler(dataset, seed=11)
    seen = []
    for i, batch in enumerate(loader(sampler)):
        seen.append(batch[0].tolist())
        if i == 3:
            savegame.save(tmp_path / "ck", {"sampler": sampler})
            break
    resumed = ResumableRandomSampler(dataset, seed=11)
    savegame.load(tmp_path / "ck", {"sampler": resumed})
    assert (resumed.epoch, resumed.position) == (0, 20)
    for epoch in range(2):
        resumed.set_epoch(epoch)
        seen += [b[0].tolist() for b in loader(resumed)]
    assert seen == reference


def test_exhausted_epoch_state_points_to_the_next_epoch() -> None:
    sampler = ResumableRandomSampler(range(6), seed=0)
    list(DataLoader(range(6), batch_size=4, sampler=sampler))
    assert sampler.state_dict()["epoch"] == 1 and sampler.state_dict()["position"] == 0


def test_invalid_arguments_and_states() -> None:
    with pytest.raises(ConfigError):
        ResumableRandomSampler(range(3), seed=-1)
    sampler = ResumableRandomSampler(range(3))
    with pytest.raises(ConfigError):
        sampler.set_epoch(-2)
    with pytest.raises(StateMismatchError, match="3 samples"):
        ResumableRandomSampler(range(4)).load_state_dict(sampler.state_dict())
    with pytest.raises(StateMismatchError):
        sampler.load_state_dict({"epoch": 0})
    with pytest.raises(StateMismatchError):
        sampler.load_state_dict({**sampler.state_dict(), "position": 9})
    sampler.set_position(99)
    assert sampler.position == 3


def test_a_seed_beyond_64_bits_still_gives_a_reproducible_order() -> None:
    """Any int seed >= 0 is accepted, so every epoch of one must be drawable: ``seed + epoch`` past 2**64
    made the private generator's manual_seed raise a bare ValueError in the middle of the training loop."""
    for seed in (2**64 - 1, 2**64, 10**30):
        sampler = ResumableRandomSampler(range(7), seed=seed)
        sampler.set_epoch(3)
        first = list(sampler)
        assert sorted(first) == list(range(7))
        again = ResumableRandomSampler(range(7), seed=seed)
        again.load_state_dict({**sampler.state_dict(), "epoch": 3, "position": 0})
        assert list(again) == first
