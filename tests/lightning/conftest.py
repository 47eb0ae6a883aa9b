"""Lightning test set-up: skipped where the ``lightning`` package (extra ``lightning``) is not installed."""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

if importlib.util.find_spec("lightning") is None:
    collect_ignore_glob = ["test_*.py"]
