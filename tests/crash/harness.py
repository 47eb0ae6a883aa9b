"""The kill -9 harness: start a training child, SIGKILL it at a random instant, check what is on disk.

One trial:

1. the fork server (``worker.py serve``) forks a training child for a *scenario* (below); it resumes
   from the newest checkpoint of its root (cleaning the previous victim's debris first, as every
   writer does) and saves every 3 steps;
2. once it logged its resume, the parent lets it commit 0 to 3 saves (so every root builds up a
   history of crashes and resumes), waits a random delay of about one save and sends SIGKILL: most
   kills land while a save is in progress. In half of the trials every storage call of the child is
   preceded by a random sleep of up to a few milliseconds, so kills also land between any two steps
   of the commit protocol, not only in the slowest one;
3. :func:`common.check_root` checks the root against the child's event log: every committed checkpoint
   verifies and equals a save that was committed (or was in flight), the newest committed save and
   the one before it are intact, and cleanup removes the debris.

Scenarios (one root each, trials rotate through them, so each root accumulates a history of crashes
and resumes): ``sync-named`` (new name per save, keep 3), ``sync-overwrite`` (always ``last``,
replaced with ``renameat2(RENAME_EXCHANGE)``), ``sync-overwrite-fallback`` (``last`` without
renameat2: the rename-aside path), ``background-named`` (``save(..., background=True)``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .common import check_root, read_events
from .worker import MAIN_PHASES, PHASES

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")

SCENARIOS: dict[str, dict[str, Any]] = {
    "sync-named": {"naming": "named", "background": False},
    "sync-overwrite": {"naming": "overwrite", "background": False},
    "sync-overwrite-fallback": {"naming": "overwrite", "background": False, "exchange": False},
    "background-named": {"naming": "named", "background": True},
    "sync-named-incremental": {"naming": "named", "background": False, "incremental": True},
}


class ForkServer:
    """``worker.py serve`` in a subprocess: forks training children on request."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        ready = self._read()
        if "ready" not in ready:
            raise RuntimeError(f"fork server did not start: {ready}")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server exited with {self.proc.wait()}")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def spawn(self, cfg: dict[str, Any]) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cfg) + "\n")
        self.proc.stdin.flush()
        return int(self._read()["pid"])

    def wait(self, pid: int) -> int:
        """Wait for the child's exit; return its raw wait status."""
        msg = self._read()
        assert msg["pid"] == pid, msg
        return int(msg["status"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class CrashReport:
    """Counts over all trials; ``problems`` lists every loss or breakage found (empty = all good)."""

    trials: int = 0
    kills: int = 0
    kills_during_save: int = 0
    saves_committed: int = 0
    checkpoints_verified: int = 0
    in_flight_committed: int = 0
    debris_cleaned: int = 0
    restored_by_cleanup: int = 0
    newest_intact: int = 0
    previous_intact: int = 0
    previous_checked: int = 0
    by_scenario: Counter[str] = field(default_factory=Counter)
    by_call: Counter[str] = field(default_factory=Counter)
    by_main_phase: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    trials_with_problems: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        calls = ", ".join(f"{k} {v}" for k, v in sorted(self.by_call.items(), key=lambda kv: -kv[1]))
        return (
            f"crash harness: {self.trials} trials, {self.kills} SIGKILLs ({self.kills_during_save} during a save; "
            f"in storage calls: {calls or 'none'}), {self.saves_committed} saves committed, "
            f"{self.checkpoints_verified} checkpoints verified after kills, newest intact {self.newest_intact}/"
            f"{self.trials}, previous intact {self.previous_intact}/{self.previous_checked}, "
            f"{self.in_flight_committed} in-flight saves found committed, {self.debris_cleaned} debris folders "
            f"cleaned, {self.restored_by_cleanup} restored; {len(self.problems)} problems; {self.seconds:.1f} s"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "trials": self.trials, "kills": self.kills, "kills_during_save": self.kills_during_save,
            "saves_committed": self.saves_committed, "checkpoints_verified": self.checkpoints_verified,
            "in_flight_committed": self.in_flight_committed, "debris_cleaned": self.debris_cleaned,
            "restored_by_cleanup": self.restored_by_cleanup, "newest_intact": self.newest_intact,
            "previous_intact": self.previous_intact, "previous_checked": self.previous_checked,
            "by_scenario": dict(self.by_scenario), "by_call": dict(self.by_call),
            "by_main_phase": dict(self.by_main_phase), "problems": len(self.problems),
            "trials_with_problems": self.trials_with_problems,
            "seconds": round(self.seconds, 1),
        }  # fmt: skip


def _wait_for_resume(log: str, start_lines: int, pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = read_events(log)
        if any(ev[0] == "R" for ev in events[start_lines:]):
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.002)
    return False


def _wait_for_commits(log: str, start_lines: int, pid: int, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while count and time.monotonic() < deadline:
        if sum(1 for ev in read_events(log)[start_lines:] if ev[0] == "C") >= count:
            return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.002)


def run_trials(
    workdir: str,
    trials: int,
    *,
    seed: int = 0,
    scenarios: tuple[str, ...] = tuple(SCENARIOS),
    broken: str | None = None,
    max_delay: float = 0.08,
    slow: float = 0.004,
    server: ForkServer | None = None,
) -> CrashReport:
    """Run ``trials`` kill trials in ``workdir`` (see the module docstring) and return the counts.

    ``server``: a running :class:`ForkServer` to use (one is started and stopped otherwise).
    """
    if server is None:
        with ForkServer() as own:
            return run_trials(workdir, trials, seed=seed, scenarios=scenarios, broken=broken,
                              max_delay=max_delay, slow=slow, server=own)  # fmt: skip
    rng = random.Random(seed)
    report = CrashReport()
    start = time.monotonic()
    for i in range(trials):
        scenario = scenarios[i % len(scenarios)]
        root = os.path.join(workdir, scenario)
        log = os.path.join(workdir, f"{scenario}.log")
        phase_file = os.path.join(workdir, f"{scenario}.phase")
        with open(phase_file, "wb") as f:
            f.write(bytes(16))
        before = len(read_events(log))
        cfg = dict(SCENARIOS[scenario], root=root, log=log, phase=phase_file, seed=seed * 100_003 + i,
                   slow=slow if rng.random() < 0.5 else 0.0, broken=broken)  # fmt: skip
        pid = server.spawn(cfg)
        resumed = _wait_for_resume(log, before, pid, timeout=60)
        if resumed:
            # Let the child commit 0-3 saves first (so each root builds a history), then kill after a
            # random delay of about one save: most kills land inside a save, some between saves.
            _wait_for_commits(log, before, pid, rng.randint(0, 3), timeout=60)
            time.sleep(rng.uniform(0.0, max_delay))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        status = server.wait(pid)
        report.trials += 1
        report.by_scenario[scenario] += 1
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            err = _read_text(log + ".err")
            report.problems.append(f"trial {i} ({scenario}): child ended by itself (status {status}): {err}")
            report.trials_with_problems += 1
            continue
        report.kills += 1
        with open(phase_file, "rb") as f:
            main_code, call_code = f.read(2)
        events = read_events(log)
        trial_events = events[before:]
        in_save = _save_in_progress(trial_events)
        report.kills_during_save += in_save
        report.by_main_phase[MAIN_PHASES[main_code]] += 1
        if call_code:
            report.by_call[PHASES[call_code]] += 1
        report.saves_committed += sum(1 for ev in trial_events if ev[0] == "C")
        result = check_root(root, events)
        report.checkpoints_verified += result.verified
        report.in_flight_committed += result.in_flight_committed
        report.debris_cleaned += result.cleaned
        report.restored_by_cleanup += result.restored
        report.newest_intact += result.newest_ok
        if result.previous_ok is not None:
            report.previous_checked += 1
            report.previous_intact += result.previous_ok
        for problem in result.problems:
            report.problems.append(f"trial {i} ({scenario}, kill in {PHASES[call_code]}): {problem}")
        report.trials_with_problems += bool(result.problems)
    report.seconds = time.monotonic() - start
    return report


def _save_in_progress(events: list[tuple[str, ...]]) -> bool:
    """Whether the trial's last save had started (S) and not returned (C) when the kill came."""
    open_saves = 0
    for ev in events:
        if ev[0] == "S":
            open_saves += 1
        elif ev[0] == "C":
            open_saves -= 1
    return open_saves > 0


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()[-2000:]
    except FileNotFoundError:
        return ""
