"""The import graph of ``src/savegame``, read with ``ast`` (nothing is imported):

* no cycle among module-level imports;
* every import (module-level or inside a function) goes to the same or a lower layer of :data:`LAYERS`
  (docs/architecture.md's order, DESIGN.md's target), except the pairs in :data:`KNOWN_UPWARD`, a set
  that may only shrink (an entry whose import is gone fails the test, so it is removed with the fix);
* framework code only where it belongs: outside :data:`FRAMEWORK_MODULES` no module probes
  ``sys.modules`` for torch or imports torch at module level (the core asks ``savegame.adapters``).

When the package layout moves modules into ``format/``, ``storage/``, ``engine/``... only :data:`LAYERS`
changes: map the new module names (or their package prefix) to the same layer names.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "savegame"

LAYER_ORDER = (
    "_util", "errors", "policies", "format", "storage", "adapters", "engine", "api", "export",
    "distributed", "run", "config", "integrations", "cli", "package",
)  # fmt: skip
"""Layers from the bottom up: a module imports only from its own layer or one below it.

``_util`` sits below ``errors`` (DESIGN.md draws it the other way) because every error message is
escaped by ``safetext`` (untrusted text on a terminal), a dependency-free utility."""

LAYERS: dict[str, str] = {
    # A package's entry covers every module in it (see _layer); single modules are listed by name.
    "savegame._util": "_util", "savegame._version": "_util", "savegame._moved": "_util",
    "savegame.errors": "errors",
    "savegame.policies": "policies",  # values, save/keep policies, auto interval, knobs and presets
    "savegame.format": "format",  # dtypes, tree codec, tensor files, manifest, hashing, name rules, node checks
    "savegame.storage": "storage",  # protocol, local, remote, staging liveness
    "savegame.adapters": "adapters", "savegame.data": "adapters",  # the only place that knows a framework
    # capture, encode, the write loop, background snapshots, the verifier, and the mirror (it copies
    # between two storages through the verifier, hash while copying; only the run layer uses it)
    "savegame.engine": "engine",
    "savegame.api": "api",
    "savegame.export": "export",
    "savegame.distributed": "distributed",
    "savegame.run": "run",  # the Checkpointer and what it orchestrates
    "savegame.config": "config",
    # the framework integrations: each a thin public module, imported only by its users
    "savegame.keras": "integrations", "savegame.accelerate": "integrations", "savegame.transformers": "integrations",
    "savegame.ray": "integrations", "savegame.lightning": "integrations", "savegame.plain_values": "integrations",
    "savegame.events": "integrations",  # the public event protocol and the TensorBoard / MLflow / W&B loggers
    "savegame.importers": "integrations",  # checkpoints of other tools in (savegame.convert, `savegame import`)
    "savegame.cli": "cli",
    "savegame": "package",
}  # fmt: skip

KNOWN_UPWARD: set[tuple[str, str]] = set()
"""Imports from a lower layer into a higher one that the layout still has (none now). Only shrinks."""

FRAMEWORK_MODULES = (
    "savegame.adapters", "savegame.data", "savegame.distributed", "savegame.keras", "savegame.accelerate",
    "savegame.transformers", "savegame.importers", "savegame.ray",
    "savegame.lightning", "savegame.events", "savegame.cli.demo",
)  # fmt: skip
"""Framework code by nature, allowed to import torch / keras at module level and probe ``sys.modules``:
the adapters, the torch data samplers (``savegame.data``), torch DCP and ``torch.distributed``
support, the framework integrations, the event loggers (TensorBoard's writer is
``torch.utils.tensorboard``) and the demo (``savegame.cli.demo``: its child is a torch training program,
the user's side of the API, that uses savegame only through ``Checkpointer``). Every other module asks
``savegame.adapters``, at module level and inside functions alike."""



@dataclass
class Module:
    """One module's savegame imports: at module level (run on import) and inside functions (lazy)."""

    name: str
    path: Path
    top: set[str] = field(default_factory=set)
    lazy: set[str] = field(default_factory=set)
    torch_top: list[int] = field(default_factory=list)  # lines of module-level torch imports
    torch_lazy: list[int] = field(default_factory=list)
    torch_probes: list[int] = field(default_factory=list)  # lines that look torch up in sys.modules


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _targets(node: ast.Import | ast.ImportFrom, *, package: str, known: set[str]) -> list[str]:
    """The savegame modules an import statement loads (``from . import api`` loads ``savegame.api``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == "savegame" or a.name.startswith("savegame.")]
    if node.level:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        origin = ".".join(base + ([node.module] if node.module else []))
    else:
        origin = node.module or ""
    if origin != "savegame" and not origin.startswith("savegame."):
        return []
    return [f"{origin}.{a.name}" if f"{origin}.{a.name}" in known else origin for a in node.names]


def _is_torch_import(node: ast.Import | ast.ImportFrom) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name == "torch" or a.name.startswith("torch.") for a in node.names)
    return node.level == 0 and node.module is not None and (node.module == "torch" or node.module.startswith("torch."))


def _is_sys_modules(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "modules" and isinstance(node.value, ast.Name) \
        and node.value.id == "sys"  # fmt: skip


def _mentions_torch(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.split(".")[0] == "torch"


def _is_torch_probe(node: ast.AST) -> bool:
    """``sys.modules["torch"]``, ``sys.modules.get("torch")`` or ``"torch" in sys.modules``."""
    if isinstance(node, ast.Subscript):
        return _is_sys_modules(node.value) and _mentions_torch(node.slice)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _is_sys_modules(node.func.value):
        return any(_mentions_torch(a) for a in node.args)
    if isinstance(node, ast.Compare):
        return _mentions_torch(node.left) and any(_is_sys_modules(c) for c in node.comparators)
    return False


def _is_type_checking(node: ast.AST) -> bool:
    """An ``if TYPE_CHECKING:`` block without ``else``."""
    if not isinstance(node, ast.If) or node.orelse:
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _scan() -> dict[str, Module]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {_module_name(p) for p in paths}
    modules: dict[str, Module] = {}
    for path in paths:
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        mod = Module(name, path)

        def visit(node: ast.AST, in_function: bool, mod: Module = mod, package: str = package) -> None:
            for child in ast.iter_child_nodes(node):
                if _is_type_checking(child):  # imports for the type checker only: never run
                    continue
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    found = set(_targets(child, package=package, known=known)) - {mod.name}
                    (mod.lazy if in_function else mod.top).update(found)
                    if _is_torch_import(child):
                        (mod.torch_lazy if in_function else mod.torch_top).append(child.lineno)
                if _is_torch_probe(child):
                    mod.torch_probes.append(getattr(child, "lineno", 0))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), False)
        modules[name] = mod
    return modules


MODULES = _scan()


def _layer(module: str) -> int:
    """The layer index of ``module`` (its own entry, else its nearest package's)."""
    owner = _owner(module)
    assert owner is not None, f"{module} has no layer"
    return LAYER_ORDER.index(LAYERS[owner])


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := dfs(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := dfs(start)) is not None:
            return found
    return None


def test_the_scan_sees_the_package() -> None:
    """Sanity: the walker finds the modules and both kinds of import (a broken walker would pass all)."""
    assert {"savegame", "savegame.api", "savegame.engine.writer", "savegame.storage.local"} <= MODULES.keys()
    assert "savegame.engine.writer" in MODULES["savegame.api"].top
    assert "savegame.adapters.torch" in MODULES["savegame.engine.item_decoder"].lazy
    assert MODULES["savegame.distributed.dcp"].torch_top and MODULES["savegame.adapters.rng"].torch_probes


def _owner(module: str) -> str | None:
    """The LAYERS entry that places ``module``: its own, else its nearest package's (never the root's)."""
    probe = module
    while probe not in LAYERS and "." in probe:
        probe = probe.rsplit(".", 1)[0]
    return probe if probe in LAYERS and (probe != "savegame" or module == "savegame") else None


def test_every_module_has_a_layer() -> None:
    missing = sorted(m for m in MODULES if _owner(m) is None)
    assert not missing, f"add these modules to LAYERS in {__file__}: {missing}"
    assert set(LAYERS.values()) <= set(LAYER_ORDER)


def test_no_cycle_among_module_level_imports() -> None:
    cycle = _cycle({m: mod.top for m, mod in MODULES.items()})
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle or [])


def test_imports_go_to_the_same_or_a_lower_layer() -> None:
    upward = {
        (m, target)
        for m, mod in MODULES.items()
        for target in mod.top | mod.lazy
        if _layer(target) > _layer(m)
    }  # fmt: skip
    new = sorted(upward - KNOWN_UPWARD)
    assert not new, "imports from a lower layer into a higher one: " + ", ".join(
        f"{a} ({LAYER_ORDER[_layer(a)]}) -> {b} ({LAYER_ORDER[_layer(b)]})" for a, b in new
    )
    fixed = sorted(KNOWN_UPWARD - upward)
    assert not fixed, f"these upward imports are gone: remove them from KNOWN_UPWARD: {fixed}"


def _framework(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FRAMEWORK_MODULES)


def test_only_framework_modules_probe_or_import_torch_at_module_level() -> None:
    offenders = {
        f"{mod.path.relative_to(SRC)}:{line}"
        for m, mod in MODULES.items()
        if not _framework(m)
        for line in mod.torch_top + mod.torch_probes
    }  # fmt: skip
    assert not offenders, f"torch knowledge outside the adapters (ask savegame.adapters instead): {sorted(offenders)}"


def test_the_core_imports_torch_nowhere_not_even_inside_functions() -> None:
    """Torch memory, CUDA synchronisation, ``.pt`` files: the core asks ``savegame.adapters.torch``."""
    offenders = {
        f"{mod.path.relative_to(SRC)}:{line}"
        for m, mod in MODULES.items()
        if not _framework(m)
        for line in mod.torch_lazy
    }  # fmt: skip
    assert not offenders, f"lazy torch imports in the core (ask savegame.adapters instead): {sorted(offenders)}"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('import sys\nt = sys.modules.get("torch")\n', True),
        ('import sys\nok = "torch" in sys.modules\n', True),
        ('import sys\nt = sys.modules["torch.distributed"]\n', True),
        ('import sys\nt = sys.modules.get("numpy")\n', False),
    ],
)
def test_the_probe_detector(source: str, expected: bool) -> None:
    """The torch probe detector recognises each spelling (so the check above can fail)."""
    assert any(_is_torch_probe(n) for n in ast.walk(ast.parse(source))) is expected


def test_the_cycle_finder() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
