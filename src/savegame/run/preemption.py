"""Preemption glue between the Checkpointer and :mod:`savegame.run.signals`: which signals
``save_on_signal=`` means (:func:`install_preemption`) and what the Checkpointer does once one arrived
(:func:`save_for_preemption`: make sure the state is durably saved, then exit, re-raise the signal or
keep training per ``signal_action``). The signal handling itself (recording a signal, safe points,
exit codes) lives in :mod:`savegame.run.signals`; moved here verbatim from the Checkpointer.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

from savegame._util.logs import get_logger
from savegame.policies import Progress
from savegame.run.events import PreemptionInfo
from savegame.run.records import SaveResult
from savegame.run.saving import save_state, settle
from savegame.run.signals import DEFAULT_SIGNALS, PreemptionHandler

if TYPE_CHECKING:
    from savegame.run.checkpointer import Checkpointer

__all__ = ["immediate_saves", "install_preemption", "save_for_preemption"]

log = get_logger("savegame.run.checkpointer")


def install_preemption(
    save_on_signal: bool | Iterable[int | str], *, action: Literal["exit", "reraise", "continue"],
    exit_code: int | None,
) -> PreemptionHandler | None:  # fmt: skip
    """The installed handler for ``save_on_signal`` (True: SIGTERM and SIGUSR1; a signal or a list of
    names or numbers), or None for False (signal handling left alone)."""
    if save_on_signal is False:
        return None
    if save_on_signal is True:
        signals: tuple[int | str, ...] = DEFAULT_SIGNALS
    elif isinstance(save_on_signal, (str, int)):  # one signal: "SIGTERM", 15
        signals = (save_on_signal,)
    else:
        signals = tuple(save_on_signal)
    return PreemptionHandler(
        signals=signals, action=action, exit_code=exit_code
    ).install()


def save_for_preemption(
    ckpt: Checkpointer, state: Mapping[str, Any], progress: Progress, result: SaveResult | None,
    metadata: Mapping[str, Any] | None,
) -> SaveResult | None:  # fmt: skip
    """A preemption signal arrived (on any rank): make sure this state is durably saved, then act
    per ``signal_action`` (exit, re-raise the signal, or return and keep training)."""
    handler = ckpt._preemption
    assert handler is not None
    started = time.monotonic()
    name = handler.signal_name or "a signal on another rank"
    if result is None or result.skipped:  # a save coalesced into the one in flight wrote nothing
        extra = {**dict(metadata or {}), "preempted_by": name}
        result = save_state(ckpt, state, progress, name=None, metadata=extra, pin=False)
    settle(ckpt)  # a background save must be committed before the process goes
    seconds = time.monotonic() - started
    since = handler.seconds_since_signal()
    ckpt._events.emit("on_preemption_saved", PreemptionInfo(
        name, result.name, result.path, seconds, since if handler.signal_name else None))  # fmt: skip
    handler.save_seconds = seconds
    ckpt.preempted = name
    if handler.action != "continue":
        ckpt.close()
    handler.exit()
    return result


@contextmanager
def immediate_saves(ckpt: Checkpointer, state: Mapping[str, Any], progress: Progress) -> Iterator[None]:
    """``Checkpointer.between_steps``'s region: a preemption signal arriving inside saves ``state`` at
    ``progress`` at once (from the signal handler), waits until it is durable, then acts per
    ``signal_action``."""
    assert ckpt._preemption is not None

    def save(signum: int) -> None:
        started = time.monotonic()
        signal = ckpt._preemption.signal_name if ckpt._preemption else None
        result = save_state(ckpt, state, progress, name=None, metadata={"preempted_by": signal or signum}, pin=False)
        settle(ckpt)
        since = ckpt._preemption.seconds_since_signal() if ckpt._preemption else None
        ckpt._events.emit("on_preemption_saved", PreemptionInfo(
            signal or str(signum), result.name, result.path, time.monotonic() - started, since))  # fmt: skip
        if ckpt._preemption is not None and ckpt._preemption.action != "continue":
            ckpt.close()

    with ckpt._preemption.between_steps(save):
        yield
