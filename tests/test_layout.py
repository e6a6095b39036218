"""The layout: folders are layers, imports point down, no cycles (between modules or between folders),
``runtime/`` never imports ``moebench/``, and rendering results never imports torch.

Every import counts: module level, inside functions and under ``TYPE_CHECKING`` alike (a function-level
import is how a cycle hides).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("moebench", "runtime")
# The harness's layers, top first: a module may import its own folder and the folders below it.
# tools/ are maintenance commands over everything; the root's leaf helpers sit at the bottom.
LAYERS = (
    ("moebench.tools",),
    ("moebench.cli", "moebench.__main__"),
    ("moebench.runner",),
    ("moebench.scenario", "moebench.plan"),
    ("moebench.kinds",),
    ("moebench.plan.memory",),  # the training-memory model the train kind reads (pure arithmetic)
    ("moebench.regress",),
    ("moebench.report",),
    ("moebench.launch",),
    ("moebench.measure",),
    ("moebench.adapters",),  # other MoE implementations behind one contract ([model] impl)
    ("moebench.workload",),
    ("moebench.spec",),
    ("moebench.metrics", "moebench.text", "moebench.atomic", "moebench"),
    ("runtime",),
)
ROOT_MODULES = 8  # at most this many modules directly in moebench/ (besides __init__ and __main__)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports, anywhere in the file."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this file is in
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports(path, known) - {name} for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> int:
    best = None
    for rank, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (rank, name)
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[0]


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_moebench_or_runtime():
    assert cycles(graph()) == []


def test_imports_point_down_the_layers():
    upward = [
        f"{a} imports {b}"
        for a, targets in graph().items()
        for b in targets
        if layer_of(b) < layer_of(a) and not b.startswith(a + ".")  # a package may import its own parts
    ]
    assert upward == []


def test_runtime_never_imports_moebench_nor_reads_the_environment():
    for name, targets in graph().items():
        if name.split(".")[0] == "runtime":
            assert not [t for t in targets if t.startswith("moebench")], name
    for path in (REPO / "runtime").rglob("*.py"):
        assert "environ" not in path.read_text(), (
            f"{path.name} reads the environment: a test hook belongs in the harness"
        )


def test_the_package_root_holds_few_modules():
    root = [p.stem for p in (REPO / "moebench").glob("*.py") if p.stem not in ("__init__", "__main__")]
    assert len(root) <= ROOT_MODULES, sorted(root)


def test_kinds_folder_holds_only_kinds():
    """Every module directly in moebench/kinds/ (and every package there) defines a kind (NAME)."""
    from moebench import kinds

    folder = REPO / "moebench" / "kinds"
    names = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"} | {
        p.parent.name for p in folder.glob("*/__init__.py")
    }
    assert names == set(kinds.REGISTRY)


@pytest.mark.parametrize("module", ["moebench.report.results", "moebench.report.page", "moebench.report.fault_table"])
def test_rendering_results_never_imports_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
