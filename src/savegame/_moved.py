"""Old import paths of the modules that moved into layer packages (0.x flat layout), kept for one release.

``import savegame.checkpointer`` (or ``from savegame import manifest``) still works: a finder on
``sys.meta_path`` answers for exactly the names in :data:`MOVED`, imports the module at its new path,
puts that same module object under the old name (so attributes, monkeypatching and ``isinstance`` all
agree) and warns once with a :class:`DeprecationWarning` naming the new path. Nothing else is touched:
an unknown name falls through to the normal import system. Remove in the release after next.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

from savegame._util.logs import warn

MOVED: dict[str, str] = {
    "savegame.safetext": "savegame._util.safetext",
    "savegame.progress": "savegame._util.progress",
    "savegame.workers": "savegame._util.workers",
    "savegame.gcpause": "savegame._util.gcpause",
    "savegame.processes": "savegame._util.processes",
    "savegame.copyqueue": "savegame._util.copyqueue",
    "savegame.autointerval": "savegame.policies.autointerval",
    "savegame.knobs": "savegame.policies.knobs",
    "savegame.knob_policies": "savegame.policies.knob_policies",
    "savegame.dtypes": "savegame.format.dtypes",
    "savegame.tree": "savegame.format.tree",
    "savegame.tensorfile": "savegame.format.tensorfile",
    "savegame.manifest": "savegame.format.manifest",
    "savegame.hashing": "savegame.format.hashing",
    "savegame.naming": "savegame.format.naming",
    "savegame.checks": "savegame.format.checks",
    "savegame.capture": "savegame.engine.capture",
    "savegame.writer": "savegame.engine.writer",
    "savegame.background": "savegame.engine.background",
    "savegame.verifier": "savegame.engine.verifier",
    "savegame.write_loop": "savegame.engine.write_loop",
    "savegame.mirror": "savegame.engine.mirror",
    "savegame.dcp": "savegame.distributed.dcp",
    "savegame.checkpointer": "savegame.run.checkpointer",
    "savegame.run_index": "savegame.run.index",
    "savegame.records": "savegame.run.records",
    "savegame.save_naming": "savegame.run.save_naming",
    "savegame.saving": "savegame.run.saving",
    "savegame.retention": "savegame.run.retention",
    "savegame.resume": "savegame.run.resume",
    "savegame.preemption": "savegame.run.preemption",
    "savegame.run_checks": "savegame.run.checks",
    "savegame.coordination": "savegame.run.coordination",
    "savegame.lock": "savegame.run.lock",
    "savegame.signals": "savegame.run.signals",
    "savegame.cli_common": "savegame.cli.common",
    "savegame.cli_diff": "savegame.cli.diff",
    "savegame.cli_manage": "savegame.cli.manage",
    "savegame.cli_output": "savegame.cli.output",
    "savegame.cli_read": "savegame.cli.read",
    "savegame.cli_scan": "savegame.cli.scan",
    "savegame.plot": "savegame.cli.plot",
    "savegame.demo": "savegame.cli.demo",}
"""Old module path -> new module path."""


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path of :data:`MOVED` to the module at its new path."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # a throwaway module; exec_module replaces it in sys.modules

    def exec_module(self, module: ModuleType) -> None:
        old = module.__name__
        new = MOVED[old]
        warn(
            f"{old} moved to {new}; the old import path works until the next release. Import {new} "
            "(or the public name from savegame) instead.",
            DeprecationWarning,
            stacklevel=2,
        )
        # The import system returns whatever sys.modules holds under the name once exec_module is done.
        sys.modules[old] = importlib.import_module(new)


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (idempotent: importing savegame twice adds nothing)."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
