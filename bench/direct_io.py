"""Direct vs buffered writes of one data file, through savegame's own sink (``LocalFileSink``).

``python -m bench.direct_io [--sizes 16,64,313,1024] [--reps 5]`` writes one file of each size from an
unaligned source buffer (as a live tensor or a snapshot buffer is), fsyncs it, and measures wall time
and the process's CPU seconds (user + system, every thread), buffered (``FileOps.direct_io = False``) and
direct (:mod:`savegame.storage.local.direct`), interleaved, medians. The CPU seconds are what a
background save takes from training; the kernel's writeback threads that a buffered write also keeps
busy are not in them (so buffered looks better than it is).

Writes ``bench/results/direct_io.md`` and ``.json``; ``make bench`` runs it after the main benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from savegame.storage.local import FileOps, LocalFileSink

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WRITE_BYTES = 64 << 20  # the tensor-file writer's largest write


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_once(path: str, source: memoryview, *, direct_io: bool) -> tuple[float, float]:
    """(wall s, CPU s) of one file written with ``source``'s bytes and fsynced."""
    ops = FileOps()
    ops.direct_io = direct_io
    if os.path.exists(path):
        os.unlink(path)
    cpu, wall = _cpu(), time.perf_counter()
    sink = LocalFileSink(path, ops)
    for start in range(0, len(source), WRITE_BYTES):
        sink.write(source[start : start + WRITE_BYTES])
    sink.close()
    return time.perf_counter() - wall, _cpu() - cpu


def measure(sizes_mib: list[int], reps: int, tmp: str) -> list[dict[str, Any]]:
    rows = []
    for mib in sizes_mib:
        source = memoryview(bytearray(os.urandom(1 << 20) * mib))[7:]  # unaligned, as tensors may be
        path = os.path.join(tmp, f"direct-io-{mib}.bin")
        runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for rep in range(reps):
            for direct_io in (rep % 2 == 0, rep % 2 != 0):  # alternate which goes first
                runs[direct_io].append(write_once(path, source, direct_io=direct_io))
        os.unlink(path)
        row: dict[str, Any] = {"mib": mib}
        for direct_io, label in ((False, "buffered"), (True, "direct")):
            row[f"{label}_wall_s"] = statistics.median(w for w, _ in runs[direct_io])
            row[f"{label}_cpu_s"] = statistics.median(c for _, c in runs[direct_io])
        rows.append(row)
        print(f"{mib} MiB: buffered {row['buffered_wall_s'] * 1e3:.0f} ms wall / {row['buffered_cpu_s'] * 1e3:.0f} "
              f"ms CPU, direct {row['direct_wall_s'] * 1e3:.0f} ms / {row['direct_cpu_s'] * 1e3:.0f} ms", flush=True)
    return rows


def report(rows: list[dict[str, Any]], reps: int) -> str:
    lines = [
        "# Direct vs buffered writes of one data file",
        "",
        f"Run {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} with `python -m bench.direct_io`: {reps} "
        f"repetitions, interleaved, medians; {platform.platform()}, {os.cpu_count()} CPUs. One file of each size "
        "written from an unaligned buffer through savegame's `LocalFileSink` and fsynced. CPU = the process's "
        "user + system seconds (all threads; the kernel's writeback threads, which buffered writes keep busy, "
        "are not counted).",
        "",
        "| size | buffered wall | direct wall | wall, buffered / direct | buffered CPU | direct CPU "
        "| CPU, buffered / direct |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mib']} MiB | {r['buffered_wall_s'] * 1e3:.0f} ms | {r['direct_wall_s'] * 1e3:.0f} ms | "
            f"{r['buffered_wall_s'] / r['direct_wall_s']:.2f}x | {r['buffered_cpu_s'] * 1e3:.0f} ms | "
            f"{r['direct_cpu_s'] * 1e3:.0f} ms | {r['buffered_cpu_s'] / max(r['direct_cpu_s'], 1e-9):.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,64,313,1024", help="file sizes in MiB, comma-separated")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tmp", default=str(HERE), help="directory to write in (default: bench/, same fs as /work)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix=".direct-io-") as tmp:
        rows = measure(sizes, args.reps, tmp)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "direct_io.md").write_text(report(rows, args.reps))
    (out / "direct_io.json").write_text(json.dumps({"reps": args.reps, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out / 'direct_io.md'}")


if __name__ == "__main__":
    main()
