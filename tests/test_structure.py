"""The package's import graph: no cycle, and each layer imports only the layers below it.

The graph is read from the source with :mod:`ast`, so imports inside functions count as much as
the ones at the top: a lazy import still makes a cycle, it only hides it until the function runs.
``python3 ../shared/tools/import_cycles.py . synthtune`` prints the same cycles by hand.
"""

from __future__ import annotations

import ast
import graphlib
from itertools import pairwise
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> source file for every module of ``package`` under ``root``."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_names(tree: ast.Module, module: str, is_package: bool) -> list[tuple[str, int]]:
    """Every absolute name an import statement of ``module`` asks for, wherever the statement sits,
    with its line. ``from X import a`` yields ``X.a``: a submodule when there is one, else a name in ``X``."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                # A package's own name is its anchor for ``from . import``; a module's is its parent.
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return names


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (at the top or inside a function).

    Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first, so an import of a module
    in another subpackage is also an edge to that subpackage's ``__init__``. A module's own
    ancestors are left out: Python has run them before the module starts, whatever it imports.
    ``from a.b import name`` where ``name`` is not a module reads ``a/b/__init__``, so that is an
    edge even for a module inside ``a.b``.
    """
    modules = module_names(root, package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        asked = {target for target, _ in imported_names(tree, name, path.name == "__init__.py")}
        for target in asked:
            # ``X.a`` is the submodule ``a`` or, when there is none, a name read from ``X``.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if not target or target == name:
                continue
            graph[name].add(target)
            prefix = target.rpartition(".")[0]
            while prefix:
                if prefix in modules and prefix != name and not name.startswith(prefix + "."):
                    graph[name].add(prefix)
                prefix = prefix.rpartition(".")[0]
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]`` (a imports b ...), or None when the graph is a DAG."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        # graphlib walks the edges backwards (node -> what it waits for); flip to "imports".
        return list(reversed(err.args[1]))
    return None


def offending_imports(root: Path, package: str, importer: str, forbidden: tuple[str, ...]) -> list[str]:
    """``file:line name`` for each import in module ``importer`` of a name under ``forbidden``."""
    path = module_names(root, package)[importer]
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for target, line in imported_names(tree, importer, path.name == "__init__.py"):
        if any(target == f or target.startswith(f + ".") for f in forbidden):
            found.append(f"{path.relative_to(root)}:{line} imports {target}")
    return sorted(set(found))


def top_level_imports(root: Path, package: str, top: str) -> list[str]:
    """``file:line`` of each absolute import of the top-level module ``top`` inside ``package``."""
    found = []
    for path in module_names(root, package).values():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue  # a relative import names a module of the package, never a top-level one
            if any(n == top or n.startswith(top + ".") for n in names):
                found.append(f"{path.relative_to(root)}:{node.lineno}")
    return sorted(found)


# ---------------------------------------------------------------- the graph functions themselves


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_graph_finds_a_cycle_hidden_in_a_function(tmp_path):
    root = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import f\n",
        "pkg/sub/__init__.py": "",
        "pkg/b.py": "def f():\n    from .sub import c\n    return c\n",
        "pkg/sub/c.py": "import json\n\ndef g():\n    from ..a import x\n",
        "pkg/d.py": "import pkg.sub.c\n",
    })
    graph = import_graph(root, "pkg")
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg.sub", "pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.a"}
    assert graph["pkg.d"] == {"pkg.sub", "pkg.sub.c"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert set(cycle) == {"pkg.a", "pkg.b", "pkg.sub.c"}
    # each step is an edge of the graph: a imports b, and so on around the loop
    assert all(after in graph[before] for before, after in pairwise(cycle))


def test_graph_sees_a_cycle_through_a_package_init(tmp_path):
    root = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/mem/__init__.py": "from pkg.mem.trace import T\n",
        "pkg/mem/trace.py": "T = 1\n",
        "pkg/mem/fit.py": "from pkg.mem import T\n",  # reads the package: fine, the package does not import fit
        "pkg/loop.py": "def run():\n    from pkg.mem.fit import T\n",
    })
    graph = import_graph(root, "pkg")
    assert graph["pkg.loop"] == {"pkg.mem", "pkg.mem.fit"}
    assert graph["pkg.mem.fit"] == {"pkg.mem"}
    assert find_cycle(graph) is None
    # Now trace needs the loop. Importing pkg.mem.fit runs pkg/mem/__init__ first, which imports
    # trace, which imports the loop: a cycle that only the edge to the package's __init__ shows.
    (root / "pkg/mem/trace.py").write_text("def t():\n    from pkg import loop\n")
    cycle = find_cycle(import_graph(root, "pkg"))
    assert cycle is not None and set(cycle) == {"pkg.loop", "pkg.mem", "pkg.mem.trace"}


