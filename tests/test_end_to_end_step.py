"""The end-to-end text step (a trained encoder inside the step): each fine-tuning run may
choose its loss, the step encodes only the items it needs, chunks are padded to their own
longest text, and bf16 autocast runs through the partial cache."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from peftrec.adapters import HoulsbyConfig
from peftrec.dataset_tools import load_dataset_folder
from peftrec.downstream import evaluate_any_run
from peftrec.downstream.transfer import matched_target_model, target_config
from peftrec.modality_encoders.content_encoder import ContentItemEncoder
from peftrec.modality_encoders.transformer import TransformerStages
from peftrec.pretraining.cli import evaluate_parser, parse_args
from peftrec.pretraining.recommender import RecommenderConfig, load_recommender_config
from tests.helpers import finetune, perturb_adapters, save_bert, text_content, text_encoder

HOULSBY = ("houlsby", "pfeiffer")
# Item texts of 1 to 13 words: chunks sorted by length are padded far less than one batch.
TEXTS = [" ".join(["word"] * n) for n in (7, 1, 13, 2, 9, 3, 11, 4, 1, 6)]


@pytest.fixture
def encoded_chunks(monkeypatch) -> list[torch.Tensor]:
    """The items of every forward pass of a trained content encoder."""
    calls = []
    original = ContentItemEncoder._encode_chunk

    def spy(self, items, width=None):
        calls.append(items.clone())
        return original(self, items, width)

    monkeypatch.setattr(ContentItemEncoder, "_encode_chunk", spy)
    return calls


def adapted_target(text_base, target_dir, objective=None, layers="top:1"):
    run_dir, cache = text_base
    data = load_dataset_folder(target_dir)
    base = load_recommender_config(run_dir / "best_model")
    adapter = HoulsbyConfig(adapt="both", layers=layers)
    config = target_config(base, data, adapter, objective=objective)
    return matched_target_model(config, run_dir / "best_model", data, cache, adapter), data


# --- the loss of a fine-tuning run --------------------------------------------------------------

def test_a_target_trains_with_its_own_loss_and_records_it(text_base, target_dir, tmp_path):
    run_dir, cache = text_base
    assert load_recommender_config(run_dir / "best_model").loss == "full"
    run = tmp_path / "sampled"
    metrics = finetune(HOULSBY, "--pretrained", str(run_dir), "--dataset", str(target_dir),
                       "--output-dir", str(run), "--epochs", "1", "--adapt", "both",
                       "--layers", "top:1", "--encoder-cache-dir", str(cache),
                       "--loss", "sampled", "--num-negatives", "8",
                       "--negative-sampling", "popularity")
    model = json.loads((run / "config.json").read_text())["model"]
    assert (model["loss"], model["num_negatives"], model["negative_sampling"]) == (
        "sampled", 8, "popularity")
    saved = json.loads((run / "best_model" / "adapter_config.json").read_text())
    assert saved["model"]["loss"] == "sampled"
    # The adapter checkpoint rebuilds the same model (its popularity from the target) and
    # evaluation ranks the whole catalog, as for any loss.
    again = evaluate_any_run(parse_args(evaluate_parser("t"), [
        "--run", str(run), "--cpu", "--output", str(tmp_path / "eval.json")]))
    assert again["test"] == metrics["test"]


def test_the_sampled_step_encodes_only_the_batchs_items_and_its_negatives(
        text_base, target_dir, encoded_chunks):
    batch = {"input_ids": torch.tensor([[0, 0, 1, 2, 3], [0, 4, 5, 6, 7]]),
             "target_ids": torch.tensor([[0, 0, 2, 3, 9], [0, 5, 6, 7, 8]])}
    model, data = adapted_target(text_base, target_dir, {"loss": "sampled", "num_negatives": 3})
    assert model.config.loss == "sampled" and model.item_encoder.encodes_on_demand
    model.train()
    torch.manual_seed(0)
    model.loss(batch)
    torch.manual_seed(0)  # the same draw of negatives as inside the step
    negatives = torch.randint(1, data.num_items + 1, (3,))
    needed = set(range(1, 10)) | set(negatives.tolist())
    assert sorted(torch.cat(encoded_chunks).tolist()) == sorted(needed)
    assert len(needed) < data.num_items
    encoded_chunks.clear()
    # The full softmax needs every item of the catalog as a negative, every step.
    full, _ = adapted_target(text_base, target_dir)
    full.train().loss(batch)
    assert sorted(torch.cat(encoded_chunks).tolist()) == list(range(1, data.num_items + 1))


def test_sampling_settings_without_the_sampled_loss_are_refused(text_base, target_dir, tmp_path):
    run_dir, cache = text_base
    run = tmp_path / "refused"
    with pytest.raises(ValueError, match="--num-negatives: settings of --loss sampled, but the "
                       "loss is full \\(the pretrained model's\\)"):
        finetune(HOULSBY, "--pretrained", str(run_dir), "--dataset", str(target_dir),
                 "--output-dir", str(run), "--num-negatives", "8")
    assert not run.exists()
    data = SimpleNamespace(num_items=5, fingerprint="x")
    with pytest.raises(ValueError, match="trains with the full softmax only"):
        target_config(RecommenderConfig(num_items=9, backbone="diffrec"), data,
                      objective={"loss": "sampled"})
    with pytest.raises(ValueError, match="--negative-sampling: settings of --loss sampled"):
        target_config(RecommenderConfig(num_items=9), data,
                      objective={"loss": "full", "negative_sampling": "popularity"})
    kept = target_config(RecommenderConfig(num_items=9, loss="sampled"), data,
                         objective={"num_negatives": 7, "loss": None})
    assert (kept.loss, kept.num_negatives, kept.num_items) == ("sampled", 7, 5)


# --- chunks padded to their own longest text ---------------------------------------------------

@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return save_bert(tmp_path_factory.mktemp("bert") / "bert", dropout=0.0)


@pytest.fixture
def widths(monkeypatch) -> list[tuple[int, int]]:
    """(items, tokens) of every encoder forward pass."""
    shapes = []
    original = TransformerStages.forward

    def spy(self, inputs, start=0, hidden=None):
        shapes.append(tuple(inputs["input_ids"].shape))
        return original(self, inputs, start, hidden)

    monkeypatch.setattr(TransformerStages, "forward", spy)
    return shapes


@pytest.mark.parametrize("layers", [-1, 1])
def test_each_chunk_is_padded_only_to_its_own_longest_text(bert, tmp_path, widths, layers):
    content = text_content(tmp_path, TEXTS)
    encoder = text_encoder(bert, content, freeze=False, trainable_layers=layers,
                           encode_batch_size=3).eval()
    lengths = encoder.attention_mask.sum(1)
    items = torch.tensor([3, 10, 1, 7, 2, 9, 5, 4, 8, 6])
    widths.clear()
    with torch.no_grad():
        pooled = encoder.encode_pooled(items)
        alone = torch.cat([encoder.encode_pooled(item[None]) for item in items])
    # Every vector is the one the item gets alone (padding is masked).
    torch.testing.assert_close(pooled, alone, atol=1e-5, rtol=1e-4)
    chunked = widths[:4]
    expected = [int(chunk.max()) for chunk in lengths.sort().values.split(3)]
    assert [tokens for _, tokens in chunked] == expected  # by length, each its own width
    assert [count for count, _ in chunked] == [3, 3, 3, 1]
    assert sum(c * t for c, t in chunked) < len(items) * int(lengths.max())
    # The catalog (evaluation) is encoded the same way.
    widths.clear()
    with torch.no_grad():
        catalog = encoder.catalog()
    assert [tokens for _, tokens in widths] == expected
    torch.testing.assert_close(catalog[items], encoder.projection(alone), atol=1e-5, rtol=1e-4)


def test_the_chunked_step_gives_the_gradients_of_one_pass(bert, tmp_path):
    content = text_content(tmp_path, TEXTS)
    gradients = []
    for size in (3, 64):  # chunks of 3 items, or one pass over all ten
        torch.manual_seed(0)
        encoder = text_encoder(bert, content, freeze=False, trainable_layers=1,
                               encode_batch_size=size).train()
        vectors = encoder.encode_items(torch.tensor([0, 4, 2, 9, 4, 1, 10]))
        (vectors ** 2).sum().backward()
        gradients.append({n: p.grad.clone() for n, p in encoder.named_parameters()
                          if p.requires_grad})
    assert gradients[0].keys() == gradients[1].keys() and gradients[0]
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradient, gradients[1][name], atol=1e-4, rtol=1e-3)


# --- bf16 through the partial cache --------------------------------------------------------------

def test_bf16_autocast_runs_through_the_partial_cache(text_base, target_dir):
    model, _ = adapted_target(text_base, target_dir)  # the top layer of 2: partial caching
    perturb_adapters(model)
    model.train()
    batch = {"input_ids": torch.tensor([[0, 0, 1, 2, 3], [0, 4, 5, 6, 7]]),
             "target_ids": torch.tensor([[0, 0, 2, 3, 9], [0, 5, 6, 7, 8]])}
    exact = model.loss(batch)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = model.loss(batch)["loss"]
    assert model.item_encoder.hidden_cache.dtype == torch.float32
    assert rounded.dtype == torch.float32 and torch.isfinite(rounded)
    torch.testing.assert_close(rounded, exact, atol=0.05, rtol=0.02)
    rounded.backward()
    adapters = [p for n, p in model.named_parameters()
                if p.requires_grad and "item_encoder.encoder" in n]
    assert adapters and all(p.grad is not None and torch.isfinite(p.grad).all()
                            for p in adapters)
    assert any(p.grad.abs().sum() > 0 for p in adapters)
