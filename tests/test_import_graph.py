"""The package's import graph (every `import` statement, module level or not, read with `ast`): no
cycle inside `irr_callback`, and `core/` imports only torch and the standard library."""

from __future__ import annotations

import ast
import sys
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "irr_callback"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that `name` imports (`from a import b` counts a.b when it is a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                child = f"{source}.{alias.name}"
                found.add(child if child in modules else source)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_inside_the_package():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_core_imports_only_torch_and_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"torch", "irr_callback"}
    for name, path in _modules().items():
        if not name.startswith("irr_callback.core"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = ["irr_callback"] if node.level else [(node.module or "").split(".")[0]]
                if node.level and node.level > 1:
                    raise AssertionError(f"{name} imports from outside core/: level-{node.level} relative import")
            else:
                continue
            assert set(roots) <= allowed, f"{name} imports {roots}"
            if isinstance(node, ast.ImportFrom) and not node.level and roots == ["irr_callback"]:
                assert (node.module or "").startswith("irr_callback.core"), f"{name} imports {node.module}"


def test_distributed_never_imports_the_pipeline():
    """Backends receive the pipeline's group solver; they never import it (docs/architecture.md)."""
    graph = _graph()
    for name, imported in graph.items():
        if name.startswith("irr_callback.distributed"):
            assert not any(m.startswith("irr_callback.pipeline") for m in imported), (name, imported)


# The data path in the package root: inputs/ → pipeline/ → outputs/ (docs/architecture.md). Everything the
# pipeline needs from the outside world arrives as tensors, batches and settings; what it returns leaves
# through outputs/. So the layers under the data path import neither side, and the two sides never import
# each other (not even the package `__init__`: neither exports anything to the other).
INPUTS, OUTPUTS = "irr_callback.inputs", "irr_callback.outputs"
BELOW_THE_DATA_PATH = ("irr_callback.core", "irr_callback.distributed", "irr_callback.pipeline")
# the shared root modules both sides and the pipeline build on
SHARED_ROOT = tuple(
    f"irr_callback.{m}" for m in ("config", "targets", "tensors", "report", "saving", "paths", "peft_utils", "logs")
)


def _inside(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(graph: dict[str, set[str]], importers: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    """Every `a imports b` with a inside one of `importers` and b inside one of `forbidden`."""
    return sorted(
        f"{name} imports {m}"
        for name, imported in graph.items()
        if _inside(name, importers)
        for m in imported
        if _inside(m, forbidden)
    )


def test_the_rule_checker_finds_a_forbidden_import():
    graph = {
        "irr_callback.pipeline.loop": {"irr_callback.inputs.data", "irr_callback.config"},
        "irr_callback.pipeline": {"irr_callback.outputs"},
        "irr_callback.inputs_extra": {"irr_callback.outputs.x"},  # a prefix, not the package: not inside
    }
    assert _violations(graph, BELOW_THE_DATA_PATH, (INPUTS, OUTPUTS)) == [
        "irr_callback.pipeline imports irr_callback.outputs",
        "irr_callback.pipeline.loop imports irr_callback.inputs.data",
    ]
    assert _violations(graph, (INPUTS,), (OUTPUTS,)) == []


def test_the_pipeline_and_the_layers_under_it_import_neither_inputs_nor_outputs():
    graph = _graph()
    assert any(_inside(name, (INPUTS,)) for name in graph) and any(_inside(name, (OUTPUTS,)) for name in graph)
    assert _violations(graph, BELOW_THE_DATA_PATH + SHARED_ROOT, (INPUTS, OUTPUTS)) == []


def test_inputs_and_outputs_never_import_each_other():
    graph = _graph()
    assert _violations(graph, (INPUTS,), (OUTPUTS,)) == []
    assert _violations(graph, (OUTPUTS,), (INPUTS,)) == []
