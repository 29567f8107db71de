"""Project rules that code review would otherwise have to remember: import direction and the commands."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ingest", "shards", "catalog", "training", "analysis")
# DESIGN.md: ingest -> shards, catalog; training -> shards, catalog; analysis -> training, shards, catalog.
ALLOWED = {
    "ingest": {"shards", "catalog"},
    "training": {"shards", "catalog"},
    "analysis": {"training", "shards", "catalog"},
    "shards": {"catalog"},  # the CLI reads the catalog; the library only its storage layer, catalog.storage
    "catalog": set(),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_import_direction_and_no_cli_imports(package):
    for path in (ROOT / package).glob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in PACKAGES and top != package:
                if package == "shards" and path.name != "cli.py":
                    # catalog.storage is the layer below both (it imports nothing from catalog or shards).
                    assert name == "catalog.storage", f"{path}: the shards library must not import {name}"
                assert top in ALLOWED[package], f"{path} imports {name}"
            if name.endswith(".cli") and path.name != "__main__.py":
                raise AssertionError(f"{path} imports a command-line module {name}")


@pytest.mark.parametrize("package", PACKAGES)
def test_python_dash_m_and_console_script(package):
    module = subprocess.run([sys.executable, "-m", package, "--help"], capture_output=True, text=True)
    assert module.returncode == 0 and "usage:" in module.stdout
    script = Path(sys.executable).parent / package
    assert script.exists(), f"console script {package} not installed"
    assert subprocess.run([str(script), "--help"], capture_output=True, text=True).stdout == module.stdout
