"""The layout holds: no import cycle between modules of gateway/ and exporters/ (imports under
TYPE_CHECKING and inside functions count), no module over MAX_LINES, and the names users import
(README, pyproject.toml's entry points) still import."""

from __future__ import annotations

import ast
import importlib
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "exporters")
GENERATED = REPO / "gateway" / "pb"
MAX_LINES = 450


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every hand-written module (generated stubs excluded)."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            if GENERATED in path.parents:
                continue
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of `known` that `name` imports anywhere in its body (ast: every `import`)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = base[: len(base) - (node.level - 1)]
                mod = ".".join([*up, node.module] if node.module else up)
            else:
                mod = node.module or ""
            # `from pkg import mod` imports the module pkg.mod when there is one.
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod
                       for a in node.names]
        for t in targets:
            if t == "gateway.pb" or t.startswith("gateway.pb."):
                continue  # generated stubs: they import nothing of ours
            # The nearest enclosing known module (`from a.b import f` of a module a.b), but not
            # a top-level package reached only by walking up.
            while t and t not in known and "." in t:
                t = t.rpartition(".")[0]
            if t in known and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported(name, path, known) for name, path in mods.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `g` as a path (first == last), or None. Iterative DFS, bounded by |g|."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(g, WHITE)
    for root in sorted(g):
        if color[root] != WHITE:
            continue
        stack: list[tuple[str, list[str]]] = [(root, sorted(g[root]))]
        path = [root]
        color[root] = GREY
        while stack:
            node, todo = stack[-1]
            if not todo:
                color[node] = BLACK
                stack.pop()
                path.pop()
                continue
            nxt = todo.pop()
            if color.get(nxt) == GREY:
                return [*path[path.index(nxt):], nxt]
            if color.get(nxt) == WHITE:
                color[nxt] = GREY
                stack.append((nxt, sorted(g[nxt])))
                path.append(nxt)
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_only_the_command_line_imports_the_app() -> None:
    # Observers and operator surfaces see the gateway through gateway.hooks.RunningGateway.
    importers = sorted(name for name, deps in graph().items() if "gateway.app" in deps)
    assert importers == ["gateway.cli"], importers


def test_cycle_finder_sees_type_checking_and_function_imports(tmp_path: Path) -> None:
    # The checker itself: a cycle closed only under TYPE_CHECKING, or only inside a function,
    # is still a cycle.
    pkg = tmp_path / "p"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from p.b import B\n")
    (pkg / "b.py").write_text("def f():\n    from . import c\n")
    (pkg / "c.py").write_text("import p.a\n")
    known = {"p", "p.a", "p.b", "p.c"}
    g = {n: imported(n, pkg / (n.split(".")[-1] + ".py") if n != "p" else pkg / "__init__.py",
                     known) for n in known}
    assert g["p.a"] == {"p.b"} and g["p.b"] == {"p.c"} and g["p.c"] == {"p.a"}
    assert find_cycle(g) is not None
    (pkg / "c.py").write_text("")
    g["p.c"] = imported("p.c", pkg / "c.py", known)
    assert find_cycle(g) is None


def test_no_module_over_the_limit() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    over = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


@pytest.mark.parametrize("module, name", [
    ("gateway", "status"),
    ("gateway", "GatewayStatus"),
    ("gateway.custom_metrics", "Counter"),
    ("gateway.custom_metrics", "Gauge"),
    ("gateway.custom_metrics", "Histogram"),
    ("gateway.telemetry", "MetricsExporter"),
    ("exporters.base", "RecordExporter"),
])
def test_public_names_import(module: str, name: str) -> None:
    assert hasattr(importlib.import_module(module), name)


def test_entry_points_resolve() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    refs = dict(project["scripts"])
    for group in project["entry-points"].values():
        refs.update(group)
    assert len(refs) >= 5  # the `gateway` command and the four exporters
    for key, ref in refs.items():
        module, _, attr = ref.partition(":")
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        assert callable(obj), key
