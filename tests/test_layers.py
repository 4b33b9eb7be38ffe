"""The house's layers: no import cycle between modules or packages, and the commands
an operator runs often start without the simulator's heavy libraries."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "balloonist"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> Iterator[str]:
    """Every balloonist module ``path`` imports, at any depth (lazy imports count)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            if name.split(".")[0] == PACKAGE:
                yield name
                yield from (f"{name}.{a.name}" for a in node.names)


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in SRC.joinpath(PACKAGE).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        graph[module] = {name for name in _imports(path, module) if name in files} - {module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (a list of nodes, first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def _package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or _is_package(module) else parts[0]


def _is_package(module: str) -> bool:
    return SRC.joinpath(*module.split("."), "__init__.py").exists()


def test_no_module_imports_itself_round_a_cycle() -> None:
    assert _cycle(_graph()) is None


def test_no_package_imports_itself_round_a_cycle() -> None:
    packages: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        here = _package_of(module)
        packages.setdefault(here, set()).update(
            p for p in map(_package_of, targets) if p not in (here, PACKAGE)
        )
    packages.pop(PACKAGE, None)  # the top-level modules are the composition root
    assert _cycle(packages) is None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


HEAVY = ("numba", "numpy", "matplotlib")


@pytest.mark.parametrize(
    "argv", [["status", "--help"], ["vm", "list"]], ids=["status --help", "vm list"]
)
def test_everyday_commands_do_not_import_the_simulators_libraries(
    argv: list[str], tmp_path: Path
) -> None:
    probe = (
        "import contextlib, io, json, sys\n"
        "from balloonist.cli import main\n"
        "quiet = io.StringIO()\n"
        "with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):\n"
        "    try:\n"
        f"        main({argv!r})\n"
        "    except SystemExit:\n"
        "        pass\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))\n"
    )
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "XDG_DATA_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    )
    assert json.loads(done.stdout) == []
