"""Every backbone x adapter method through the adapter scripts' code path (issue 27 item 7):
each combination trains one step on a target domain and saves its adapter, or is refused in
one line naming why. Each backbone is pretrained once, tiny, with its default preset; every
run evaluates a sample of 8 users."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from peftrec.pretraining.recommender import BACKBONES
from tests.helpers import finetune, run_pretrain

# Every registered backbone, with fewer diffusion steps and seeds where flags set them
# (DiffRec's, read by DreamRec and DimeRec too): the matrix checks the code path, not the
# model.
PRETRAIN = {
    "sasrec": [],
    "diffrec": ["--diffusion-steps", "10", "--num-seeds", "2"],
    "adrec": [],
    "diffurec": [],
    "dreamrec": ["--preset", "none", "--diffusion-steps", "10"],  # its preset needs a run
    "dimerec": ["--diffusion-steps", "10", "--inference-steps", "5", "--num-seeds", "2"],
}
FAST = ["--epochs", "1", "--max-steps", "1", "--eval-users", "8"]
# method -> the methods its script offers (as scripts/adapter_*.py) and its flags.
METHODS = {
    "houlsby": (("houlsby", "pfeiffer"), ["--method", "houlsby"]),
    "lora": (("lora",), []),
    "prefix": (("prefix", "prompt"), ["--method", "prefix"]),
    "diffusion_step": (("diffusion_step",), []),
}
# The one-line refusals: (backbone, method) -> what the error says.
REFUSED = {("sasrec", "diffusion_step"): "SASRec has no diffusion step: choose houlsby, lora "
           "or prefix"}
# DreamRec reads the step in its MLP denoiser, which has no attention site.
SITES = {("dreamrec", "diffusion_step"): ["--sites", "ffn"]}


@pytest.fixture(scope="module")
def pretrained(tiny_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """backbone -> a one-step pretraining run folder of it, trained on first use."""
    runs = {}

    def run_of(backbone: str) -> Path:
        if backbone not in runs:
            run = tmp_path_factory.mktemp(backbone) / "run"
            run_pretrain(tiny_dataset_dir, run, "--backbone", backbone, *FAST, "--num-layers", "1",
                         *PRETRAIN[backbone])
            runs[backbone] = run  # only once it trained: a failed run fails each test alike
        return runs[backbone]

    return run_of


def test_the_matrix_covers_every_registered_backbone():
    assert set(PRETRAIN) == set(BACKBONES)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("backbone", list(PRETRAIN))
def test_each_backbone_trains_each_adapter_or_refuses_it_in_one_line(
        backbone, method, pretrained, target_dir, tmp_path):
    methods, flags = METHODS[method]
    argv = ["--pretrained", str(pretrained(backbone)), "--dataset", str(target_dir),
            "--output-dir", str(tmp_path / "run"), *FAST, *flags,
            *SITES.get((backbone, method), [])]
    if (backbone, method) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[backbone, method]) as refusal:
            finetune(methods, *argv)
        assert "\n" not in str(refusal.value)
        return
    metrics = finetune(methods, *argv)
    assert math.isfinite(metrics["valid"]["ndcg@10"])
    assert (tmp_path / "run" / "best_model" / "adapter_model.safetensors").is_file()
