"""The dependency direction is `shared ← worker`, `shared ← ui`, nothing back (docs/ARCHITECTURE.md).

Read from the source with `ast`, so an import inside a function counts as much as one at the top: `shared/` must
run alone (a GPU benchmark, a CLI run) without gradio, celery, the page or the worker installed or importable.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package → top-level modules it must never import
FORBIDDEN = {
    "shared": {"ui", "worker", "gradio", "gradio_client", "celery", "kombu"},
    "ui": {"worker"},  # the page sends tasks by name through a Celery client, never imports the tasks
    "worker": {"ui", "gradio", "gradio_client"},
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) for every absolute import in the file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_its_layer_allows(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    bad = [f"{path.relative_to(REPO)}:{line} imports {module}"
           for path in files for line, module in imported_modules(path) if module in FORBIDDEN[package]]
    assert not bad, f"{package}/ must not import {sorted(FORBIDDEN[package])}:\n" + "\n".join(bad)


def test_the_check_sees_nested_imports(tmp_path):
    # the rule above is only worth something if an import hidden in a function is found too
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import gradio as gr\n    from celery import Celery\n")
    assert [m for _, m in imported_modules(sample)] == ["gradio", "celery"]
