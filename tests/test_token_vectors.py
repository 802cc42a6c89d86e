"""`--token-vectors`: learned word-piece vectors added to a text encoder's head output, and
LoRA on that table (peft's LoRA Embedding as a custom layer for nn.EmbeddingBag)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer

from peftrec.adapters import LoRAConfig, get_adapted_model
from peftrec.adapters.lora_embedding_bag import LoraEmbeddingBag
from peftrec.dataset_tools import load_dataset_folder
from peftrec.downstream import build_target_model, evaluate_any_run, target_config
from peftrec.modality_encoders import build_item_encoder
from peftrec.pretraining.cli import evaluate_parser, parse_args
from peftrec.pretraining.recommender import load_recommender_config
from tests.helpers import (
    MODEL,
    TEXTS,
    TRAIN,
    finetune,
    load_script,
    save_bert,
    text_content,
    text_encoder,
)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return save_bert(tmp_path_factory.mktemp("tv") / "bert", dropout=0.0)


def word_pieces(bert, text: str) -> list[int]:
    """The tokenizer's ids of a text's word pieces, [CLS] and [SEP] left out."""
    return AutoTokenizer.from_pretrained(bert)(text, add_special_tokens=False)["input_ids"]


def test_the_vectors_start_at_zero_and_add_the_mean_of_each_items_word_pieces(bert, tmp_path):
    encoder = text_encoder(bert, text_content(tmp_path, TEXTS), token_vectors=True)
    table = encoder.token_vectors.weight
    assert table.shape == (AutoTokenizer.from_pretrained(bert).vocab_size, 8)
    assert torch.all(table == 0)
    head = torch.cat([torch.zeros(1, 8), encoder.projection(encoder.outputs)])
    torch.testing.assert_close(encoder.catalog(), head)  # at start: the head alone

    with torch.no_grad():
        table.normal_()
    expected = torch.stack([encoder.projection(encoder.outputs[i])
                            + table[word_pieces(bert, text)].mean(0)
                            for i, text in enumerate(TEXTS)])
    catalog = encoder.catalog()
    torch.testing.assert_close(catalog[1:], expected)
    assert torch.all(catalog[0] == 0)
    items = torch.tensor([3, 0, 1])
    torch.testing.assert_close(encoder.encode_items(items), catalog[items])


def test_sum_pooling_counts_each_word_piece_in_full(bert, tmp_path):
    encoder = text_encoder(bert, text_content(tmp_path, TEXTS), token_vectors=True,
                           token_pooling="sum")
    with torch.no_grad():
        encoder.token_vectors.weight.normal_()
    pieces = word_pieces(bert, TEXTS[1])
    assert len(pieces) > 5
    expected = (encoder.projection(encoder.outputs[1])
                + encoder.token_vectors.weight[pieces].sum(0))
    torch.testing.assert_close(encoder.catalog()[2], expected)


@pytest.mark.parametrize("settings, message", [
    ({"token_pooling": "sum"}, "--token-pooling sum pools --token-vectors; add "
                               "--token-vectors or drop it"),
    ({"token_vectors": True, "token_pooling": "max"}, "unknown --token-pooling 'max'; "
                                                      "choose one of mean, sum"),
    ({"token_dropout": 0.2}, "--token-dropout 0.2 drops word pieces of --token-vectors; "
                             "add --token-vectors or drop it"),
    ({"token_vectors": True, "token_dropout": 1.0}, "--token-dropout must be in [0, 1), "
                                                    "got 1.0"),
])
def test_bad_pooling_settings_are_named(bert, tmp_path, settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        text_encoder(bert, text_content(tmp_path, TEXTS), **settings)


def test_token_dropout_drops_word_pieces_in_training_only_and_keeps_the_expectation(
        bert, tmp_path):
    encoder = text_encoder(bert, text_content(tmp_path, TEXTS), token_vectors=True,
                           token_pooling="sum", token_dropout=0.5)
    with torch.no_grad():
        encoder.token_vectors.weight.normal_()
    items = torch.tensor([2, 4])
    full = encoder.eval().extra_vectors(items).detach()
    assert torch.equal(encoder.extra_vectors(items), full)  # evaluation: every word
    encoder.train()
    torch.manual_seed(0)
    draws = torch.stack([encoder.extra_vectors(items).detach() for _ in range(4000)])
    assert not torch.allclose(draws[0], full)
    # Each kept piece counts 1 / (1 - p) = 2, so the mean over draws is the full sum.
    torch.testing.assert_close(draws.mean(0), full, atol=0.15, rtol=0)
    one_piece = text_encoder(bert, text_content(tmp_path, ["x"]), token_vectors=True,
                             token_pooling="sum", token_dropout=0.5).train()
    with torch.no_grad():
        one_piece.token_vectors.weight.normal_()
    row = one_piece.token_vectors.weight[word_pieces(bert, "x")].sum(0).detach()
    seen = {tuple(torch.round(one_piece.extra_vectors(torch.tensor([1]))[0] / row, decimals=4)
                  .tolist()) for _ in range(50)}
    assert seen == {(0.0,) * 8, (2.0,) * 8}  # dropped, or kept at twice its weight


def test_a_partially_trained_encoder_adds_them_too(bert, tmp_path):
    content = text_content(tmp_path, TEXTS)
    encoder = text_encoder(bert, content, token_vectors=True, freeze=False,
                           trainable_layers=1).train()
    with torch.no_grad():
        encoder.token_vectors.weight.normal_()
    items = torch.tensor([2, 5])
    pooled = encoder.encode_pooled(items)
    expected = torch.stack([encoder.projection(pooled[k])
                            + encoder.token_vectors.weight[word_pieces(bert, TEXTS[i - 1])]
                            .mean(0) for k, i in enumerate(items.tolist())])
    torch.testing.assert_close(encoder(items), expected)


def test_only_the_catalogs_word_pieces_get_gradients(bert, tmp_path):
    encoder = text_encoder(bert, text_content(tmp_path, TEXTS), token_vectors=True)
    encoder.catalog().sum().backward()
    grad = encoder.token_vectors.weight.grad
    used = sorted({piece for text in TEXTS for piece in word_pieces(bert, text)})
    touched = grad.abs().sum(1).nonzero().squeeze(1).tolist()
    assert touched == used


def test_images_refuse_the_flag_in_one_line(bert):
    config = {"encoder": str(bert), "image_store": "store", "token_vectors": True}
    with pytest.raises(ValueError, match="^--token-vectors: images have no word pieces; drop "
                                         "it or use --item-encoder text$"):
        build_item_encoder("image", 3, 8, config, None)


def adapted_table(bert, tmp_path, rank: int = 2) -> tuple[nn.Module, torch.Tensor]:
    """A text encoder with word-piece vectors (moved from zero, as a source's are), LoRA on
    its head and table (the table at `rank`, factors moved as training would); its table."""
    encoder = text_encoder(bert, text_content(tmp_path, TEXTS), token_vectors=True,
                           token_pooling="sum")
    torch.manual_seed(0)
    with torch.no_grad():
        encoder.token_vectors.weight.normal_()
    learned = encoder.token_vectors.weight.detach().clone()
    get_adapted_model(encoder, LoRAConfig(rank=4, alpha=8, adapt="item_encoder",
                                          target_modules="projection,token_vectors",
                                          rank_pattern=f"token_vectors={rank}"))
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "lora_embedding_" in name:
                param.add_(0.1 * torch.randn_like(param))
    return encoder, learned


def test_lora_on_the_word_piece_table_starts_as_identity_and_trains_only_its_factors(
        bert, tmp_path):
    encoder = text_encoder(bert, text_content(tmp_path, TEXTS), token_vectors=True)
    with torch.no_grad():
        encoder.token_vectors.weight.normal_()
    before = encoder.catalog().detach()
    learned = encoder.token_vectors.weight.detach().clone()
    get_adapted_model(encoder, LoRAConfig(rank=2, adapt="item_encoder",
                                          target_modules="token_vectors"))
    wrapped = encoder.token_vectors
    assert isinstance(wrapped, LoraEmbeddingBag)
    assert wrapped.lora_embedding_A["default"].shape == (2, learned.shape[0])
    torch.testing.assert_close(encoder.catalog(), before, atol=0, rtol=0)
    trainable = {name for name, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {"token_vectors.lora_embedding_A.default",
                         "token_vectors.lora_embedding_B.default"}

    optimizer = torch.optim.Adam([p for p in encoder.parameters() if p.requires_grad], lr=0.1)
    encoder.catalog().pow(2).sum().backward()
    # A is zero at start, so B's gradient is too; A's reaches exactly the catalog's pieces.
    used = sorted({piece for text in TEXTS for piece in word_pieces(bert, text)})
    grad_a = wrapped.lora_embedding_A["default"].grad
    assert grad_a.abs().sum(0).nonzero().squeeze(1).tolist() == used
    optimizer.step()
    assert torch.equal(wrapped.base_layer.weight, learned)
    assert not torch.allclose(encoder.catalog(), before)


def test_the_adapted_table_is_the_table_plus_the_low_rank_update_and_merges(bert, tmp_path):
    encoder, learned = adapted_table(bert, tmp_path, rank=3)
    wrapped = encoder.token_vectors
    assert wrapped.r["default"] == 3 and wrapped.scaling["default"] == 2.0  # 8/4 kept
    delta = wrapped.get_delta_weight("default")
    assert delta.shape == learned.shape
    head = encoder.projection(encoder.outputs)
    expected = torch.stack([head[i] + (learned + delta)[word_pieces(bert, text)].sum(0)
                            for i, text in enumerate(TEXTS)])
    catalog = encoder.catalog().detach()
    torch.testing.assert_close(catalog[1:], expected)
    wrapped.merge()
    torch.testing.assert_close(encoder.catalog().detach(), catalog, atol=1e-5, rtol=0)
    torch.testing.assert_close(wrapped.base_layer.weight, learned + delta)


def test_the_table_moves_to_a_new_catalog_bit_for_bit_and_adapters_leave_it(
        bert, tiny_dataset_dir, target_dir, tmp_path):
    run = tmp_path / "base"
    cache = tmp_path / "cache"
    load_script("pretrain_text").main([
        "--dataset", str(tiny_dataset_dir), "--output-dir", str(run), "--epochs", "2",
        "--encoder", str(bert), "--text-template", "{title} ({genre})", "--encoder-cache-dir",
        str(cache), "--token-vectors", "--preset", "none", *MODEL, *TRAIN])
    base_dir = run / "best_model"
    config = load_recommender_config(base_dir)
    assert config.item_encoder_config["token_vectors"]
    target = load_dataset_folder(target_dir)
    model = build_target_model(target_config(config, target), base_dir, target, cache)
    learned = load_file(base_dir / "model.safetensors")["item_encoder.token_vectors.weight"]
    assert learned.abs().sum() > 0
    assert torch.equal(model.item_encoder.token_vectors.weight.detach(), learned)

    adapted = finetune(("lora",), "--pretrained", str(run), "--dataset", str(target_dir),
                       "--output-dir", str(tmp_path / "lora"), "--encoder-cache-dir",
                       str(cache), "--epochs", "1", "--adapt", "item_encoder")
    saved = load_file(tmp_path / "lora" / "best_model" / "adapter_model.safetensors")
    assert not any("token_vectors" in name for name in saved)
    assert adapted["parameters"]["trainable"] < learned.numel()

    # Named by --target-modules, LoRA adapts the table too; the checkpoint holds its factors
    # (not the table), the encoder stays above its cache, and the run reloads to its metrics.
    lora = tmp_path / "lora-table"
    metrics = finetune(("lora",), "--pretrained", str(run), "--dataset", str(target_dir),
                       "--output-dir", str(lora), "--encoder-cache-dir", str(cache),
                       "--epochs", "1", "--adapt", "item_encoder", "--target-modules",
                       "projection,token_vectors", "--rank-pattern", "token_vectors=2")
    saved = load_file(lora / "best_model" / "adapter_model.safetensors")
    table = "item_encoder.token_vectors"
    assert {name for name in saved if "token_vectors" in name} == {
        f"{table}.lora_embedding_A.default", f"{table}.lora_embedding_B.default"}
    assert saved[f"{table}.lora_embedding_A.default"].shape == (2, learned.shape[0])
    config = json.loads((lora / "config.json").read_text())
    assert config["model"]["item_encoder_config"]["freeze"] is True  # above the cache
    again = evaluate_any_run(parse_args(evaluate_parser("t"), [
        "--run", str(lora), "--cpu", "--output", str(tmp_path / "eval.json")]))
    assert again["test"] == metrics["test"]
