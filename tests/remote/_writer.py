"""A writer process for the interruption tests: ``python _writer.py URL OPTIONS_JSON MIB``.

Saves a state of MIB MiB to URL and prints ``PART <n>`` (flushed) each time an upload part is stored,
so the test can SIGKILL it at a known point in the middle of the upload.
"""

from __future__ import annotations

import json
import sys
import threading

import numpy as np

import savegame
from savegame.storage import remote


def main() -> None:
    url, options, mib = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    original = remote._MultipartSink._put_part

    lock = threading.Lock()

    def announcing(self: remote._MultipartSink, number: int, body: bytearray | memoryview, recycle: bool) -> None:
        original(self, number, body, recycle)
        with lock:  # parts finish on several threads: one whole line each (print writes text and "\n" apart)
            sys.stdout.write(f"PART {number}\n")
            sys.stdout.flush()

    remote._MultipartSink._put_part = announcing  # type: ignore[method-assign]
    state = {"model": {"w": np.random.default_rng(0).random((mib << 20) // 8)}, "epoch": 2}
    savegame.save(url, state, storage_options=options)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
