"""Imports flow one way: scripts -> downstream -> pretraining -> {modality_encoders, adapters,
dataset_tools}, with dataset_tools at the bottom (docs/architecture.md). Type-only imports
count too: a lower package that names a higher one's types depends on it."""

import ast
from pathlib import Path

from tests.helpers import ROOT

BELOW = {
    "dataset_tools": set(),
    "adapters": {"dataset_tools"},
    "modality_encoders": {"dataset_tools"},
    "pretraining": {"adapters", "modality_encoders", "dataset_tools"},
    "downstream": {"pretraining", "adapters", "modality_encoders", "dataset_tools"},
}


def imported_packages(path: Path) -> set[str]:
    """The project packages a module imports (anywhere in it, relative imports excluded)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(BELOW)


def test_packages_import_only_the_packages_below_them():
    upward = [f"{path.relative_to(ROOT)} imports {sorted(packages - BELOW[package])}"
              for package in BELOW
              for path in sorted((ROOT / package).rglob("*.py"))
              if (packages := imported_packages(path) - {package}) - BELOW[package]]
    assert not upward, upward
