"""The codebase's layers hold: the import contract in pyproject.toml (import-linter), no
private name imported across modules, and every package says what it owns."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "iclit"


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("iclit"):
            yield node


def test_no_private_name_is_imported_across_modules():
    found = [
        f"{p.relative_to(SRC)}: from {n.module} import {a.name}"
        for p in SRC.rglob("*.py")
        for n in _imports(p)
        for a in n.names
        if a.name.startswith("_")
    ]
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_every_package_has_an_init_that_says_what_it_owns():
    for folder in [SRC, *(p for p in SRC.rglob("*") if p.is_dir() and any(p.glob("*.py")))]:
        if folder.name in ("__pycache__", "data", "templates"):
            continue
        init = folder / "__init__.py"
        assert init.exists(), f"{folder.relative_to(SRC.parent)} has no __init__.py"
        assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), f"{init} has no docstring"


def test_the_layer_contract_is_kept():
    """import-linter's contract (pyproject.toml: the data flow's layers)."""
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (the test extra installs it)")
    out = subprocess.run(
        [exe],
        cwd=SRC.parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(SRC.parent), "PATH": str(Path(sys.executable).parent)},
    )
    assert out.returncode == 0 and "BROKEN" not in out.stdout, out.stdout + out.stderr
