"""The three layers, checked on the source: the core (``vigil``) at the bottom, the services
(``services``) in the middle, the tools (``vigil_tools``) on top.

- the core imports no service and no tool;
- a service imports no tool, and another service only through its published module
  (``services/<name>/public.py``);
- no import cycle between modules, counting imports inside functions (a cycle held apart by a
  function-local import is still a cycle), but not those under ``if TYPE_CHECKING:``.

Schemas (``schemas``) are data with their models and sit with the core.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("vigil", "services", "vigil_tools", "schemas")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str) -> str | None:
    """The project module ``name`` denotes (itself, or its nearest package)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from package import module`` imports that module; ``from module import name``
            # imports the module.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        for target in targets:
            resolved = _resolve(target)
            if resolved is not None and resolved != module:
                found.add(resolved)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def _layer(module: str) -> str:
    return module.split(".")[0]


def _service(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "services" and len(parts) > 1 else None


def test_the_graph_sees_imports() -> None:
    # Positive control: known edges are found, a relative import and a local import among them.
    assert "vigil.runtime" in GRAPH["services.notify.app"]
    assert "services.ingest.domain.validation" in GRAPH["services.ingest.bootstrap"]
    assert any(_layer(m) == "services" for m in GRAPH["vigil_tools.cli"])
    assert len(MODULES) > 150


def test_the_core_imports_no_service_and_no_tool() -> None:
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if _layer(module) in ("vigil", "schemas")
        for target in targets
        if _layer(target) in ("services", "vigil_tools")
    )
    assert wrong == []


def test_no_service_imports_a_tool() -> None:
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if _layer(module) == "services"
        for target in targets
        if _layer(target) == "vigil_tools"
    )
    assert wrong == []


def test_a_service_reaches_another_only_through_its_published_module() -> None:
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if _service(module) is not None
        for target in targets
        if _service(target) not in (None, _service(module))
        and target != f"services.{_service(target)}.public"
    )
    assert wrong == []


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:
        nonlocal counter
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(GRAPH[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(GRAPH[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles() -> None:
    assert _cycles() == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]), ({"a": {"b"}, "b": set()}, [])],
)
def test_the_cycle_finder_finds_a_cycle(
    graph: dict[str, set[str]], expected: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(f"{__name__}.GRAPH", graph)
    assert _cycles() == expected


SKELETON = ("domain/", "service_layer/", "adapters/", "entrypoints/", "bootstrap.py", "settings.py")
SERVICES = ("ingest", "rules", "notify", "api")


def _missing_parts(service_dir: Path) -> list[str]:
    missing = []
    for part in SKELETON:
        path = service_dir / part.rstrip("/")
        present = (path / "__init__.py").is_file() if part.endswith("/") else path.is_file()
        if not present:
            missing.append(part)
    return missing


def test_the_skeleton_check_sees_a_missing_part(tmp_path: Path) -> None:
    # Positive control: a service without its wiring module or entrypoints is reported.
    for part in ("domain", "service_layer", "adapters"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "__init__.py").write_text("")
    (tmp_path / "settings.py").write_text("")
    assert _missing_parts(tmp_path) == ["entrypoints/", "bootstrap.py"]


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_has_the_same_skeleton(service: str) -> None:
    assert _missing_parts(ROOT / "services" / service) == []


def test_every_service_is_checked() -> None:
    found = {p.parent.name for p in (ROOT / "services").glob("*/settings.py")}
    assert found == set(SERVICES)
