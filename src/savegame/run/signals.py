"""Preemption signals: save at the next safe point, then exit.

Clusters warn before they kill. SLURM sends SIGTERM on preemption or ``scancel`` (and the signal chosen
with ``sbatch --signal=USR1@90`` that many seconds before the time limit), then SIGKILL after
``KillWait`` (30 s by default); Kubernetes sends SIGTERM and SIGKILL after
``terminationGracePeriodSeconds`` (30 s). Python's default reaction to SIGTERM is to die on the spot,
losing everything since the last checkpoint.

A :class:`PreemptionHandler` only *records* the signal: it can arrive in the middle of an optimizer step,
when half of the parameters are updated, and a checkpoint taken there would be a state that never
existed. The training loop saves at its next safe point (after a step), then the handler exits::

    with PreemptionHandler() as preempt:              # SIGTERM and SIGUSR1
        for step in range(start, steps):
            train_one_step()
            if preempt.requested:                      # or: preempt.safe_point(save)
                savegame.save(f"runs/exp/step-{step}", state)
                preempt.exit()                         # SystemExit(128 + signal), by default

Immediate saves (opt-in): code *between* steps that may block for long (waiting for the next batch,
an evaluation) can be wrapped in ``with preempt.between_steps(save):``. A signal arriving there runs
``save`` at once, from the signal handler, instead of after the wait; the state is consistent there
because no step is running. Outside such a region nothing happens until the next safe point.

After the save, ``action`` decides what happens:

* ``"exit"`` (default): raise ``SystemExit(exit_code)``; ``exit_code`` defaults to ``128 + signal``,
  the shell's code for "ended by that signal", so launchers and schedulers see a preempted run
  (``finally`` blocks and context managers run, so locks are released and logs flushed);
* ``"reraise"``: restore the previous handlers and raise the signal again: the default action ends
  the process *by the signal* (what the scheduler expects), or the previous Python handler runs;
* ``"continue"``: keep training (the request is cleared; e.g. SIGUSR1 as "save now").

Limits. Python runs signal handlers in the main thread, between bytecodes: a signal that arrives while
the main thread is inside one long C call (a large matmul, a blocking read) is handled when the call
returns. Handlers can only be installed from the main thread (:class:`PreemptionError` otherwise). A
second signal during the save is counted and otherwise ignored: the save is not interrupted.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import Any, Literal

from savegame._util.logs import get_logger
from savegame.errors import CheckpointError, ConfigError

__all__ = ["DEFAULT_SIGNALS", "PreemptionError", "PreemptionHandler", "parse_signal"]

log = get_logger("savegame.run.signals")

Action = Literal["exit", "reraise", "continue"]
SaveCallback = Callable[[int], object]
"""``save(signum)``: writes the checkpoint; its return value is ignored."""

# SIGUSR1, SIGKILL and SIGSTOP do not exist on Windows: only the signals this platform has.
DEFAULT_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)
)
_UNCATCHABLE: set[signal.Signals] = {getattr(signal, name) for name in ("SIGKILL", "SIGSTOP") if hasattr(signal, name)}


class PreemptionError(CheckpointError, RuntimeError):
    """The preemption handler is used where it cannot work (outside the main thread)."""


def parse_signal(spec: int | str | signal.Signals) -> signal.Signals:
    """``"SIGTERM"``, ``"term"``, ``"USR1"``, ``15`` or ``signal.SIGTERM`` -> ``signal.SIGTERM``."""
    try:
        if isinstance(spec, signal.Signals):
            sig = spec
        elif isinstance(spec, int) and not isinstance(spec, bool):
            sig = signal.Signals(spec)
        elif isinstance(spec, str):
            name = spec.strip().upper()
            sig = signal.Signals[name if name.startswith("SIG") else "SIG" + name]
        else:
            raise TypeError
    except (KeyError, ValueError, TypeError):
        raise ConfigError(f"unknown signal {spec!r} (use e.g. 'SIGTERM', 'USR1' or signal.SIGUSR1)") from None
    if sig in _UNCATCHABLE:
        raise ConfigError(f"{sig.name} cannot be caught; preemption needs a catchable signal such as SIGTERM")
    return sig


def _require_main_thread(what: str) -> None:
    if threading.current_thread() is not threading.main_thread():
        raise PreemptionError(
            f"PreemptionHandler.{what} must be called from the main thread: Python delivers signals to "
            f"the main thread only (called from thread {threading.current_thread().name!r})"
        )


class PreemptionHandler:
    """Turns preemption signals into a save at the next safe point, then an exit (module docstring).

    ``signals``: what to catch (names or numbers); SIGTERM and SIGUSR1 by default.
    ``on_preempt``: ``save(signum)``, the default save for :meth:`safe_point` and
    :meth:`between_steps`.
    ``action``: ``"exit"``, ``"reraise"`` or ``"continue"`` after the save.
    ``exit_code``: the code of ``"exit"``; None: ``128 + signal number`` (143 for SIGTERM).

    :meth:`install` (or ``with``) puts the handlers in place; :meth:`close` restores the previous ones.
    """

    def __init__(
        self,
        *,
        signals: Iterable[int | str | signal.Signals] = DEFAULT_SIGNALS,
        on_preempt: SaveCallback | None = None,
        action: Action = "exit",
        exit_code: int | None = None,
    ) -> None:
        if action not in ("exit", "reraise", "continue"):
            raise ConfigError(f"PreemptionHandler: action must be 'exit', 'reraise' or 'continue', got {action!r}")
        if exit_code is not None and (type(exit_code) is not int or not 0 <= exit_code <= 255):
            raise ConfigError(f"PreemptionHandler: exit_code must be an int in 0..255, got {exit_code!r}")
        sigs = [parse_signal(s) for s in ([signals] if isinstance(signals, (int, str)) else signals)]
        if not sigs:
            raise ConfigError("PreemptionHandler: no signals given")
        self.signals: tuple[signal.Signals, ...] = tuple(dict.fromkeys(sigs))
        self.on_preempt = on_preempt
        self.action: Action = action
        self.exit_code = exit_code
        self.count = 0
        """How many of our signals arrived (a scheduler may send several)."""
        self.save_seconds: float | None = None
        """How long the last preemption save took."""
        self._signum: int | None = None
        self._received_at: float | None = None
        self._saving = False
        self._regions: list[SaveCallback | None] = []
        self._previous: dict[signal.Signals, Any] = {}
        self._callback = self._on_signal  # one bound method, so close() can recognise it

    # -- what the loop reads ---------------------------------------------------------------------------
    @property
    def requested(self) -> bool:
        """True once a signal arrived and its save has not run yet."""
        return self._signum is not None

    @property
    def signum(self) -> int | None:
        """The (first) signal received, or None."""
        return self._signum

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self._signum).name if self._signum is not None else None

    def seconds_since_signal(self) -> float | None:
        """Time since the signal arrived (to compare with the grace period), or None."""
        return None if self._received_at is None else time.monotonic() - self._received_at

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    # -- install / close --------------------------------------------------------------------------------
    def install(self) -> PreemptionHandler:
        """Install the handlers (main thread only); return ``self``."""
        _require_main_thread("install()")
        if self._previous:
            return self
        try:
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._callback)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Restore the handlers that were in place before :meth:`install`.

        A handler that someone else installed over ours since is left alone (theirs wins).
        """
        if not self._previous:
            return
        _require_main_thread("close()")
        previous, self._previous = self._previous, {}
        for sig, old in previous.items():
            if signal.getsignal(sig) is self._callback:
                signal.signal(sig, old if old is not None else signal.SIG_DFL)

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the handler --------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self._signum is None:
            self._signum = signum
            self._received_at = time.monotonic()
        if self._saving or not self._regions:
            return  # record only: the loop saves at its next safe point
        self._finish(self._regions[-1])

    # -- saving ---------------------------------------------------------------------------------------
    def safe_point(self, save: SaveCallback | None = None) -> bool:
        """If a signal arrived: run ``save`` (default ``on_preempt``), then the action.

        Call where the training state is consistent (after an optimizer step). Returns False when no
        signal is pending; True after a save when ``action == "continue"``; otherwise does not return
        (``SystemExit`` or the signal's default action).
        """
        _require_main_thread("safe_point()")
        if self._signum is None or self._saving:
            return False
        self._finish(save)
        return True

    @contextmanager
    def between_steps(self, save: SaveCallback | None = None) -> Iterator[PreemptionHandler]:
        """Opt in to immediate saves while the body runs (it must not modify the training state).

        A signal that arrives inside (or arrived before and is still pending) runs ``save`` (default
        ``on_preempt``) right away, then the action. Regions may nest; the innermost save is used.
        """
        _require_main_thread("between_steps()")
        self._regions.append(save)
        try:
            if self._signum is not None and not self._saving:
                self._finish(save)
            yield self
        finally:
            self._regions.pop()

    def _finish(self, save: SaveCallback | None) -> None:
        signum = self._signum
        assert signum is not None
        save = save if save is not None else self.on_preempt
        name = signal.Signals(signum).name
        waited = self.seconds_since_signal() or 0.0
        start = time.monotonic()
        self._saving = True
        try:
            if save is not None:
                save(signum)
        finally:
            self._saving = False
        self.save_seconds = time.monotonic() - start
        if save is not None:
            log.warning(
                "savegame: %s received; saved in %.2f s (%.2f s after the signal)",
                name,
                self.save_seconds,
                waited + self.save_seconds,
            )
        if self.action == "continue":
            self._signum = None
            self._received_at = None
            return
        self.exit()

    def exit(self) -> None:
        """Leave as configured by ``action`` (``"continue"`` only clears the request)."""
        signum = self._signum if self._signum is not None else int(self.signals[0])
        if self.action == "continue":
            self._signum = None
            self._received_at = None
            return
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        if self.action == "reraise":
            self.close()
            signal.raise_signal(signum)
            return  # the previous handler was a Python function or SIG_IGN: it ran, we carry on
        code = self.exit_code if self.exit_code is not None else 128 + signum
        raise SystemExit(code)

    def __repr__(self) -> str:
        names = ",".join(s.name for s in self.signals)
        return f"PreemptionHandler(signals={names}, action={self.action!r}, requested={self.requested})"
