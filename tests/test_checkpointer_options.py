"""The Checkpointer's options (savegame.run.options): the grouped forms, their conflicts with the flat
keywords, and the contract that the constructor's signature and CheckpointerOptions agree (so a new
keyword is one line in the constructor plus its field in the options module)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import signal
from pathlib import Path

import numpy as np
import pytest

from savegame import Background, Checkpointer, ConfigError, Preemption, StorageOptions
from savegame.run.options import CheckpointerOptions

GROUPS = {"preemption", "storage"}


def test_signature_and_options_fields_agree() -> None:
    params = inspect.signature(Checkpointer.__init__).parameters
    keywords = {n: p.default for n, p in params.items() if n not in ("self", "directory")}
    fields = {f.name: f.default for f in dataclasses.fields(CheckpointerOptions)}
    assert set(keywords) - GROUPS == set(fields)
    assert {n: keywords[n] for n in fields} == fields


def test_every_keyword_is_documented() -> None:
    doc = Checkpointer.__doc__ or ""
    params = inspect.signature(Checkpointer.__init__).parameters
    missing = [n for n in params if n != "self" and not re.search(rf"``[^`]*\b{n}\b", doc)]
    assert not missing


def test_background_group_equals_flat_keywords(tmp_path: Path) -> None:
    with Checkpointer(tmp_path / "a", background=Background(if_busy="skip", nice=5)) as grouped:
        with Checkpointer(tmp_path / "b", background=True, if_busy="skip", writer_nice=5) as flat:
            for attr in ("background", "if_busy", "writer_nice"):
                assert getattr(grouped, attr) == getattr(flat, attr)
            assert grouped.background is True
            grouped.save({"w": np.arange(3)}, epoch=1)
            grouped.wait()
            assert len(grouped.list()) == 1


def test_preemption_group_installs_the_handler(tmp_path: Path) -> None:
    with Checkpointer(tmp_path, preemption=Preemption(signals=["SIGUSR1"], action="continue")) as ckpt:
        handler = ckpt.preemption
        assert handler is not None
        assert ckpt.options.save_on_signal == ("SIGUSR1",)
        assert ckpt.options.signal_action == "continue"
        assert signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL
    assert ckpt.preemption is None


def test_storage_group_sets_the_mirror(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    with Checkpointer(tmp_path / "run", storage=StorageOptions(mirror=str(mirror))) as ckpt:
        assert ckpt.options.mirror == str(mirror)
        ckpt.save({"w": np.arange(3)}, epoch=1)
    assert any(p.name.startswith("epoch=") for p in mirror.iterdir())
    assert "secret" not in repr(StorageOptions(options={"key": "secret"}))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"background": Background(if_busy="skip"), "if_busy": "wait"}, None),  # the default: no conflict
        ({"background": Background(if_busy="skip"), "writer_nice": 3}, "writer_nice=3 conflicts with background="),
        ({"background": Background(snapshot="lazy"), "snapshot": "eager"}, None),  # the default: no conflict
        ({"background": Background(write_rate=50.0), "write_rate": 10.0}, "write_rate=10.0 conflicts with background="),
        ({"preemption": Preemption(action="continue"), "signal_action": "reraise"}, "signal_action='reraise'"),
        ({"preemption": Preemption(), "save_on_signal": ["SIGUSR1"]}, "save_on_signal"),
        ({"storage": StorageOptions(mirror="/x"), "mirror": "/y"}, "mirror='/y' conflicts with storage="),
    ],
)
def test_flat_keyword_contradicting_its_group_is_refused(tmp_path: Path, kwargs: dict, match: str | None) -> None:
    if match is None:
        Checkpointer(tmp_path, lock=False, **kwargs).close()
        return
    with pytest.raises(ConfigError, match=match):
        Checkpointer(tmp_path, **kwargs)


def test_agreeing_flat_keyword_is_accepted(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path, background=Background(if_busy="skip"), if_busy="skip")
    assert ckpt.if_busy == "skip"
    ckpt.close()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Background(if_busy="later"), "if_busy must be 'wait' or 'skip'"),  # type: ignore[arg-type]
        (lambda: Background(nice=40), "writer_nice must be an int from 0 to 19"),
        (lambda: Background(snapshot="later"), "snapshot must be 'eager' or 'lazy'"),  # type: ignore[arg-type]
        (lambda: Background(write_rate=0), "write_rate must be a number of MB/s > 0"),
        (lambda: Preemption(action="stop"), "signal_action must be"),  # type: ignore[arg-type]
        (lambda: Preemption(exit_code="1"), "signal_exit_code must be an int"),  # type: ignore[arg-type]
        (lambda: StorageOptions(options=["k"]), "storage_options must be a dict"),  # type: ignore[arg-type]
    ],
)
def test_groups_check_their_values(make: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make()  # type: ignore[operator]


def test_wrong_group_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="preemption= must be a Preemption"):
        Checkpointer(tmp_path, preemption=Background())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="signal_action must be"):
        Checkpointer(tmp_path, signal_action="stop")  # type: ignore[arg-type]


def test_background_group_carries_snapshot_and_write_rate(tmp_path: Path) -> None:
    grouped = Checkpointer(tmp_path / "g", background=Background(snapshot="lazy", write_rate=200.0))
    flat = Checkpointer(tmp_path / "f", background=True, snapshot="lazy", write_rate=200.0)
    try:
        assert grouped.options == flat.options
        chosen = grouped.options
        assert (chosen.snapshot, chosen.write_rate, chosen.background) == ("lazy", 200.0, True)
        assert grouped.snapshot == "lazy"
    finally:
        grouped.close()
        flat.close()
