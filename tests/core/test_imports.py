"""The package's shape: producers load no task framework, and no module imports another in
a loop (deferred imports inside functions included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "worker"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of the package that ``path`` imports, anywhere in its body."""
    found: set[str] = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path.parent)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                # ``from worker import events`` names a module; ``from worker.x import f`` not.
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {name for name in found if name in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or a module that imports itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
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
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle() -> None:
    """No module reaches itself through imports, deferred ones counted."""
    modules = _modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    assert graph["worker.runtime.task"], "the import graph was not read"
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: a loop of two modules is reported."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


@pytest.mark.parametrize(
    "statement",
    [
        "import worker",
        "from worker import Client, Job",
        "from worker import AsyncClient, AsyncJob",
        "import worker.client.batch_run, worker.client.dead_letters",
    ],
)
def test_producers_load_no_task_framework(statement: str) -> None:
    """Importing the producer API in a fresh interpreter loads no celery, kombu or billiard."""
    code = (
        f"{statement}\n"
        "import sys\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'celery', 'kombu', 'billiard', 'gevent'}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


def test_the_worker_side_does_load_celery() -> None:
    """The check above can fail: the Celery app's import is seen in the same way."""
    code = "import worker.celery_app, sys\nprint('celery' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "True"


def test_few_modules_stand_directly_in_the_package() -> None:
    """The top level keeps only what every side shares (the layout's bound: 15 modules)."""
    top = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top) <= 15, top
