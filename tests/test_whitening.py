"""`--whitening`: the cached encoder outputs whitened with the catalog's own statistics."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from peftrec.dataset_tools import load_dataset_folder
from peftrec.downstream import build_target_model, target_config
from peftrec.modality_encoders import build_item_content, whiten
from peftrec.pretraining.cli import run_main
from peftrec.pretraining.recommender import SequentialRecommender, load_recommender_config
from tests.helpers import MODEL, TRAIN, finetune, load_script


def anisotropic(n: int = 400, dim: int = 6, seed: int = 0) -> torch.Tensor:
    """Vectors with a common offset and unequal, correlated variances (like sentence
    vectors)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator) * torch.logspace(0, -1, dim)[:, None]
    return torch.randn(n, dim, generator=generator) @ mixing + 3.0


def covariance(x: torch.Tensor) -> torch.Tensor:
    centred = x - x.mean(0)
    return centred.T @ centred / (len(x) - 1)


def test_zca_centres_and_decorrelates_to_near_unit_variance():
    x = anisotropic()
    eigenvalues = torch.linalg.eigvalsh(covariance(x))
    assert eigenvalues.max() / eigenvalues.min() > 50  # the input is far from white
    white = whiten(x, "zca")
    assert white.shape == x.shape and white.dtype == x.dtype
    torch.testing.assert_close(white.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
    # The covariance becomes lambda / (lambda + floor) in each eigendirection: the identity
    # up to the floor (1% of the mean eigenvalue), which keeps near-empty directions small.
    floor = 1e-2 * eigenvalues.mean()
    expected = (eigenvalues / (eigenvalues + floor)).double()
    torch.testing.assert_close(torch.linalg.eigvalsh(covariance(white)).double(), expected,
                               atol=1e-4, rtol=1e-4)


def test_zca_keeps_the_encoder_axes():
    """ZCA, not PCA: vectors that are already white come back (almost) unchanged, whatever
    the order of the eigenvalues, so two catalogs are whitened in the same basis."""
    x = torch.randn(20000, 4, generator=torch.Generator().manual_seed(1))
    x = (x - x.mean(0)) @ torch.linalg.inv(torch.linalg.cholesky(covariance(x))).T
    torch.testing.assert_close(whiten(x, "zca"), x / 1.01 ** 0.5, atol=1e-3, rtol=1e-3)


def test_center_only_subtracts_the_mean_and_none_is_the_identity():
    x = anisotropic()
    centred = whiten(x, "center")
    torch.testing.assert_close(centred, x - x.mean(0), atol=1e-5, rtol=0)
    assert whiten(x, "none") is x


def test_a_catalog_smaller_than_the_encoder_width_is_whitened_without_blowing_up():
    x = anisotropic(n=5, dim=32)
    white = whiten(x, "zca")
    assert torch.isfinite(white).all() and white.abs().max() < 100


def test_an_unknown_whitening_is_named():
    with pytest.raises(ValueError, match="unknown --whitening 'pca'; choose one of none, "
                                         "center, zca"):
        whiten(torch.zeros(3, 2), "pca")


@pytest.fixture(scope="module")
def whitened_base(tiny_dataset_dir, tmp_path_factory):
    """A text SASRec pretrained with --whitening zca; (run, encoder, encoder cache)."""
    from tests.helpers import save_bert

    root = tmp_path_factory.mktemp("whitened")
    encoder = save_bert(root / "bert", dropout=0.0)
    run = root / "run"
    load_script("pretrain_text").main([
        "--dataset", str(tiny_dataset_dir), "--output-dir", str(run), "--epochs", "1",
        "--encoder", str(encoder), "--text-template", "{title} ({genre})",
        "--encoder-cache-dir", str(root / "cache"), "--whitening", "zca", *MODEL, *TRAIN])
    return run, encoder, root / "cache"


def test_the_head_reads_the_whitened_catalog_and_the_checkpoint_rebuilds_it(
        whitened_base, tiny_dataset_dir):
    run, _, cache = whitened_base
    config = json.loads((run / "config.json").read_text())["model"]["item_encoder_config"]
    assert config["whitening"] == "zca"
    data = load_dataset_folder(tiny_dataset_dir)
    content = build_item_content(data, "text", config, cache)
    model = SequentialRecommender.from_pretrained(run / "best_model", content=content).eval()
    outputs = model.item_encoder.outputs
    torch.testing.assert_close(outputs.mean(0), torch.zeros(outputs.shape[1]), atol=1e-4,
                               rtol=0)
    # The buffer is not in the checkpoint: it is rebuilt from the cache, then whitened.
    raw = [path for path in cache.rglob("*") if path.is_file()]
    assert raw and "item_encoder.outputs" not in model.state_dict()
    evaluated = json.loads((run / "metrics.json").read_text())["test"]
    again = finetune((), "--pretrained", str(run), "--dataset", str(tiny_dataset_dir),
                     "--output-dir", str(run.parent / "again"), "--encoder-cache-dir",
                     str(cache), "--zero-shot")["test"]
    assert again == pytest.approx(evaluated)


def test_a_transferred_model_whitens_the_targets_catalog_with_its_own_statistics(
        whitened_base, target_dir):
    run, _, cache = whitened_base
    base_dir = run / "best_model"
    target = load_dataset_folder(target_dir)
    model = build_target_model(target_config(load_recommender_config(base_dir), target),
                               base_dir, target, cache)
    outputs = model.item_encoder.outputs
    assert len(outputs) == target.num_items
    torch.testing.assert_close(outputs.mean(0), torch.zeros(outputs.shape[1]), atol=1e-4,
                               rtol=0)
    zero = finetune((), "--pretrained", str(run), "--dataset", str(target_dir), "--output-dir",
                    str(run.parent / "zero"), "--encoder-cache-dir", str(cache), "--zero-shot")
    assert 0.0 <= zero["test"]["ndcg@10"] <= 1.0


@pytest.mark.parametrize("flags, message", [
    (["--whitening", "zca", "--train-encoder"], "--whitening zca whitens the cached outputs of "
                                                "a frozen encoder; drop it or drop "
                                                "--train-encoder"),
    (["--config", "CONFIG"], "c.yaml: whitening: 'pca' is not one of ['none', 'center', "
                             "'zca']"),
])
def test_bad_whitening_settings_fail_in_one_line(whitened_base, tiny_dataset_dir, tmp_path,
                                                 capsys, flags, message):
    _, encoder, cache = whitened_base
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"whitening": "pca"}))
    flags = [str(tmp_path / "c.yaml") if flag == "CONFIG" else flag for flag in flags]
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_main(load_script("pretrain_text").main, [
            "--dataset", str(tiny_dataset_dir), "--output-dir", str(out), "--encoder",
            str(encoder), "--text-template", "{title}", "--encoder-cache-dir", str(cache),
            *flags, *MODEL, *TRAIN])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out.exists()