def test_graph_cycle_through_a_lazy_job_import_and_offending_imports(tmp_path):
    root = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/low.py": "import os\n",
        "pkg/high.py": "from pkg import low\n\ndef f():\n    from pkg.jobs.run import main\n",
        "pkg/jobs/__init__.py": "",
        "pkg/jobs/run.py": "from pkg.high import f\n",
    })
    graph = import_graph(root, "pkg")
    assert graph["pkg.high"] == {"pkg.low", "pkg.jobs", "pkg.jobs.run"}
    cycle = find_cycle(graph)
    assert cycle is not None and len(cycle) == 3 and cycle[0] == cycle[-1]
    assert set(cycle) == {"pkg.high", "pkg.jobs.run"}
    assert offending_imports(root, "pkg", "pkg.high", ("pkg.jobs",)) == ["pkg/high.py:4 imports pkg.jobs.run.main"]
    assert offending_imports(root, "pkg", "pkg.low", ("pkg.jobs",)) == []
    # without the lazy import in high.py the same tree is a DAG
    (root / "pkg/high.py").write_text("from pkg import low\n")
    assert find_cycle(import_graph(root, "pkg")) is None


def test_top_level_imports(tmp_path):
    root = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/constants.py": "",
        "pkg/a.py": "from . import constants\nimport constantsx\n\ndef f():\n    from constants.x import y\n",
        "pkg/b.py": "import os, constants\n",
    })
    assert top_level_imports(root, "pkg", "constants") == ["pkg/a.py:5", "pkg/b.py:1"]


# ---------------------------------------------------------------- synthtune


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(REPO, "synthtune")


def test_the_graph_covers_the_package(graph):
    # a wrong root would give an empty graph, and every check below would pass on nothing
    assert {"synthtune.cli", "synthtune.errors", "synthtune.jobs.serve", "synthtune.train.loop"} <= set(graph)
    assert "synthtune.train.loss" in graph["synthtune.train.loop"]
    assert sum(len(targets) for targets in graph.values()) > 100


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _library(graph):
    top = ("synthtune.cli", "synthtune.cli_options", "synthtune.jobs")
    return [m for m in graph if not (m in top or m.startswith("synthtune.jobs."))]


def test_the_library_never_imports_a_job_or_the_cli(graph):
    found = [line for m in _library(graph)
             for line in offending_imports(REPO, "synthtune", m, ("synthtune.jobs", "synthtune.cli",
                                                                      "synthtune.cli_options"))]
    assert found == [], "the library imports the jobs layer:\n" + "\n".join(found)


@pytest.mark.parametrize("module", ["synthtune.errors", "synthtune.paths"])
def test_errors_and_paths_import_nothing_from_the_package(module):
    found = offending_imports(REPO, "synthtune", module, ("synthtune",))
    assert found == [], f"{module} sits below everything:\n" + "\n".join(found)


def test_formats_imports_no_engine_or_job():
    below = tuple(f"synthtune.{sub}" for sub in ("synth", "train", "generation", "memory", "jobs"))
    found = offending_imports(REPO, "synthtune", "synthtune.formats", below + ("synthtune.cli",))
    assert found == [], "formats.py is shared by training, eval and synthesis:\n" + "\n".join(found)


def test_no_top_level_constants_module_is_imported():
    # constants.py at the repo root is the workshop's file for notebooks; an installed synthtune has
    # no such module, and a top-level ``constants`` could be any other package's.
    found = top_level_imports(REPO, "synthtune", "constants")
    assert found == [], "import synthtune.paths instead of constants:\n" + "\n".join(found)
