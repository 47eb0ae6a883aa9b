"""Peak memory of an upload to S3: a 1 GiB checkpoint streamed to a real S3-compatible server.

``python -m bench.remote_upload [--mib 1024]`` starts moto's S3 server on 127.0.0.1 (a free port), runs
``tests/remote/_rss_upload.py`` in a fresh process (a torch state of ``--mib`` MiB: twelve large tensors
and an optimizer-like one; warm-up, reset of the kernel's RSS high-water mark, one ``savegame.save`` to
``s3://...``) and reports (state + peak RSS growth) / state, which issue 7 requires under 1.25x: whole
multipart parts go from tensor memory to the socket, only part-sized remainders are buffered.

Writes ``bench/results/remote_upload.md`` and ``.json``. ``make bench`` runs it after the main benchmark.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPT = ROOT / "tests" / "remote" / "_rss_upload.py"
RESULTS = HERE / "results"
REQUIRED = 1.25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(mib: int) -> dict[str, Any]:
    """Start moto, upload a ``mib`` MiB state from a fresh process, return its measurements."""
    import fsspec
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench-secret",
                   "config_kwargs": {"retries": {"max_attempts": 3}}}  # fmt: skip
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        fsspec.filesystem("s3", **options).mkdir(bucket)
        env = dict(os.environ, AWS_DEFAULT_REGION="us-east-1", OMP_NUM_THREADS="1")
        out = subprocess.run(
            [sys.executable, str(SCRIPT), f"s3://{bucket}/run/big", json.dumps(options), str(mib)],
            capture_output=True, text=True, timeout=1800, env=env,
        )  # fmt: skip
        if out.returncode != 0:
            raise SystemExit(f"upload failed ({out.returncode}):\n{out.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.stop()
    extra = max(0, result["peak"] - result["baseline"])
    result["ratio"] = (result["state_bytes"] + extra) / result["state_bytes"]
    result["extra_bytes"] = extra
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="state size in MiB (default 1024)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write remote_upload.md/.json")
    args = parser.parse_args(argv)
    started = time.time()
    result = measure(args.mib)
    met = result["ratio"] < REQUIRED
    mb = result["state_bytes"] / 1e6
    lines = [
        "# savegame benchmark: upload to S3 (moto server on 127.0.0.1)",
        "",
        f"Run {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(started))} with `python -m bench.remote_upload "
        f"--mib {args.mib}` on {platform.platform()}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs.",
        "",
        "| state | upload time | MB/s | peak RSS growth | (state + growth) / state | required | met |",
        "|---:|---:|---:|---:|---:|---:|:---:|",
        f"| {mb:.1f} MB | {result['seconds']:.2f} s | {mb / result['seconds']:.0f} | "
        f"{result['extra_bytes'] / 2**20:.1f} MiB | {result['ratio']:.3f}x | < {REQUIRED}x | "
        f"{'met' if met else '**not met**'} |",
        "",
        f"Peak measured with {result['method']} (kernel high-water mark reset after warm-up). The server runs in "
        "the benchmarking process, the upload in a fresh one, so the server's own buffers are not counted.",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "remote_upload.md").write_text("\n".join(lines) + "\n")
    (args.out / "remote_upload.json").write_text(json.dumps({"mib": args.mib, **result, "met": met}, indent=1) + "\n")
    print("\n".join(lines))
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
