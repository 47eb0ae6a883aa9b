"""``pytest`` from the repository root must collect every test file.

The test folders are not packages (no ``__init__.py``), so pytest imports each test file under its basename:
two files with the same basename in different folders make collection fail ("import file mismatch"), which
is what ``tests/test_examples.py`` and ``tests/keras/test_examples.py`` once did.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_test_module_basenames_are_unique_outside_packages() -> None:
    by_name: dict[str, list[Path]] = defaultdict(list)
    for path in TESTS.rglob("test_*.py"):
        if (path.parent / "__init__.py").exists():
            continue  # a package: imported under its dotted name, no clash
        by_name[path.name].append(path.relative_to(TESTS))
    clashes = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert not clashes, f"test files that share a basename break collection from the root: {clashes}"
