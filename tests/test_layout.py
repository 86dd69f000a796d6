"""The code's rooms: pipeline/ keeps a short top level, and no module imports lead in a circle."""

from __future__ import annotations

import ast

from pipeline import PROJECT_ROOT

OURS = ("pipeline", "trainer", "cli")


def module_name(path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path, modules: set[str]) -> set[str]:
    """This project's modules imported when ``path`` is loaded (imports inside functions are not)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_pipeline_keeps_a_short_top_level():
    top = sorted(p.name for p in (PROJECT_ROOT / "pipeline").glob("*.py"))
    assert len(top) <= 12, top


def test_no_import_cycle():
    paths = [PROJECT_ROOT / "cli.py"] + [p for root in OURS[:2] for p in (PROJECT_ROOT / root).rglob("*.py")]
    modules = {module_name(p) for p in paths}
    graph = {module_name(p): module_level_imports(p, modules) - {module_name(p)} for p in paths}
    # a package's __init__ importing its own modules is not a cycle of ours; a module importing its package is
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not name.startswith(t + ".")}
    state: dict[str, int] = {}

    def visit(name, trail):
        state[name] = 1
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                raise AssertionError(" -> ".join(trail[trail.index(target):] + [target]))
            if target not in state:
                visit(target, trail + [target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
