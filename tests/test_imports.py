"""The library's imports point downward: no cycle among lorachain modules, and the registries that
the workflow reads while the Snakefile is parsed import no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lorachain"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The lorachain modules a module imports, anywhere in it (function-local imports included).
    ``from package import name`` counts as importing package.name where that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in modules and name != module_name(path)}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, modules) for path in paths}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_no_import_cycle_among_lorachain_modules():
    assert find_cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_what_the_snakefile_and_the_job_runner_import_needs_no_torch():
    code = (
        "import sys, lorachain.config_checks, lorachain.plan, lorachain.cluster_checks, lorachain.workflow_io; "
        "import lorachain.methods as m; m.schema_defs(); "
        "m.make_method('blocklora', {'num_blocks': 4}); m.make_merge('ties'); "
        "assert m.merge_class('gradient_fusion').needs_layer_inputs; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_methods_merges_and_the_lora_records_import_lorachain_at_module_level_only():
    """Function-local imports of lorachain modules (a way to hide a cycle) are not used here;
    external heavy imports (peft, safetensors) inside functions are fine."""
    paths = [*PACKAGE.joinpath("methods").glob("*.py"), *PACKAGE.joinpath("merging").glob("*.py")]
    paths += [PACKAGE / name for name in ("lora.py", "params.py", "state.py", "config_checks.py")]
    local = []
    for path in paths:
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                names = (
                    [alias.name for alias in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                local += [f"{path.name}:{node.lineno} {name}" for name in names if name.split(".")[0] == "lorachain"]
    assert local == []
