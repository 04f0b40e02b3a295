"""The server's shape: its modules import one another without a cycle
(type-checking imports included), and the command line's port is the
server's default."""

from __future__ import annotations

import ast
from pathlib import Path

import chat
import reactor

HERE = Path(__file__).resolve().parent


def local_imports(path: Path, modules: set[str]) -> set[str]:
    """The project's modules that `path` imports, anywhere in it (inside
    `if TYPE_CHECKING:` and functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.partition(".")[0])
    return found & modules


def import_graph() -> dict[str, set[str]]:
    """Every non-test module of the project and the project modules it imports."""
    paths = {
        path.stem: path
        for path in HERE.glob("*.py")
        if not path.stem.startswith("test_") and path.stem != "conftest"
    }
    return {name: local_imports(path, set(paths)) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in `graph`, as the modules along it; None if there is none."""
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph[module]):
            cycle = visit(imported)
            if cycle is not None:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle is not None:
            return cycle
    return None


def test_no_module_imports_one_that_imports_it_back() -> None:
    """Shape: the project's import graph, type-checking imports included, has no cycle."""
    graph = import_graph()
    assert {"chat", "reactor", "connection", "door", "timers", "host"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    """Shape: the check above would see a circle, through any number of modules."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_command_line_port_is_the_servers_default() -> None:
    """Shape: chat.PORT, the command line's default, is ChatServer's default port too."""
    assert chat.PORT == reactor.DEFAULT_PORT == 8080
    assert chat.parse_args([]).port == chat.PORT


def test_no_server_module_is_over_800_lines_nor_class_over_400() -> None:
    """Shape: the server's modules stay small enough to read (issue 16's bounds)."""
    for name in ("chat", "reactor", "connection", "door", "timers", "host", "room", "tls"):
        tree = ast.parse((HERE / f"{name}.py").read_text())
        assert (tree.body[-1].end_lineno or 0) <= 800, name
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                assert (node.end_lineno or 0) - node.lineno < 400, (name, node.name)
