"""The package's shape (docs/ARCHITECTURE.md): layers that import only downward, no import cycles,
modules of a readable size, and no reaching into another object's private attributes."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "service"
TESTS = ROOT / "tests"
MAX_LINES = 350


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
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


def test_no_import_cycles() -> None:
    g = grimp.build_graph("service")
    edges = {m: set(g.find_modules_directly_imported_by(m)) for m in g.modules}
    assert _cycle(edges) is None, " -> ".join(_cycle(edges) or [])


def test_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_modules_are_of_a_readable_size() -> None:
    big = {
        str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not big, big


def _own_private_names() -> set[str]:
    """Private attributes this package and its tests define (``self._x = ...``, class-level ``_x``)."""
    names: set[str] = set()
    for path in [*PACKAGE.rglob("*.py"), *TESTS.rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr.startswith("_") and not t.attr.startswith("__"):
                    names.add(t.attr)
                if isinstance(t, ast.Name) and t.id.startswith("_") and not t.id.startswith("__"):
                    names.add(t.id)
    return names


def test_no_private_attribute_of_another_object() -> None:
    """``x._name`` of the package's own private attributes only on ``self`` or ``cls``, in the package
    and in its tests: tests go through public behaviour (a library's private attributes, where we must
    read one, are outside this rule: see service/models/fusers/t5decode.py)."""
    own = _own_private_names()
    found = []
    for path in [*PACKAGE.rglob("*.py"), *TESTS.rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in own
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    assert not found, found


def test_architecture_names_files_that_exist() -> None:
    """Every file or folder docs/ARCHITECTURE.md names (``pipeline/plan.py``, ``serving/edge/``) is in
    the package, so that the map follows the code when a file moves."""
    import re

    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:service/)?[a-z_/]+(?:\.py|/))`", text))
    present = {str(p.relative_to(ROOT)) + ("/" if p.is_dir() else "") for p in PACKAGE.rglob("*")}
    missing = sorted(
        n for n in named if not (ROOT / n).exists() and not any(p.endswith(n.removeprefix("service/")) for p in present)
    )
    assert named and not missing, missing


def test_every_package_is_tracked_and_installed() -> None:
    """Each folder of Python modules is a package git keeps (its ``__init__.py`` tracked: a clean clone
    has only what git tracks) and that setuptools finds (``pip install .``, the images, installs only
    those: a folder without ``__init__.py`` is left out of the wheel)."""
    from setuptools import find_packages

    tracked = set(
        subprocess.run(["git", "ls-files", "service"], capture_output=True, text=True, cwd=ROOT).stdout.split()
    )
    # Alembic's migrations are package data (pyproject's package-data), read by path, not imported.
    folders = {p.parent for p in PACKAGE.rglob("*.py") if not {"__pycache__", "migrations"} & set(p.parts)}
    for folder in folders:
        init = (folder / "__init__.py").relative_to(ROOT).as_posix()
        assert init in tracked, f"{init} is not tracked by git (is it ignored?)"
    found = set(find_packages(str(ROOT), include=["service*"]))
    assert {".".join(f.relative_to(ROOT).parts) for f in folders} <= found
