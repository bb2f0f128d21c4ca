"""The layer contract (docs/architecture.md): every import statement of the product, read from the source (lazy
imports inside functions included), goes down the layers or sideways where the table allows it; nothing in the
product imports the studies or the tests; no module reaches into another package's private (``_``) module or
private name; and no module imports one that imports it back. A module's layer is its folder's name — ``ldpruner/base/``
is base, ``compiler/`` (the package ``ldpruner.compiler``) is compiler, ``zoo/recipes/`` is recipes — and the modules
at the top of ``ldpruner/`` (the API, the drop-in, the CLI) are the façade: the table of allowed edges below is the
only hand-written part of the contract. No exceptions are listed."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
# folder of the repository → the package it is (pyproject maps compiler/ to ldpruner.compiler, …)
FOLDERS = {"ldpruner": "ldpruner", "compiler": "ldpruner.compiler", "passes": "ldpruner.passes",
           "runtime": "ldpruner.runtime", "zoo": "ldpruner.zoo", "bench": "ldpruner.bench", "benchmarks": "benchmarks"}

FACADE = "facade"  # the modules at the top of ldpruner/: api, unet (the PyTorch drop-in), cli, __main__

# layer (a folder's name) → the layers it may import (besides itself)
ALLOWED = {
    "base": set(),
    "compiler": {"base"},
    "runtime": {"base"},
    "passes": {"base", "compiler", "runtime"},
    "zoo": {"base", "runtime"},
    "sources": {"base", "compiler", "passes", "zoo"},
    "stages": {"base", "compiler", "runtime", "passes", "zoo", "sources"},
    "bench": {"base", "compiler", "runtime", "passes", "zoo", "sources", "stages"},
    "recipes": {"base", "runtime", "zoo", "bench"},
    FACADE: {"base", "runtime", "passes", "zoo", "sources", "stages", "bench"},
    "benchmarks": {"base", "compiler", "runtime", "passes", "zoo", "sources", "stages", "bench", "recipes", FACADE},
}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _layer(module: str) -> str | None:
    """The layer of a product module: the innermost folder on its path that names a layer; a module at the top of
    ``ldpruner/`` is the façade; the package ``ldpruner`` itself (its version only) is base. None: not the product."""
    path = MODULES.get(module)
    if path is None:
        return None
    if module == "ldpruner":
        return "base"
    named = [f for f in path.relative_to(ROOT).parent.parts if f in ALLOWED]
    return named[-1] if named else FACADE


def _imports(module: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names imported from it) for every import statement, relative ones resolved."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [a.name for a in node.names]
            # `from package import submodule` imports the submodule
            subs = [n for n in names if f"{base}.{n}" in MODULES]
            found += [(node.lineno, f"{base}.{n}", []) for n in subs]
            found.append((node.lineno, base, [n for n in names if n not in subs]))
    return found


def _private_part(module: str) -> str | None:
    """The package that owns ``module`` when ``module`` (or a package on its path) is private, else None."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def _violations() -> list[str]:
    problems = []
    for module, path in sorted(MODULES.items()):
        layer = _layer(module)
        for line, target, names in _imports(module, path):
            where = f"{path.relative_to(ROOT)}:{line}: {module} imports {target}"
            if target.split(".")[0] in ("tests", "conftest") or (layer != "benchmarks"
                                                                 and target.startswith("benchmarks")):
                problems.append(f"{where} (the product and the studies never import the tests; the product never "
                                "imports the studies)")
                continue
            target_layer = _layer(target)
            if target_layer is not None and target_layer != layer and target_layer not in ALLOWED[layer]:
                problems.append(f"{where} (layer {layer} may import {sorted(ALLOWED[layer]) or 'nothing'} only)")
            owner = _private_part(target)
            if owner is not None and not (module == owner or module.startswith(owner + ".")
                                          and module.count(".") == owner.count(".") + 1):
                problems.append(f"{where} (a private module of {owner}, imported from outside it)")
            if target in MODULES:
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                if private and module.rpartition(".")[0] != target.rpartition(".")[0]:
                    problems.append(f"{where}: private name(s) {private} of a module in another package")
    return problems


def _lazy_maps(path: Path) -> dict[str, str]:
    """The ``_WHERE`` / ``_LAZY`` tables a package's ``__getattr__`` imports its public names from."""
    table: dict[str, str] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in ("_WHERE", "_LAZY")
                                                for t in node.targets):
            table.update(ast.literal_eval(node.value))
    return table


def test_lazy_public_names_come_from_the_package_itself():
    checked = 0
    for module, path in MODULES.items():
        for name, submodule in _lazy_maps(path).items():
            assert f"{module}.{submodule}" in MODULES, f"{module}.{name} points at a missing {module}.{submodule}"
            checked += 1
    assert checked >= 20  # ldpruner.passes and ldpruner.zoo declare their surfaces this way


