"""pyproject.toml's dependency ranges: met by the installed versions, and no lower bound
older than what the APIs the code calls need."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement  # installed with transformers
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]

# The oldest version of a dependency that has an API the code calls: (version, the API,
# a file that calls it). A lower bound below it would let pip install a version the code
# cannot run on.
API_MINIMUMS = {
    # Masks for encoder models (huggingface/transformers#41265, merged after 4.57): 5.x only.
    "transformers": ("5.0", "masking_utils import create_bidirectional_mask",
                     "modality_encoders/transformer.py"),
    "torch": ("2.0", "F.scaled_dot_product_attention", "pretraining/sasrec.py"),
    # huggingface/accelerate#2441 (0.28) moved the data loader settings into it.
    "accelerate": ("0.28", "DataLoaderConfiguration(use_seedable_sampler",
                   "pretraining/trainer.py"),
    # The low-level API (huggingface/peft#749, 0.5).
    "peft": ("0.5", "inject_adapter_in_model", "adapters/lora.py"),
}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def lower_bound(requirement: Requirement) -> Version | None:
    bounds = [Version(spec.version) for spec in requirement.specifier
              if spec.operator in (">=", "==", "~=")]
    return max(bounds, default=None)


def test_installed_versions_meet_the_declared_ranges():
    declared = [(Requirement(text), True) for text in project()["dependencies"]]
    declared += [(Requirement(text), False)
                 for extra in project()["optional-dependencies"].values() for text in extra]
    outside = []
    for requirement, needed in declared:
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            assert not needed, f"{requirement.name} is a dependency but is not installed"
            continue  # an extra not installed here
        if not requirement.specifier.contains(installed, prereleases=True):
            outside.append(f"{requirement.name} {installed} (declared {requirement.specifier})")
    assert not outside, outside


def test_lower_bounds_are_at_least_what_the_apis_used_need():
    bounds = {r.name: lower_bound(r) for r in map(Requirement, project()["dependencies"])}
    assert all(bounds.values()), f"dependencies without a lower bound: {bounds}"
    for name, (minimum, api, path) in API_MINIMUMS.items():
        assert api in (ROOT / path).read_text(), f"{path} no longer calls {api}: update the table"
        assert bounds[name] >= Version(minimum), (
            f"{name}>={bounds[name]}, but {api} ({path}) needs {name}>={minimum}")
    assert bounds["transformers"] >= Version("5")
