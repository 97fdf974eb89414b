"""The loaders package imports one way: backends depend on shared modules, never back.

Every import of a loaders module counts, including those inside functions (which hide a cycle
from Python at import time but not from a reader).
"""
from __future__ import annotations

import ast
from pathlib import Path

import loaders

PACKAGE = Path(loaders.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """The loaders.* modules that the file at `path` imports anywhere in its body."""
    module = f"loaders.{path.stem}"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from .x import y
                base = ".".join(["loaders", *module.split(".")[1:-1], *([base] if base else [])])
            # `from loaders import folder` imports the module loaders.folder.
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("loaders.") and name != module} & set(graph_nodes())


def graph_nodes() -> list[str]:
    return [f"loaders.{path.stem}" for path in sorted(PACKAGE.glob("*.py")) if path.stem != "__init__"]


def import_graph() -> dict[str, set[str]]:
    return {f"loaders.{path.stem}": imported_modules(path)
            for path in sorted(PACKAGE.glob("*.py")) if path.stem != "__init__"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, str] = {}  # absent: unvisited, "open": on the current path, "done": finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_loaders_import_without_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_builder_only_dispatches_and_the_shared_modules_import_no_backend():
    graph = import_graph()
    assert {"loaders.dali", "loaders.ffcv", "loaders.folder"} <= graph["loaders.build"]
    backends = {"loaders.build", "loaders.folder", "loaders.dali", "loaders.ffcv", "loaders.convert"}
    for shared in ("loaders.images", "loaders.sampler", "loaders.sources", "loaders.cache", "loaders.recipe",
                   "loaders.beton", "loaders.augment", "loaders.resized_crop", "loaders.colour",
                   "loaders.transform_keys"):
        assert not graph[shared] & backends, f"{shared} imports {sorted(graph[shared] & backends)}"


def test_the_parser_sees_function_local_and_relative_imports(tmp_path):
    source = tmp_path / "dali.py"
    source.write_text("from loaders.batch import Batch\n"
                      "def build():\n    from loaders.build import build_train_loader\n"
                      "    from . import ffcv\n    from .sampler import EpochBatchSampler\n    import loaders.images\n")
    assert imported_modules(source) == {"loaders.batch", "loaders.build", "loaders.ffcv", "loaders.sampler",
                                        "loaders.images"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
