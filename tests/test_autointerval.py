"""every="auto": the Young/Daly interval from measured costs, driven by a fake clock."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest

from savegame.errors import ConfigError
from savegame.policies import AnyOf, EveryNEpochs, Progress, SaveContext, SkipFirstEpochs
from savegame.policies.autointerval import AutoInterval, daly_interval, record_save_cost


def test_daly_formula_values() -> None:
    # C = 10 s, M = 1 day: Young gives sqrt(2*10*86400) = 1314.5 s; Daly's correction is small.
    young = math.sqrt(2 * 10 * 86400)
    daly = daly_interval(10, 86400)
    assert young - 10 < daly < young * 1.01
    assert daly == pytest.approx(young * (1 + math.sqrt(10 / 172800) / 3 + 10 / (18 * 86400)) - 10)
    assert daly_interval(300, 100) == 100  # cost beyond 2 M: save every M
    assert daly_interval(0, 100) == 0


def simulate(policy: AutoInterval, cost: float, duration: float, step_seconds: float = 1.0) -> list[float]:
    """Run a fake training loop: one step per ``step_seconds``; a save blocks for ``cost``."""
    now = 0.0
    last: Progress | None = None
    saves = []
    step = 0
    while now < duration:
        step += 1
        now += step_seconds
        progress = Progress(step=step, time=now, epoch_end=False)
        if policy.should_save(progress, SaveContext(last_saved=last, best=None, started=0.0)):
            saves.append(now)
            now += cost
            policy.record_save_cost(cost)
            last = Progress(step=step, time=now, epoch_end=False)
    return saves


def test_interval_follows_measured_cost_with_a_fake_clock() -> None:
    policy = AutoInterval(mtbf=3600.0, max_overhead=0.5, min_seconds=0.0, max_seconds=1e9)
    saves = simulate(policy, cost=2.0, duration=2000)
    assert saves[0] == 1.0  # no cost known yet: the first call saves and measures
    expected = daly_interval(2.0, 3600.0)  # about 118 s
    gaps = [b - a - 2.0 for a, b in itertools.pairwise(saves[1:])]
    assert all(abs(g - expected) <= 1.0 for g in gaps), (gaps, expected)


def test_overhead_cap_dominates_when_failures_are_frequent() -> None:
    policy = AutoInterval(mtbf=10.0, max_overhead=0.05, min_seconds=0.0, max_seconds=1e9)
    policy.record_save_cost(2.0)
    assert policy.interval() == pytest.approx(40.0)  # 2 s / 5 % beats Daly's ~5.9 s


def test_bounds_and_smoothing() -> None:
    policy = AutoInterval(mtbf=1e4, min_seconds=5.0, max_seconds=60.0, smoothing=0.5)
    assert policy.interval() == 0.0
    policy.record_save_cost(0.0001)
    assert policy.interval() == 5.0
    policy.record_save_cost(100.0)
    assert policy.cost == pytest.approx(50.00005)
    assert policy.interval() == 60.0
    policy.record_save_cost(float("nan"))  # ignored
    assert policy.cost == pytest.approx(50.00005)


def test_record_save_cost_reaches_nested_policies() -> None:
    auto = AutoInterval()
    record_save_cost(AnyOf(EveryNEpochs(2), SkipFirstEpochs(1, auto)), 3.0)
    assert auto.cost == 3.0


@pytest.mark.parametrize(
    "kwargs",
    [{"mtbf": 0}, {"mtbf": math.inf}, {"max_overhead": 0}, {"max_overhead": 2}, {"min_seconds": 10, "max_seconds": 1},
     {"smoothing": 0}, {"first_after": -1}],
)
def test_bad_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="AutoInterval"):
        AutoInterval(**kwargs)


def test_checkpointer_every_auto_saves_at_the_measured_interval(tmp_path: Path) -> None:
    """``Checkpointer(every="auto")``: the first step saves (measuring the cost), the next save comes once
    the Young/Daly interval computed from that measured cost has passed on the (fake) clock."""
    import torch

    import savegame

    now = [0.0]
    model = torch.nn.Linear(64, 64)
    ckpt = savegame.Checkpointer(tmp_path, every="auto", mtbf_seconds=3600, max_overhead=0.05, save_at_end=False,
                                 clock=lambda: now[0])  # fmt: skip
    policy = ckpt.save_policy
    assert isinstance(policy, AutoInterval) and policy.mtbf == 3600 and policy.max_overhead == 0.05
    assert ckpt.step({"model": model}, step=1, epoch_end=False) is not None
    assert policy.cost is not None and policy.cost > 0  # the blocking time of that save
    interval = policy.interval()
    assert interval == max(1.0, daly_interval(policy.cost, 3600), policy.cost / 0.05)
    now[0] = interval * 0.9
    assert ckpt.step({"model": model}, step=2, epoch_end=False) is None
    now[0] = interval * 1.01
    assert ckpt.step({"model": model}, step=3, epoch_end=False) is not None
    assert [r.step for r in ckpt.list()] == [1, 3]
    ckpt.close()
    with pytest.raises(savegame.ConfigError, match="every"):
        savegame.Checkpointer(tmp_path / "x", every="sometimes")  # type: ignore[arg-type]
    with pytest.raises(savegame.ConfigError, match="mtbf"):
        savegame.Checkpointer(tmp_path / "y", every="auto", mtbf_seconds=-1)
