"""The package's layering (docs/ARCHITECTURE.md): every import, lazy ones included, goes from a layer to the same
or a lower one, and no module reaches itself through imports. Read from the source, so a function-level import
that would hide a cycle counts as an import."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "semu_fast"
LEAVES = {"semu_fast._checks", "semu_fast._utils", "semu_fast._profile"}
LEVELS = {"leaf": 0, "ops": 1, "core": 2, "facade": 3, "workflows": 4, "cli": 5}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def layer(module: str) -> str:
    if module in LEAVES:
        return "leaf"
    if module.startswith("semu_fast.ops"):
        return "ops"
    if module.startswith("semu_fast.workflows"):
        return "workflows"
    if module.startswith("semu_fast.cli") or module == "semu_fast.__main__":
        return "cli"
    if module in ("semu_fast", "semu_fast.info"):
        return "facade"
    return "core"


def imports(module: str, path: Path, known: dict) -> set[str]:
    """The semu_fast modules `module` imports anywhere in its source (a package's own submodules resolved)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        out.update(name for name in names if name in known and name != module)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_lower_layers_never_import_higher_ones():
    wrong = [f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, targets in graph().items() for b in targets
             if LEVELS[layer(a)] < LEVELS[layer(b)]]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    edges = graph()
    # A package importing its own submodules (the facade pattern) is not a cycle unless they import it back.
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_lazy_imports():
    """The checker must see a function-level import (else it could not catch a cycle hidden in one)."""
    edges = graph()
    assert "semu_fast.workflows.classification" in edges["semu_fast.cli.classification"]  # imported inside a function
    assert "semu_fast.ops" in edges["semu_fast.pipeline"]