def test_every_product_module_has_a_layer_and_every_layer_is_a_folder():
    assert [m for m in MODULES if _layer(m) is None] == []
    folders = {p.name for p in MODULES.values() for p in p.relative_to(ROOT).parents}
    assert set(ALLOWED) - {FACADE} <= folders
    assert {_layer(m) for m in ("ldpruner.api", "ldpruner.unet", "ldpruner.cli", "ldpruner.__main__")} == {FACADE}
    assert (_layer("ldpruner.base.io"), _layer("ldpruner.stages"), _layer("ldpruner.stages.record"),
            _layer("ldpruner.zoo.recipes.mnist_t2i"), _layer("ldpruner.passes.onnx.export")) == (
        "base", "stages", "stages", "recipes", "passes")


def test_the_rooms_form_no_cycle():
    """The allowed edges between rooms go one way: no two rooms may import each other, directly or around a loop."""
    rooms = nx.DiGraph([(layer, target) for layer, targets in ALLOWED.items() for target in targets])
    assert nx.is_directed_acyclic_graph(rooms), nx.find_cycle(rooms)


def test_imports_follow_the_layers_with_no_exceptions():
    problems = _violations()
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize(("module", "target", "allowed"), [
    ("ldpruner.compiler.graph", "ldpruner.passes.plan", False),  # the compiler sits below the passes
    ("ldpruner.runtime.unet", "ldpruner.compiler.tracer", False),  # a deployment needs only runtime + onnxruntime
    ("ldpruner.passes.remove", "ldpruner.api", False),
    ("ldpruner.api", "ldpruner.bench.stage", True),
    ("ldpruner.bench.stage", "ldpruner.api", False),  # bench drives the stages; the api calls bench
    ("ldpruner.cli", "ldpruner.api", True),
    ("ldpruner.stages.build", "ldpruner.api", False),  # the façade calls the stages, never the other way
    ("ldpruner.base.io", "ldpruner.stages", False),
])
def test_the_table_says_what_docs_architecture_says(module, target, allowed):
    layer, target_layer = _layer(module), _layer(target)
    assert (target_layer == layer or target_layer in ALLOWED[layer]) is allowed


# --- import cycles ---------------------------------------------------------------------------------------------------

def _import_graph() -> nx.DiGraph:
    """Product module → product module it imports, at import time or inside a function, each edge with the file and
    line of its first import. An import of a package the module sits in that takes no name from it (``from . import
    sibling``) is no edge to that package: it is imported before the module anyway."""
    graph = nx.DiGraph()
    graph.add_nodes_from(MODULES)
    for module, path in MODULES.items():
        for line, target, names in _imports(module, path):
            if target not in MODULES or target == module or graph.has_edge(module, target):
                continue
            if module.startswith(target + ".") and not names:
                continue
            graph.add_edge(module, target, where=f"{path.relative_to(ROOT)}:{line}")
    return graph


def _import_cycles(graph: nx.DiGraph) -> list[str]:
    """Every simple cycle of ``graph`` from its smallest module, each import in it named with its file and line."""
    cycles = []
    for cycle in nx.simple_cycles(graph):
        first = cycle.index(min(cycle))
        cycle = cycle[first:] + cycle[:first]
        cycles.append("; ".join(f"{a} → {b} ({graph.edges[a, b]['where']})"
                                for a, b in zip(cycle, cycle[1:] + cycle[:1])))
    return sorted(cycles)


def test_the_import_graph_reads_lazy_and_relative_imports():
    graph = _import_graph()
    assert graph.has_edge("ldpruner.stages.calibration", "ldpruner.passes.inputs")  # inside a function
    assert graph.has_edge("ldpruner.passes.distill.trainer", "ldpruner.passes.config")  # `from ..config import`
    assert graph.has_edge("ldpruner.passes.distill.trainer", "ldpruner.passes.distill.checkpoint")  # `from .checkpoint`
    assert graph.has_edge("ldpruner.api", "ldpruner.stages")  # `from ldpruner import stages`
    assert not graph.has_edge("ldpruner.api", "ldpruner")  # the package api sits in, no name taken from it


def test_no_import_cycles_between_product_modules():
    """No product module imports, at import time or inside a function, a module that imports it back (directly or
    through others): a room's modules form a hierarchy too, and a lazy import that dodges a cycle is still one."""
    cycles = _import_cycles(_import_graph())
    assert cycles == [], f"{len(cycles)} import cycle(s):\n" + "\n".join(cycles)
