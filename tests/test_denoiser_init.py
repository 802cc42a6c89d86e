"""--init-denoiser-from: DiffRec's denoiser started from a trained SASRec's Transformer."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftrec.pretraining.cli import CommandLineError
from peftrec.pretraining.diffrec import DiffRec, DiffRecConfig
from peftrec.pretraining.recommender import CheckpointError
from peftrec.pretraining.sasrec import SASRec, SASRecConfig
from tests.helpers import run_pretrain

SHAPE = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "ffn_size": 32, "dropout": 0.0}
DIFFREC = ["--backbone", "diffrec", "--preset", "none", "--causal-denoiser", "--diffusion-steps",
           "20", "--num-seeds", "2"]


def trained_like_sasrec(max_len: int) -> SASRec:
    """A SASRec whose weights are far from their initialisation (norms included), so that
    a wrong scale or position anywhere shows."""
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(max_len=max_len, **SHAPE))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    return model.eval()


def diffrec_history_states(model: DiffRec, vectors: torch.Tensor, mask: torch.Tensor):
    """The final-normed states of the clean history stream, placed as at inference (the
    history ends one position before the target's)."""
    start = model.config.max_len - vectors.shape[1] - 1
    x = model.embed(vectors, mask, None, start, 0)
    for layer in model.layers:
        x = layer(x, model._mask(vectors.shape[1], mask)) * mask[..., None]
    return model.final_norm(x)


@pytest.mark.parametrize("diffrec_len", [21, 9], ids=["all-sasrec-positions", "the-last-8"])
def test_the_history_is_encoded_exactly_as_sasrec_encodes_it(diffrec_len):
    sasrec = trained_like_sasrec(max_len=20)
    model = DiffRec(DiffRecConfig(max_len=diffrec_len, causal_denoiser=True, num_steps=20,
                                  **SHAPE)).eval()
    model.load_sasrec_transformer(sasrec.state_dict(), sasrec.config)
    length = diffrec_len - 1
    vectors = torch.randn(3, length, 16)
    mask = torch.ones(3, length, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    vectors = vectors * mask[..., None]
    with torch.no_grad():
        expected = sasrec(vectors, mask)
        got = diffrec_history_states(model, vectors, mask)
    torch.testing.assert_close(got[mask], expected[mask], atol=2e-4, rtol=1e-3)
    # The noised target's position (only ever noised) reuses SASRec's last one.
    scale = 16 ** -0.5
    torch.testing.assert_close(model.position_embedding.weight[-1],
                               sasrec.position_embedding.weight[-1] * scale)


def test_without_the_copy_the_history_is_encoded_otherwise():
    """The equality above is the copy's doing: a fresh denoiser encodes differently."""
    sasrec = trained_like_sasrec(max_len=20)
    model = DiffRec(DiffRecConfig(max_len=21, causal_denoiser=True, num_steps=20, **SHAPE))
    vectors, mask = torch.randn(2, 20, 16), torch.ones(2, 20, dtype=torch.bool)
    with torch.no_grad():
        assert not torch.allclose(diffrec_history_states(model.eval(), vectors, mask),
                                  sasrec(vectors, mask), atol=1e-2)


def test_a_transformer_of_another_shape_or_too_few_positions_is_refused():
    sasrec = trained_like_sasrec(max_len=20)
    wide = DiffRec(DiffRecConfig(max_len=21, num_steps=20, **{**SHAPE, "ffn_size": 64}))
    with pytest.raises(ValueError, match=r"another shape \(ffn_size 32 vs 64\)"):
        wide.load_sasrec_transformer(sasrec.state_dict(), sasrec.config)
    long = DiffRec(DiffRecConfig(max_len=22, num_steps=20, **SHAPE))
    with pytest.raises(ValueError, match="pass --max-len 21 or less"):
        long.load_sasrec_transformer(sasrec.state_dict(), sasrec.config)


@pytest.fixture(scope="module")
def sasrec_run(tiny_dataset_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("source") / "sasrec"
    run_pretrain(tiny_dataset_dir, run, "--epochs", "1", "--repeat-bias", "--lr", "0.05")
    return run


def test_a_run_starts_its_denoiser_and_repeat_bias_from_the_sasrec_run_and_records_it(
    tiny_dataset_dir, sasrec_run, initial_weights, tmp_path
):
    run = tmp_path / "run"
    run_pretrain(tiny_dataset_dir, run, *DIFFREC, "--repeat-bias", "--max-len", "21",
                 "--init-denoiser-from", str(sasrec_run), "--epochs", "1")
    source = load_file(sasrec_run / "best_model" / "model.safetensors")
    for name in ("layers.0.attention.q_proj.weight", "layers.1.feed_forward.fc1.bias",
                 "layers.1.ffn_norm.weight", "final_norm.bias"):
        assert torch.equal(initial_weights[f"backbone.{name}"], source[f"backbone.{name}"])
    torch.testing.assert_close(initial_weights["backbone.layers.0.attention.o_proj.weight"],
                               source["backbone.layers.0.attention.o_proj.weight"] / 4)
    assert source["repeat_bias"] != 0
    assert torch.equal(initial_weights["repeat_bias"], source["repeat_bias"])
    recorded = json.loads((run / "config.json").read_text())["model"]["denoiser_init"]
    assert recorded["checkpoint"] == str((sasrec_run / "best_model").absolute())
    # A resume must start from the same source.
    with pytest.raises(CheckpointError, match=r"model settings differ \(\['denoiser_init'\]\)"):
        run_pretrain(tiny_dataset_dir, run, *DIFFREC, "--repeat-bias", "--max-len", "21",
                     "--epochs", "2", "--resume")


def test_bad_sources_are_refused_before_a_run_folder_is_written(
    tiny_dataset_dir, sasrec_run, tmp_path
):
    diffrec_run = tmp_path / "diffrec"
    run_pretrain(tiny_dataset_dir, diffrec_run, *DIFFREC, "--epochs", "1")
    with pytest.raises(CheckpointError, match="is a 'diffrec' run; the denoiser starts from a"):
        run_pretrain(tiny_dataset_dir, tmp_path / "a", *DIFFREC,
                     "--init-denoiser-from", str(diffrec_run))
    with pytest.raises(CheckpointError, match=r"another shape \(hidden_size 16 vs 32\)"):
        run_pretrain(tiny_dataset_dir, tmp_path / "b", *DIFFREC, "--hidden-size", "32",
                     "--init-denoiser-from", str(sasrec_run))
    with pytest.raises(CheckpointError, match="pass --max-len 21 or less"):
        run_pretrain(tiny_dataset_dir, tmp_path / "c", *DIFFREC, "--max-len", "30",
                     "--init-denoiser-from", str(sasrec_run))
    with pytest.raises(CheckpointError, match="no pretrained checkpoint there"):
        run_pretrain(tiny_dataset_dir, tmp_path / "d", *DIFFREC,
                     "--init-denoiser-from", str(tmp_path))
    with pytest.raises(CommandLineError, match="--init-denoiser-from: DiffRec settings"):
        run_pretrain(tiny_dataset_dir, tmp_path / "e", "--init-denoiser-from", str(sasrec_run))
    assert not any((tmp_path / name).exists() for name in "abcde")
