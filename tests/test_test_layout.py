"""The suite's layout: test modules never import each other or conftest (shared helpers live
in tests/helpers.py, fixtures in tests/conftest.py), so each module runs alone and the same
under `pytest` and `python -m pytest`."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def is_forbidden(module: str) -> bool:
    """A test module (`test_x`, `tests.test_x`) or conftest (`conftest`, `tests.conftest`)."""
    parts = module.split(".")
    if parts[0] == "tests":
        parts = parts[1:]
    return bool(parts) and (parts[0].startswith("test_") or parts[0] == "conftest")


def forbidden_imports(path: Path, root: Path = TESTS.parent) -> list[str]:
    """'file:line: imports module' (file relative to `root`), in line order, for each import
    of a test module or of conftest in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from tests import test_x` names the module in the imported names.
            modules = [node.module] + (
                [f"tests.{alias.name}" for alias in node.names] if node.module == "tests" else [])
        elif isinstance(node, ast.ImportFrom):  # relative: `from . import test_x`, `from .conftest`
            modules = ([node.module] if node.module else
                       [alias.name for alias in node.names])
        else:
            continue
        found += [(node.lineno, f"{path.relative_to(root)}:{node.lineno}: imports {module}")
                  for module in modules if is_forbidden(module)]
    return [entry for _, entry in sorted(found)]


def test_test_modules_import_neither_each_other_nor_conftest():
    files = sorted(TESTS.glob("test_*.py"))
    assert len(files) > 10
    found = [line for path in files for line in forbidden_imports(path)]
    assert not found, ("test modules must import shared helpers from tests/helpers.py "
                       "(fixtures come from conftest.py):\n" + "\n".join(found))


def test_the_check_catches_every_spelling(tmp_path):
    source = ("import tests.test_a\nfrom tests.test_b import x\nfrom test_c import y\n"
              "from tests import test_d, helpers\nfrom conftest import z\n"
              "from tests.conftest import w\nfrom . import test_e\nfrom .conftest import v\n"
              "def f():\n    import test_f\n"
              "from tests.helpers import ok\nimport torch\nfrom tests import helpers\n")
    path = tmp_path / "tests" / "test_probe.py"
    path.parent.mkdir()
    path.write_text(source, encoding="utf-8")
    found = forbidden_imports(path, root=tmp_path)
    assert [int(entry.split(":")[1]) for entry in found] == [1, 2, 3, 4, 5, 6, 7, 8, 10]
    assert found[0] == "tests/test_probe.py:1: imports tests.test_a"
    assert found[3] == "tests/test_probe.py:4: imports tests.test_d"
