"""Import layering among the project's modules.

- The trunk (``mbv3_dense`` without ``mbv3_dense.classification``) imports no task package; only its
  ``__init__`` names the classifier's builders (``mbv3_dense.mobilenet_v3_large``, the public face).
- A task package (``mbv3_dense.classification``, ``detection``, ``segmentation``) imports no other one.
- The trunk is grouped by kind: the network at the top (``layers``, ``backbone``, ...) imports none of
  ``training``, ``checkpoints``, ``data`` or ``deploy``; ``checkpoints`` and ``data`` import no ``deploy``.
- No import cycle among the project's modules, counting imports inside functions too (a late import
  only hides a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mbv3_dense", "detection", "segmentation")
TASK_PACKAGES = ("mbv3_dense.classification", "detection", "segmentation")
ALLOWED = {("mbv3_dense", "mbv3_dense.classification")}  # (importing module, imported task package)


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = REPO) -> dict[str, Path]:
    """Every module of the project's packages, by dotted name."""
    return {module_name(p, root): p for package in PACKAGES for p in sorted((root / package).rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str] | dict[str, Path]) -> set[str]:
    """The project modules the file imports, at any depth: ``from a import b`` counts ``a.b`` when it is a
    module, else ``a``; relative imports are resolved against ``name``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ``import a.b.c`` of a name inside a module: the module
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
    found.discard(name)
    return found


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imported_modules(path, name, modules) for name, path in modules.items()}


def task_package(module: str) -> str | None:
    return next((p for p in TASK_PACKAGES if module == p or module.startswith(p + ".")), None)


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        own = task_package(module)
        for target in sorted(targets):
            other = task_package(target)
            if other is not None and other != own and (module, other) not in ALLOWED:
                bad.append(f"{module} imports {target} ({'the trunk' if own is None else own} -> {other})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_every_package_is_seen(graph: dict[str, set[str]]) -> None:
    for package in (*PACKAGES, *TASK_PACKAGES):
        assert package in graph, f"{package} is not a package of the project"


def test_no_import_across_task_packages(graph: dict[str, set[str]]) -> None:
    violations = layering_violations(graph)
    assert not violations, "\n".join(violations)


def test_no_import_cycle(graph: dict[str, set[str]]) -> None:
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


# Trunk groups by kind, and the groups each may not import.
KIND_GROUPS = ("training", "checkpoints", "data", "deploy")
FORBIDDEN_BY_KIND = {"network": set(KIND_GROUPS), "checkpoints": {"deploy"}, "data": {"deploy"}}


def trunk_kind(module: str) -> str | None:
    """``network`` for a top-level trunk module, the group's name inside a group, None elsewhere."""
    parts = module.split(".")
    if parts[0] != "mbv3_dense" or len(parts) == 1 or parts[1] == "__main__":
        return None
    if parts[1] in KIND_GROUPS or parts[1] == "classification":
        return parts[1]
    return "network"


def test_the_trunk_is_layered_by_kind(graph: dict[str, set[str]]) -> None:
    assert {trunk_kind(m) for m in graph} >= {"network", *KIND_GROUPS}, "a trunk group is missing"
    violations = [f"{module} ({kind}) imports {target}" for module, targets in sorted(graph.items())
                  if (kind := trunk_kind(module)) in FORBIDDEN_BY_KIND
                  for target in sorted(targets) if trunk_kind(target) in FORBIDDEN_BY_KIND[kind]]
    assert not violations, "\n".join(violations)


def test_the_checker_sees_nested_and_relative_imports(tmp_path: Path) -> None:
    for name in ("detection/__init__.py", "detection/model.py", "segmentation/__init__.py",
                 "segmentation/heads.py", "mbv3_dense/__init__.py", "mbv3_dense/layers.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    (tmp_path / "detection/model.py").write_text(
        "from . import layers_missing\ndef f():\n    import segmentation.heads as h\n")
    (tmp_path / "segmentation/heads.py").write_text("from detection import model\nfrom mbv3_dense.layers import X\n")
    graph = import_graph(tmp_path)
    assert graph["detection.model"] == {"detection", "segmentation.heads"}
    assert graph["segmentation.heads"] == {"detection.model", "mbv3_dense.layers"}
    assert cycles(graph) == [["detection.model", "segmentation.heads"]]
    assert len(layering_violations(graph)) == 2
