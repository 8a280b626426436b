"""The package's imports run one way, and private touches stay in their rooms. No database needed."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "sa_rollback"

#: the modules that may import the process-wide state: the scope layer and the pytest layer above it
STATE_USERS = {"__init__", "plugin", "fixtures", "_run", "_scope", "databases"}


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    return ".".join(relative.parts)


def imports_of(path: Path) -> set[str]:
    """Every module of the package that ``path`` imports, anywhere in it (functions and TYPE_CHECKING too)."""
    name = module_name(path)
    package_parts = name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_parts[: len(package_parts) - (node.level - 1)] if node.level > 1 else package_parts
                target = [*base, *(node.module.split(".") if node.module else [])]
                if node.module is None:
                    found.update(".".join([*target, alias.name]) for alias in node.names)
                else:
                    found.add(".".join(target))
            elif node.module and node.module.startswith("sa_rollback"):
                found.add(node.module.removeprefix("sa_rollback").lstrip("."))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sa_rollback."):
                    found.add(alias.name.removeprefix("sa_rollback."))
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    resolved = set()
    for target in found:
        # "databases" may be a package: its "__init__" stands for it
        if target in modules:
            resolved.add(target)
        elif f"{target}.__init__" in modules:
            resolved.add(f"{target}.__init__")
    return resolved - {name, ""}


def graph() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt == "__init__":
                continue  # everything may be re-exported by the package itself
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if state.get(nxt) is None:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if state.get(node) is None:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_import_graph_is_read() -> None:
    edges = graph()
    assert "_physical" in edges["_logical"]
    assert "_logical" in edges["_proxy"]
    assert "_scope" in edges["plugin"]


def test_no_import_cycle() -> None:
    assert find_cycle(graph()) == []


def test_a_cycle_would_be_found() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_nothing_below_the_scope_imports_the_process_wide_state() -> None:
    users = {name for name, targets in graph().items() if "_state" in targets}
    assert users <= {name for name in users if name.split(".")[0] in STATE_USERS}, users


def test_sqlalchemy_private_pool_classes_only_in_their_module() -> None:
    touching = {
        module_name(path)
        for path in PACKAGE.rglob("*.py")
        if "_ConnectionRecord" in path.read_text() or "_ConnectionFairy" in path.read_text()
    }
    assert touching == {"_sqla"}
