"""The package's structure (DESIGN §1): module-level imports form no circle, arrows only point down, tasks know
nothing of the techniques, sections never import each other, and no file grows past 400 lines.

The import graph is read from the source with `ast` (module level only: statements at the top of a module,
including those inside top-level `if` / `try` blocks such as `if TYPE_CHECKING:`); imports inside functions
are lazy and not edges here, except that kernels and model may not import upward even lazily.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "elleci"
SECTIONS = ("alignment", "reasoning", "merging", "curation")
MAX_LINES = 400


def module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_pkg else parts), is_pkg


def _absolute(name: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(name: str, is_pkg: bool, nodes, modules: set[str]) -> set[str]:
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("elleci")}
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(name, is_pkg, node)
            if base.startswith("elleci"):
                for a in node.names:                     # `from pkg import submodule` is an edge to it
                    out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in out if m != name}


def _module_level(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            yield from ast.walk(node)
        else:
            yield node


def import_graph(lazy: bool = False) -> dict[str, set[str]]:
    """module -> elleci modules it imports (at module level; every import when `lazy`)."""
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    modules = {name for name, _ in files}
    graph = {}
    for (name, is_pkg), path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = ast.walk(tree) if lazy else _module_level(tree)
        graph[name] = {t for t in _targets(name, is_pkg, nodes, modules) if t in modules}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state and (found := visit(v)):
                return found
        stack.pop()
        state[u] = "done"
        return None

    for u in sorted(graph):
        if u not in state and (found := visit(u)):
            return found
    return None


def section(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "algos" and parts[2] in SECTIONS else None


def layer_violations(graph: dict[str, set[str]], lazy_graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for a, targets in graph.items():
        for b in targets:
            if a.startswith("elleci.tasks") and b.split(".")[1] in ("algos", "testbed", "model", "kernels", "train"):
                bad.append(f"{a} -> {b}: tasks import only data helpers")
            if section(a) and section(b) and section(a) != section(b):
                bad.append(f"{a} -> {b}: algos sections never import each other")
            if a.startswith("elleci.algos.") and not section(a) and a != "elleci.algos" and section(b):
                bad.append(f"{a} -> {b}: the algos core imports no section")
            if b.startswith("elleci.testbed") and not a.startswith("elleci.testbed"):
                bad.append(f"{a} -> {b}: nothing imports the testbed")
    for a, targets in lazy_graph.items():                 # the bottom floors: not even lazily upward
        for b in targets:
            if a.startswith("elleci.kernels") and not (b.startswith("elleci.kernels") or b == "elleci._io"):
                bad.append(f"{a} -> {b}: kernels import nothing from the floors above")
            if a.startswith("elleci.model") and b.split(".")[1] in ("algos", "tasks", "testbed", "train"):
                bad.append(f"{a} -> {b}: model imports nothing from the floors above")
    return bad


def test_the_checker_finds_a_cycle_and_a_violation():
    """The checks themselves can fail: a planted circle and planted upward edges are reported."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    planted = {"elleci.tasks.x": {"elleci.algos.sampling"},
               "elleci.algos.alignment.dpo": {"elleci.algos.reasoning.grpo"},
               "elleci.kernels.scan": {"elleci.model.mamba2"}}
    msgs = layer_violations(planted, planted)
    assert len(msgs) == 3 and "tasks" in msgs[0] and "sections" in msgs[1] and "kernels" in msgs[2]


def test_no_module_level_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_imports_point_down():
    graph = import_graph()
    assert graph["elleci.tasks.arithmetic"] is not None           # the graph reads the modules it should
    assert "elleci.algos.logprobs" in graph["elleci.algos.sft"]
    assert layer_violations(graph, import_graph(lazy=True)) == []


def test_algos_is_a_core_and_four_sections():
    folders = sorted(p.name for p in (PKG / "algos").iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(SECTIONS)
    for s in SECTIONS:
        assert (PKG / "algos" / s / "__init__.py").is_file()


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_file_over_400_lines(path):
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (> {MAX_LINES}): split it by concept"


def test_section_names_are_the_packages():
    """`elleci.algos.<section>` is the section package (no re-exported function shadows one)."""
    import types

    import elleci.algos as algos
    for s in SECTIONS:
        assert isinstance(getattr(algos, s), types.ModuleType), s
