"""The launcher/rank line, as tests (read with ast; nothing is imported):

- nothing outside launcher/train/ imports torch or the libraries that pull it in at module level, so every
  launcher-side path (--help, --dry-run, launch plan, the backends' submit) starts in a second;
- launcher/train/ never imports backends, commands or the command line: ranks know nothing of schedulers;
- the module-level imports between launcher's modules have no cycle.
(`launch RECIPE --dry-run` leaving torch out of sys.modules is checked by running it:
tests/integration/test_cli_errors.py.)
"""

from __future__ import annotations

import ast
from pathlib import Path

LAUNCHER = Path(__file__).resolve().parents[2] / "launcher"
HEAVY = ("torch", "transformers", "deepspeed", "accelerate", "peft", "bitsandbytes")
RANK_ONLY_FORBIDS = ("launcher.backends", "launcher.commands", "launcher.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(LAUNCHER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> list[tuple[str, int]]:
    """(imported module, line) for each import; top_level_only: module-level statements only."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


MODULES = {module_name(p): p for p in LAUNCHER.rglob("*.py")}


def test_nothing_outside_train_imports_torch_at_module_level():
    offenders = [
        f"{name}:{line} imports {imported}"
        for name, path in MODULES.items()
        if not name.startswith("launcher.train")
        for imported, line in imports(path, top_level_only=True)
        if imported.split(".")[0] in HEAVY
    ]
    assert not offenders, offenders


def test_train_never_imports_backends_commands_or_the_command_line():
    offenders = [
        f"{name}:{line} imports {imported}"
        for name, path in MODULES.items()
        if name.startswith("launcher.train")
        for imported, line in imports(path, top_level_only=False)
        if imported.startswith(RANK_ONLY_FORBIDS)
    ]
    assert not offenders, offenders


def test_no_import_cycles_between_launcher_modules():
    graph = {
        name: {imported for imported, _ in imports(path, top_level_only=True) if imported in MODULES} - {name}
        for name, path in MODULES.items()
    }
    # a package's __init__ is imported before any of its modules: an edge into the package, not a cycle
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_every_module_has_a_docstring_that_says_why():
    missing = [
        name
        for name, path in MODULES.items()
        if path.stat().st_size and not ast.get_docstring(ast.parse(path.read_text()))
    ]
    assert not missing, missing
