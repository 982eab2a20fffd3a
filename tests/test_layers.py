"""Layer boundaries that imports could quietly cross."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edgeslim"


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (function-level imports too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_operator_never_imports_the_cli() -> None:
    # The CLI sits above the operator (it starts it); importing it back is a cycle.
    offenders = {
        str(path.relative_to(PACKAGE.parent)): sorted(
            m
            for m in imported_modules(path)
            if m == "edgeslim.cli" or m.startswith("edgeslim.cli.")
        )
        for path in sorted((PACKAGE / "operator").rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_walk_sees_imports_inside_functions(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from edgeslim import cli\n    import edgeslim.cli as c\n")
    assert {"edgeslim.cli", "edgeslim"} <= imported_modules(probe)
