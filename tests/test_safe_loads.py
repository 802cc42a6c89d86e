"""Only safe loads: checkpoints are safetensors and JSON, and a file that must go through
`torch.load` does so with `weights_only=True`. A scan of the code (its syntax tree, so
comments and docstrings may name what they like) finds every pickle load."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve"}


def package_folders() -> list[str]:
    """The folders pyproject.toml installs (mapped into the `peftrec` namespace)."""
    text = (ROOT / "pyproject.toml").read_text()
    folders = re.findall(r'^"peftrec[.\w]*"\s*=\s*"([^"]+)"', text, re.MULTILINE)
    assert folders, "pyproject.toml maps no folders into peftrec ([tool.setuptools.package-dir])"
    return folders


def scanned_files() -> list[Path]:
    folders = [*package_folders(), "scripts", "benchmarks"]
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def _dotted(node: ast.AST) -> str | None:
    """`a.b.c` of a name or attribute chain, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
               for k in call.keywords)


def unsafe_loads(source: str) -> list[tuple[int, str]]:
    """(line, what) of every unsafe load in Python `source`."""
    tree = ast.parse(source)
    modules: dict[str, str] = {}  # local name -> the module or function it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules[(alias.asname or alias.name).split(".")[0]] = alias.name.split(".")[0]
                if alias.name.split(".")[0] in UNPICKLERS - {"pickle"}:
                    found.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            for alias in node.names:
                modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            if root in UNPICKLERS - {"pickle"}:
                found.append((node.lineno, f"from {node.module} import ..."))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name is None:
            continue
        head, _, rest = name.partition(".")
        full = f"{modules.get(head, head)}.{rest}" if rest else modules.get(head, head)
        if _keyword_is_true(node, "allow_pickle"):
            found.append((node.lineno, f"{name}(..., allow_pickle=True)"))
        if full in ("torch.load", "torch.serialization.load") and not _keyword_is_true(
                node, "weights_only"):
            found.append((node.lineno, f"{name}(...) without weights_only=True"))
        module, _, function = full.rpartition(".")
        if module.split(".")[0] in UNPICKLERS and (function.startswith("load")
                                                   or function in ("Unpickler", "open")):
            found.append((node.lineno, f"{name}(...)"))
    return sorted(set(found))


CASES = [
    ("import torch\ntorch.load(f)\n", [2]),
    ("import torch\ntorch.load(f, weights_only=False)\n", [2]),
    ("import torch\ntorch.load(\n    f,\n    map_location='cpu',\n)\n", [2]),
    ("import torch as t\nt.load(f)\n", [2]),
    ("from torch import load\nload(f)\n", [2]),
    ("import pickle\npickle.load(f)\n", [2]),
    ("import pickle\nx = pickle.loads(b)\n", [2]),
    ("from pickle import loads as unpack\nunpack(b)\n", [2]),
    ("import pickle\npickle.Unpickler(f).load()\n", [2]),
    ("import numpy as np\nnp.load(f, allow_pickle=True)\n", [2]),
    ("import dill\n", [1]),
    ("from joblib import dump\n", [1]),
    ("import joblib\njoblib.load(f)\n", [1, 2]),
    # safe
    ("import torch\ntorch.load(f, map_location='cpu', weights_only=True)\n", []),
    ("import numpy as np\nnp.load(f)\nnp.load(f, allow_pickle=False)\n", []),
    ("import pickle\nb = pickle.dumps(x)\n", []),
    ("import json\njson.load(f)\n# torch.load(f) in a comment\n'''pickle.load(f)'''\n", []),
    ("self.accelerator.load_state(d, load_kwargs={'weights_only': True})\n", []),
]


@pytest.mark.parametrize(("source", "lines"), CASES)
def test_the_scan_finds_each_unsafe_load(source, lines):
    assert [line for line, _ in unsafe_loads(source)] == lines


def test_the_scan_covers_every_package_and_the_scripts():
    scanned = {path.relative_to(ROOT).parts[0] for path in scanned_files()}
    assert scanned >= {"pretraining", "downstream", "adapters", "modality_encoders",
                       "dataset_tools", "scripts", "benchmarks"}
    assert (ROOT / "pretraining" / "trainer.py") in scanned_files()


def test_no_code_loads_a_pickle():
    problems = [f"{path.relative_to(ROOT)}:{line}: {what}"
                for path in scanned_files()
                for line, what in unsafe_loads(path.read_text(encoding="utf-8"))]
    assert not problems, ("unsafe loads (use safetensors or JSON, or torch.load(..., "
                          "weights_only=True)):\n" + "\n".join(problems))


def test_resume_state_is_safetensors_and_loads_weights_only(tiny_dataset_dir, tmp_path,
                                                            monkeypatch):
    """The training state: the model in safetensors, the rest read back by torch.load with
    weights_only=True (Accelerate's `load`), our own state in JSON."""
    import torch

    from tests.helpers import run_pretrain

    run = tmp_path / "run"
    run_pretrain(tiny_dataset_dir, run, "--epochs", "1")
    state = run / "state"
    assert (state / "model.safetensors").is_file() and not (state / "pytorch_model.bin").exists()
    assert (state / "trainer_state.json").is_file()
    calls = []
    original = torch.load

    def recording_load(f, *args, **kwargs):
        calls.append((Path(f).name, kwargs.get("weights_only")))
        return original(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    run_pretrain(tiny_dataset_dir, run, "--epochs", "2", "--resume")
    names = {name for name, _ in calls}
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= names, calls
    assert all(weights_only is True for _, weights_only in calls), calls
