"""The package's layers: ``runtime`` is the floor and imports nothing above it; every other folder imports
only the layers its job needs (docs/ARCHITECTURE.md). Read from the source with ``ast``, so a lazy import
inside a function counts as much as one at the top of a module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Which sibling packages each folder may import (itself always allowed).
ALLOWED: dict[str, set[str]] = {
    "runtime": set(),
    "calib_data": {"runtime"},
    "export": {"runtime"},
    "quantize": {"runtime", "calib_data"},
    "eval": {"runtime", "calib_data", "export"},
    "detect": {"runtime", "eval"},  # eval.backends opens the runner for a model file
    # The front door (the package's own folder) re-exports the pipeline; ``api`` is its own module.
    "centernet_edge": {"runtime", "calib_data", "export", "quantize", "eval", "detect", "api"},
}
OPTIONAL_LAYERS: dict[str, set[str]] = {
    "engine": {"runtime", "calib_data", "quantize"},
    "bundle": {"runtime", "export", "quantize"},
}


def _layers() -> dict[str, set[str]]:
    layers = dict(ALLOWED)
    layers.update({name: deps for name, deps in OPTIONAL_LAYERS.items() if (REPO / name).is_dir()})
    return layers


def _imported_packages(path: Path, package: str) -> set[tuple[str, int]]:
    """(sibling package, line) for every centernet_edge import in one file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    depth = len(path.relative_to(REPO / package).parts) - 1  # folders below the package root
    found: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = [node.module or ""]
            elif node.level > depth + 1:
                # ``from ..x import`` out of the package root: a sibling package.
                names = [f"centernet_edge.{node.module or ''}"]
            else:
                names = [f"centernet_edge.{package}"]
        for name in names:
            parts = name.split(".")
            if parts[0] == "centernet_edge" and len(parts) > 1:
                found.add((parts[1], node.lineno))
    return found


def _upward_imports() -> list[str]:
    layers = _layers()
    problems = []
    for package, allowed in layers.items():
        for path in sorted((REPO / package).rglob("*.py")):
            for imported, line in sorted(_imported_packages(path, package)):
                if imported != package and imported not in allowed:
                    problems.append(f"{path.relative_to(REPO)}:{line} imports centernet_edge.{imported}")
    return problems


def test_no_upward_imports() -> None:
    assert _upward_imports() == []


def test_the_checker_sees_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule can fail: a runtime module that imports export (even lazily, even relatively) is caught."""
    fake = tmp_path / "repo"
    for package in ALLOWED:
        (fake / package).mkdir(parents=True)
    (fake / "runtime" / "bad.py").write_text(
        "def f():\n    from centernet_edge.export.models import ARCHITECTURES\n    return ARCHITECTURES\n"
    )
    (fake / "runtime" / "worse.py").write_text("from ..quantize import graph\n")
    (fake / "export" / "fine.py").write_text("from centernet_edge.runtime.spec import ModelSpec\nfrom . import x\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", fake)
    assert _upward_imports() == [
        "runtime/bad.py:2 imports centernet_edge.export",
        "runtime/worse.py:1 imports centernet_edge.quantize",
    ]


def test_runtime_imports_without_torch() -> None:
    """Every runtime module loads without torch (only the PyTorch runner, in export, needs it)."""
    modules = sorted(p.stem for p in (REPO / "runtime").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module('centernet_edge.runtime.' + m)\n"
        "heavy = sorted(k for k in ('torch', 'centernet_edge.export', 'centernet_edge.quantize', "
        "'centernet_edge.eval') if k in sys.modules)\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stderr
