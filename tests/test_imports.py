"""Import direction: mbv3_dense imports neither task package; detection and segmentation not each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "mbv3_dense": {"detection", "segmentation"},
    "detection": {"segmentation"},
    "segmentation": {"detection"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every ``import`` / ``from ... import`` in the file, at any depth."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package: str) -> None:
    files = sorted((REPO / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    violations = [f"{path.relative_to(REPO)} imports {sorted(bad)}"
                  for path in files if (bad := imported_packages(path) & FORBIDDEN[package])]
    assert not violations, "\n".join(violations)


def test_the_checker_sees_nested_imports(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from detection.model import SSD\n    import segmentation.heads as h\n")
    assert imported_packages(source) == {"detection", "segmentation"}
