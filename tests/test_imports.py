"""The import structure of oodbench: no import cycles (imports inside functions and `if TYPE_CHECKING` blocks
included) and no import from a lower layer to a higher one (docs/architecture.md, "Layers and imports").

Every Import/ImportFrom node of every .py file under oodbench/ is an edge. `from pkg import name` is an edge to the
submodule `pkg.name` when that is a module, else to `pkg`; `import a.b.c` is an edge to `a.b.c` only (the implicit
imports of the parent packages are not edges, so `from oodbench.detectors.base import X` does not import the
registry `oodbench.detectors`).
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple, Optional

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "oodbench"

# Layers, lowest first: a module may import its own layer and lower ones only; within a layer there is no cycle.
# "name" is that module only; "name.*" is that package and everything under it. The longest match wins.
LAYERS = {
    # L0 base: leaf utilities that import nothing of oodbench above them
    "oodbench.errors": 0,
    "oodbench.config": 0,
    "oodbench.locks": 0,
    "oodbench.progress": 0,
    "oodbench.tables": 0,        # rows_to_csv
    "oodbench.protocols": 0,     # imports config
    "oodbench.metrics": 0,       # imports errors only
    "oodbench.joint_metrics": 0, # imports metrics, errors
    "oodbench.report": 0,        # imports metrics, tables
    "oodbench.leaderboard": 0,   # OpenOOD v1.5 leaderboard numbers, diff, CSV (numpy only)
    "oodbench.diffusion": 0,     # imports errors only
    "oodbench.aux_models": 0,    # imports errors only
    # L1: data, networks, the training engine, and what needs them
    "oodbench.data.*": 1,
    "oodbench.data.fetch": 1,    # downloads, safe extraction, manifests (errors, progress)
    "oodbench.data.catalog": 1,  # what `data fetch` installs (data.fetch/folders/imglists/sources, protocols, config)
    "oodbench.nets.*": 1,
    "oodbench.engine.*": 1,
    "oodbench.plots": 1,         # imports metrics, engine.checkpoint
    # L2: the model layer
    "oodbench.models": 2,
    "oodbench.model_registry": 2,  # openood:NAME checkpoints (data.catalog, data.fetch, data.sources)
    # L3: the detectors
    "oodbench.detectors.*": 3,
    "oodbench.detectors.recipes": 3,   # the classifier's training recipes (imports base, feature_space, errors)
    # L4: the workflow (run folders, fitting, tuning, scoring, evaluation, training; oodbench.runs and
    # oodbench.tuning moved in here)
    "oodbench.workflow.*": 4,
    # L5: the user-facing entry points
    "oodbench": 5,               # the package __init__ (lazily exposes api / models)
    "oodbench.__main__": 5,
    "oodbench.api": 5,
    "oodbench.cli": 5,
    "oodbench.bench.*": 5,
}

# Known cycles / upward imports inside code another engineer is reworking now: (importer, imported) edges that the
# checks below skip, each with a comment saying why. Remove an edge here once it is gone
# (test_known_to_fix_edges_still_exist says when). Empty: every known cycle and upward import is fixed.
KNOWN_TO_FIX: set = set()


class Edge(NamedTuple):
    source: str
    target: str
    path: Path
    line: int
    text: str

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.text}"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def as_module(name: str) -> Optional[str]:
    """`name` if it is an oodbench module, else its longest prefix that is one (None outside oodbench)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def imported_modules(node: ast.AST, module: str) -> list:
    """The oodbench modules an Import/ImportFrom node imports (see the module docstring)."""
    if isinstance(node, ast.Import):
        return [m for m in (as_module(a.name) for a in node.names) if m]
    if node.level:   # relative: from the importing module's package, up level - 1 more
        package = module.split(".") if is_package(module) else module.split(".")[:-1]
        base_parts = package[:len(package) - (node.level - 1)]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
        return []
    targets = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        targets.append(sub if alias.name != "*" and sub in MODULES else as_module(base))
    return [t for t in dict.fromkeys(targets) if t]


