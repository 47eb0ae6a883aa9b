"""Regenerate the figures of docs/reliability.md by running the reliability suites.

    python tests/crash/report.py                 # 500 kills; rewrites the figures section in place
    python tests/crash/report.py --trials 50     # quicker
    python tests/crash/report.py --stdout        # print the section instead of writing the file

Runs ``pytest`` on the crash harness, fault injection, corruption/hostile, lock, signal and concurrency
suites with ``SAVEGAME_FIGURES`` pointing at a temporary file (the tests append what they measured, see
``figures.py``), then renders that into the part of ``docs/reliability.md`` between the
``<!-- figures:begin -->`` and ``<!-- figures:end -->`` markers. The prose around it is hand-written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "reliability.md")
SUITES = [
    "tests/crash",
    "tests/test_faults.py",
    "tests/test_hostile.py",
    "tests/test_corruption.py",
    "tests/test_lock.py",
    "tests/test_signals.py",
    "tests/test_concurrency.py",
]
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"


def run_suites(trials: int, fuzz: int) -> tuple[dict[tuple[str, str], Any], dict[str, Any]]:
    """Run the suites; return the recorded figures and the pytest outcome counts and xfail reasons."""
    with tempfile.TemporaryDirectory(prefix="savegame-report-") as tmp:
        figures_path = os.path.join(tmp, "figures.jsonl")
        junit = os.path.join(tmp, "junit.xml")
        env = dict(os.environ, SAVEGAME_FIGURES=figures_path, SAVEGAME_CRASH_TRIALS=str(trials),
                   SAVEGAME_FUZZ_EXAMPLES=str(fuzz))  # fmt: skip
        suites = [s for s in SUITES if os.path.exists(os.path.join(ROOT, s))]
        cmd = [sys.executable, "-m", "pytest", *suites, "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        print("running:", " ".join(cmd), file=sys.stderr)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, check=False)
        figures = _read_figures(figures_path)
        outcomes = _read_junit(junit)
        outcomes["exit"] = proc.returncode
    return figures, outcomes


def _read_figures(path: str) -> dict[tuple[str, str], Any]:
    out: dict[tuple[str, str], Any] = {}
    sums: dict[tuple[str, str], int] = defaultdict(int)
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            key = (rec["section"], rec["key"])
            value = rec["value"]
            if isinstance(value, dict) and set(value) == {"add"}:
                sums[key] += int(value["add"])
            else:
                out[key] = value
    out.update(sums)
    return out


def _read_junit(path: str) -> dict[str, Any]:
    result: dict[str, Any] = {"passed": 0, "failed": 0, "xfailed": 0, "skipped": 0, "xfail_reasons": []}
    if not os.path.exists(path):
        return result
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        failure = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if failure is not None:
            result["failed"] += 1
        elif skipped is not None and skipped.get("type") == "pytest.xfail":
            result["xfailed"] += 1
            result["xfail_reasons"].append((name, skipped.get("message", "")))
        elif skipped is not None:
            result["skipped"] += 1
        else:
            result["passed"] += 1
    return result


def _versions() -> str:
    import numpy
    import torch

    import savegame

    fs = subprocess.run(["df", "-T", tempfile.gettempdir()], capture_output=True, text=True, check=False)
    fstype = fs.stdout.splitlines()[-1].split()[1] if fs.returncode == 0 and fs.stdout else "?"
    return (f"savegame {savegame.__version__}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"numpy {numpy.__version__}, {platform.system()} {platform.release()}, {os.cpu_count()} CPUs, "
            f"temporary files on {fstype}")  # fmt: skip


def render(figures: dict[tuple[str, str], Any], outcomes: dict[str, Any], trials: int, fuzz: int) -> str:
    g = figures.get
    lines = [
        BEGIN,
        "",
        f"_Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC by `python tests/crash/report.py "
        f"--trials {trials}` ({_versions()}). Test run: {outcomes['passed']} passed, {outcomes['failed']} failed, "
        f"{outcomes['xfailed']} known bugs (strict xfail), {outcomes['skipped']} skipped._",
        "",
    ]
    kill = g(("crash", "kill9"))
    if kill:
        calls = ", ".join(f"{k} {v}" for k, v in sorted(kill["by_call"].items(), key=lambda kv: -kv[1]))
        scen = ", ".join(f"{k} {v}" for k, v in sorted(kill["by_scenario"].items()))
        lines += [
            "### kill -9 at random instants (`tests/crash/test_crash.py`)",
            "",
            "| SIGKILLs | during a save | saves committed | checkpoints verified after the kills | newest intact "
            "| previous intact | committed saves lost | torn checkpoints visible |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {kill['kills']} | {kill['kills_during_save']} | {kill['saves_committed']} | "
            f"{kill['checkpoints_verified']} | {kill['newest_intact']}/{kill['trials']} | "
            f"{kill['previous_intact']}/{kill['previous_checked']} | {kill['problems']} | {kill['problems']} |",
            "",
            f"Scenarios: {scen}. Kills that landed inside a storage call: {calls}. In-flight saves found "
            f"committed after the kill (allowed: their content was exactly the state being saved): "
            f"{kill['in_flight_committed']}. Debris folders removed by the next writer's cleanup: "
            f"{kill['debris_cleaned']}; checkpoints put back by cleanup: {kill['restored_by_cleanup']}. "
            f"Wall time {kill['seconds']} s.",
            "",
        ]
    broken = g(("crash", "kill9_broken"))
    if broken:
        lines += [f"With the protocol deliberately broken (`publish-early`: folder visible before its data), "
                  f"{broken.get('trials_with_problems', '?')} of {broken['trials']} trials reported a torn or lost "
                  "checkpoint (or a resume that crashed on one): the harness can fail.", ""]  # fmt: skip
    real = g(("powerloss", "real"))
    if real:
        lines += [
            "### Power loss after every system call (`tests/crash/powerloss.py`)",
            "",
            f"{real['crash_points']} crash points x 2 durability models = {real['trees']} on-disk states rebuilt "
            f"from the recorded calls; {real['verified']} checkpoints verified in them; {real['problems']} "
            "committed saves lost or torn.",
        ]
        for kind in ("no-fsync", "no-dirsync"):
            b = g(("powerloss", kind))
            if b:
                lines.append(f"With `{kind}`: {b['problems']} problems reported over {b['crash_points']} crash "
                             "points (the replay can fail).")  # fmt: skip
        lines.append("")
    faults = {k[1]: v for k, v in figures.items() if k[0] == "faults" and "/" in k[1]}
    if faults:
        kinds = sorted({k.split("/")[0] for k in faults})
        errs = sorted({k.split("/")[1] for k in faults})
        lines += [
            "### Fault injection (`tests/test_faults.py`)",
            "",
            "Faults injected at the 1st, 2nd, ... call of each kind until the save succeeded, over three "
            "scenarios (new name, overwrite with `renameat2`, overwrite without). Every one gave a typed "
            "`StorageError` with the injected errno, left nothing visible, the previous checkpoints intact "
            "and the disk usage as before (a failed fsync of the root after the rename included: the "
            "rename is undone), and no failed fsync was retried.",
            "",
            "| call | " + " | ".join(errs) + " |",
            "|---|" + "---:|" * len(errs),
        ]
        lines += [f"| {k} | " + " | ".join(str(faults.get(f"{k}/{e}", 0)) for e in errs) + " |" for k in kinds]
        tmpfs = g(("faults", "tmpfs_enospc"))
        lines += ["", f"Real 2 MiB tmpfs filling up: {tmpfs if tmpfs is not None else 'skipped (not root)'} "
                  "ENOSPC saves (new name, overwrite, background), all rejected cleanly; space freed by "
                  "retention made the next save succeed.", ""]  # fmt: skip
    corr = {k[1]: v for k, v in figures.items() if k[0] == "corruption"}
    host = {k[1]: v for k, v in figures.items() if k[0] == "hostile"}
    if corr or host:
        lines += ["### Corruption and hostile inputs (`tests/test_hostile.py`, `tests/test_corruption.py`)", ""]
        lines += [f"- {k}: {v}, 100% detected by `verify`" for k, v in sorted(corr.items())]
        lines += [f"- {k}: {v}, all rejected with a `CheckpointError` within the memory/time budget" for k, v in
                  sorted(host.items())]  # fmt: skip
        lines += [f"- fuzzing (hypothesis): {fuzz} examples per parser test (manifest: signed structural "
                  "mutations and raw bytes; tensor-file header: structured and raw); nothing but "
                  "`CheckpointError` escaped, every accepted header was self-consistent", ""]  # fmt: skip
    conc = [(k[1], v) for k, v in figures.items() if k[0] == "concurrency"]
    if conc:
        lines += ["### Readers during writes (`tests/test_concurrency.py`)", ""]
        for key, v in sorted(conc):
            lines.append(f"- {key}: " + ", ".join(f"{a} {b}" for a, b in v.items()))
        lines.append("")
    sig = [(k[1], v) for k, v in figures.items() if k[0] == "signals"]
    if sig:
        lines += ["### Preemption signals (`tests/test_signals.py`)", ""]
        lines += [f"- {k}: {v} s from the signal to the process's exit (grace period 30 s)" for k, v in sorted(sig)]
        lines.append("")
    if outcomes["xfail_reasons"]:
        lines += ["### Known bugs (strict xfail: the test turns red when the bug is fixed)", ""]
        for name, reason in outcomes["xfail_reasons"]:
            lines.append(f"- `{name}`: {reason.replace('reason: ', '')}")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=500, help="SIGKILL trials (default 500)")
    parser.add_argument("--fuzz", type=int, default=1000, help="hypothesis examples per fuzz test")
    parser.add_argument("--stdout", action="store_true", help="print the section instead of updating the doc")
    args = parser.parse_args()
    figures, outcomes = run_suites(args.trials, args.fuzz)
    section = render(figures, outcomes, args.trials, args.fuzz)
    if args.stdout:
        print(section)
    else:
        with open(DOC) as f:
            doc = f.read()
        if BEGIN not in doc or END not in doc:
            raise SystemExit(f"{DOC}: no {BEGIN} ... {END} section to update")
        head, rest = doc.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        with open(DOC, "w") as f:
            f.write(head + section + tail)
        print(f"updated {DOC}", file=sys.stderr)
    if outcomes["exit"] != 0:
        raise SystemExit(f"some tests failed (pytest exit {outcomes['exit']}): the figures are not a clean run")


if __name__ == "__main__":
    main()
