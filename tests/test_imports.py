"""The package's modules import one another without a cycle (function-level and TYPE_CHECKING
imports included): the stages import forwards only."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "policyplug"


def _module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    root = PACKAGE.parent
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("policyplug"):
                target = node.module or ""
            else:
                continue
            # `from . import nodes` imports the submodule; `from .x import name` imports x
            submodules = [f"{target}.{alias.name}" for alias in node.names]
            if all(
                (root / (s.replace(".", "/") + ".py")).exists() or (root / s.replace(".", "/")).is_dir()
                for s in submodules
            ):
                deps.update(submodules)
            else:
                deps.add(target)
        graph[module] = deps
    return {module: {d for d in deps if d in graph and d != module} for module, deps in graph.items()}


def test_no_import_cycle_among_the_package_modules() -> None:
    graph = _module_graph()
    assert "policyplug.index" in graph and "policyplug.loader" in graph
    state: dict[str, int] = {}  # 1 visiting, 2 done
    cycles: list[list[str]] = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_the_index_is_built_from_rules_alone() -> None:
    """policyplug.index needs no loader and no engine (OPA's ast/index.go: an index of rules)."""
    graph = _module_graph()
    assert not graph["policyplug.index"] & {"policyplug.loader", "policyplug.runtime", "policyplug.compiler"}
    assert (
        "policyplug.runtime" not in graph["policyplug.loader"]
        and "policyplug.tester" not in graph["policyplug.loader"]
    )