def collect_edges() -> list:
    edges = []
    for module, path in MODULES.items():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source, filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported_modules(node, module):
                    edges.append(Edge(module, target, path, node.lineno, lines[node.lineno - 1].strip()))
    return edges


EDGES = collect_edges()


def layer_of(module: str) -> Optional[int]:
    best = None
    for pattern, layer in LAYERS.items():
        if pattern.endswith(".*"):
            prefix = pattern[:-2]
            hit = module == prefix or module.startswith(prefix + ".")
        else:
            hit = module == pattern
        if hit and (best is None or len(pattern) > len(best[0])):
            best = (pattern, layer)
    return None if best is None else best[1]


def checked_edges() -> list:
    return [e for e in EDGES if (e.source, e.target) not in KNOWN_TO_FIX]


def strongly_connected(graph: dict) -> list:
    """Tarjan's strongly connected components of {node: set(successors)} (iterative)."""
    index, low, on_stack, stack, components, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]
                    counter[0] += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    components.append(component)
    return components


def one_cycle(graph: dict, component: set) -> list:
    """A shortest cycle through the first node of `component` (breadth-first inside it)."""
    start = min(component)
    parent, queue = {start: None}, [start]
    for node in queue:
        for nxt in sorted(graph[node] & component):
            if nxt == start:
                path = [node]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    return [start]


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if layer_of(m) is None)
    assert not missing, ("place these modules in a layer (tests/test_imports.py LAYERS and docs/architecture.md "
                         "\"Layers and imports\"): " + ", ".join(missing))


def test_layer_table_names_existing_modules():
    stale = sorted(p for p in LAYERS if not p.endswith(".*") and p not in MODULES)
    assert not stale, "LAYERS names modules that do not exist any more: " + ", ".join(stale)


def test_no_import_cycles():
    graph = defaultdict(set)
    for m in MODULES:
        graph[m]
    by_pair = {}
    for e in checked_edges():
        graph[e.source].add(e.target)
        by_pair.setdefault((e.source, e.target), e)
    cycles = []
    for component in strongly_connected(graph):
        node = next(iter(component))
        if len(component) > 1 or node in graph[node]:
            cycle = one_cycle(graph, component)
            hops = "\n".join(f"    {by_pair[(a, b)].where()}" for a, b in zip(cycle, cycle[1:]))
            cycles.append(f"  {' -> '.join(cycle)} (component of {len(component)}: {', '.join(sorted(component))})"
                          f"\n{hops}")
    assert not cycles, "import cycles among oodbench modules:\n" + "\n".join(cycles)


def test_no_import_points_up_the_layers():
    upward = [f"  L{layer_of(e.source)} {e.source} imports L{layer_of(e.target)} {e.target}: {e.where()}"
              for e in checked_edges()
              if None not in (layer_of(e.source), layer_of(e.target)) and layer_of(e.target) > layer_of(e.source)]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_known_to_fix_edges_still_exist():
    present = {(e.source, e.target) for e in EDGES}
    gone = sorted(KNOWN_TO_FIX - present)
    assert not gone, f"these KNOWN_TO_FIX edges are gone: remove them from the set: {gone}"


def test_the_resolver_follows_the_rules():
    """`from pkg import module` is the submodule; `from pkg import name` is the package; no parent edges."""
    node = ast.parse("from oodbench.engine import checkpoint, Engine").body[0]
    assert imported_modules(node, "oodbench.workflow.runs") == ["oodbench.engine.checkpoint", "oodbench.engine"]
    node = ast.parse("import oodbench.data.transforms").body[0]
    assert imported_modules(node, "oodbench.workflow.runs") == ["oodbench.data.transforms"]
    node = ast.parse("from .base import Detector").body[0]
    assert imported_modules(node, "oodbench.detectors.llr") == ["oodbench.detectors.base"]
    node = ast.parse("from . import base").body[0]
    assert imported_modules(node, "oodbench.detectors") == ["oodbench.detectors.base"]
    node = ast.parse("import numpy, torch.nn").body[0]
    assert imported_modules(node, "oodbench.workflow.runs") == []
    assert layer_of("oodbench") == 5 and layer_of("oodbench.detectors") == 3 and layer_of("oodbench.workflow.x") == 4
