"""Imports flow one way: scripts -> downstream -> pretraining -> {modality_encoders, adapters,
dataset_tools}, with dataset_tools at the bottom (docs/architecture.md). Type-only imports
count too: a lower package that names a higher one's types depends on it. Every import goes
through the installed `peftrec` namespace (pyproject.toml maps the folders into it)."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

BELOW = {
    "dataset_tools": set(),
    "adapters": {"dataset_tools"},
    "modality_encoders": {"dataset_tools"},
    "pretraining": {"adapters", "modality_encoders", "dataset_tools"},
    "downstream": {"pretraining", "adapters", "modality_encoders", "dataset_tools"},
}


def imported_modules(path: Path) -> set[str]:
    """The absolute module names a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module)
    return found


def imported_packages(path: Path) -> set[str]:
    """The project packages a module imports through `peftrec.` (relative imports excluded)."""
    names = [module.split(".") for module in imported_modules(path)]
    return {parts[1] for parts in names if parts[0] == "peftrec" and len(parts) > 1} & set(BELOW)


def test_packages_import_only_the_packages_below_them():
    upward = [f"{path.relative_to(ROOT)} imports {sorted(packages - BELOW[package])}"
              for package in BELOW
              for path in sorted((ROOT / package).rglob("*.py"))
              if (packages := imported_packages(path) - {package}) - BELOW[package]]
    assert not upward, upward


def test_every_import_goes_through_the_peftrec_namespace():
    """A bare `import adapters` would pick up whichever distribution's `adapters` comes first."""
    python_files = [path for folder in (*BELOW, "scripts", "benchmarks", "tests")
                    for path in sorted((ROOT / folder).rglob("*.py"))]
    bare = [f"{path.relative_to(ROOT)} imports {module}" for path in python_files
            for module in sorted(imported_modules(path)) if module.split(".")[0] in BELOW]
    assert not bare, bare


def test_the_distribution_installs_only_the_peftrec_namespace():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    import peftrec.adapters

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {name.split(".")[0] for name in setuptools["packages"]} == {"peftrec"}
    assert setuptools["package-dir"] == {"peftrec": "peftrec",
                                        **{f"peftrec.{package}": package for package in BELOW}}
    assert Path(peftrec.adapters.__file__).parent == ROOT / "adapters"


def test_a_checkout_on_pythonpath_imports_its_own_folders(tmp_path):
    """A clean worktree put on PYTHONPATH (as benchmarks and the GPU scripts do) must run its
    own code, not the installed copy's."""
    checkout = tmp_path / "checkout"
    for folder in ("peftrec", "pretraining"):
        (checkout / folder).mkdir(parents=True)
    shutil.copy(ROOT / "peftrec" / "__init__.py", checkout / "peftrec")
    (checkout / "pyproject.toml").write_text("")
    (checkout / "pretraining" / "__init__.py").write_text("WHERE = 'checkout'\n")
    result = subprocess.run(
        [sys.executable, "-c", "import peftrec.pretraining as p; print(p.WHERE)"],
        env={**os.environ, "PYTHONPATH": str(checkout)}, cwd=tmp_path,
        capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "checkout"
