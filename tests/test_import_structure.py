"""The project's modules form no import cycle and use no other module's private names.

Read from the source with ``ast`` (nothing is imported), counting imports inside functions
too: a lazy import that closes a cycle still ties the two modules together, and the next
change to either breaks the other. ``passes/`` and ``runtimes/`` are mapped to
``qcompile.passes`` / ``qcompile.runtimes`` as pyproject's ``package-dir`` installs them.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"qcompile": ROOT / "qcompile", "qcompile.passes": ROOT / "passes",
            "qcompile.runtimes": ROOT / "runtimes"}


def project_modules() -> dict[str, pathlib.Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts
                     if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


def imported_names(path: pathlib.Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` for every ``from qcompile... import name`` / ``import qcompile...``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qcompile"):
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.startswith("qcompile")]
    return found


def import_graph(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    graph = {}
    for module, path in modules.items():
        targets = set()
        for source, name in imported_names(path):
            submodule = f"{source}.{name}"
            targets.add(submodule if submodule in modules else source)
        graph[module] = {t for t in targets if t in modules and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_cycle():
    modules = project_modules()
    assert len(modules) > 50  # the mapping found the three packages
    cycle = find_cycle(import_graph(modules))
    assert cycle is None, " -> ".join(cycle)


def test_no_private_names_across_modules():
    offenders = [f"{module} imports {name} from {source}"
                 for module, path in project_modules().items()
                 for source, name in imported_names(path)
                 if name and name.startswith("_") and not name.startswith("__")]
    assert offenders == []


def test_the_checker_sees_a_cycle_and_a_private_import(tmp_path):
    """The checks themselves can fail: a planted two-module cycle and private import."""
    (tmp_path / "a.py").write_text("from qcompile.b import _helper\n")
    (tmp_path / "b.py").write_text("def f():\n    from qcompile.a import thing\n")
    modules = {"qcompile.a": tmp_path / "a.py", "qcompile.b": tmp_path / "b.py"}
    assert find_cycle(import_graph(modules)) == ["qcompile.a", "qcompile.b", "qcompile.a"]
    assert ("qcompile.b", "_helper") in imported_names(tmp_path / "a.py")


TORCH_FREE = ("qcompile", "qcompile.bundle", "qcompile.targets", "qcompile.runtimes.bench",
              "qcompile.runtimes.generation", "qcompile.runtimes.genai_session")


def test_runtime_side_modules_import_without_torch():
    """The bundle, the registry and everything ``bench``'s workers load stay torch-free, so a
    worker's peak memory is the runtime's (and no module copies the bundle's file names to
    dodge torch)."""
    import subprocess
    import sys

    code = ("import importlib, sys\n"
            f"for name in {TORCH_FREE!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"
