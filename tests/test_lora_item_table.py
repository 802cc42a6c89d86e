"""LoRA on per-item tables (peft's LoRA for nn.Embedding): the ID item encoder's table with
`--adapt item_encoder` / `both`, a content + ID encoder's `id_embedding` when named by
`--target-modules`. Identity at injection, only the factors train, merge, sizes, placement.
(Transfer with matched items, checkpoints and a fine-tuning run: test_item_matching.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from peft.tuners.lora import Embedding as LoRAEmbedding
from safetensors.torch import load_file

from peftrec.adapters import HoulsbyConfig, LoRAConfig, get_adapted_model, trainable_share
from peftrec.downstream import evaluate_any_run
from peftrec.downstream.matching import ItemMatching, freeze_matched_rows
from peftrec.downstream.transfer import adapts_encoder_layers, target_config
from peftrec.modality_encoders import build_item_encoder, resolve_item_encoder_config
from peftrec.pretraining import RecommenderConfig, SequentialRecommender
from peftrec.pretraining.cli import evaluate_parser, parse_args
from peftrec.pretraining.model_stats import parameter_split
from tests.helpers import (
    MODEL,
    TRAIN,
    finetune,
    load_script,
    random_item_batch,
    save_bert,
    text_content,
)

NUM_ITEMS, HIDDEN = 30, 16


def id_model() -> SequentialRecommender:
    backbone = {"hidden_size": HIDDEN, "num_layers": 2, "num_heads": 2, "ffn_size": 32,
                "max_len": 12}
    torch.manual_seed(0)
    return SequentialRecommender(RecommenderConfig(num_items=NUM_ITEMS,
                                                   backbone_config=backbone)).eval()


def move_factors(model: torch.nn.Module) -> None:
    """Seeded noise on both factors (A starts at zero, B random), as training would."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_embedding_" in name:
                param.add_(0.1 * torch.randn_like(param))


@pytest.mark.parametrize("adapt", ["item_encoder", "both"])
def test_lora_on_the_id_table_starts_as_identity_and_trains_only_its_factors(adapt):
    model = id_model()
    table = model.item_encoder.embedding
    pretrained = table.weight.detach().clone()
    batch = random_item_batch(NUM_ITEMS)
    before = model.scores(batch)
    get_adapted_model(model, LoRAConfig(rank=2, adapt=adapt))
    wrapped = model.item_encoder.embedding
    assert isinstance(wrapped, LoRAEmbedding) and wrapped.base_layer is table
    assert torch.equal(model.scores(batch), before)
    assert torch.equal(table.weight, pretrained)

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    factors = {"item_encoder.embedding.lora_embedding_A.default",
               "item_encoder.embedding.lora_embedding_B.default"}
    assert factors <= trainable
    assert (trainable == factors) == (adapt == "item_encoder")  # `both`: the backbone's too
    table_share = 2 * (NUM_ITEMS + 1 + HIDDEN)  # r x (N + 1 rows, padding included) + d x r
    if adapt == "item_encoder":
        assert trainable_share(model)[0] == table_share

    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.loss(batch)["loss"].backward()
    optimizer.step()
    assert torch.equal(table.weight, pretrained)
    model.eval()
    assert not torch.equal(model.scores(batch), before)
    assert not model.item_encoder.catalog()[0].any()  # padding: A's column 0 gets no gradient


def test_the_catalog_scores_with_the_adapted_rows_and_merging_gives_the_same_scores():
    model = id_model()
    get_adapted_model(model, LoRAConfig(rank=4, adapt="item_encoder"))
    move_factors(model)
    wrapped = model.item_encoder.embedding
    rows = wrapped(torch.arange(NUM_ITEMS + 1))
    expected = wrapped.base_layer.weight + wrapped.get_delta_weight("default")
    torch.testing.assert_close(rows, expected)
    assert torch.equal(model.item_encoder.catalog(), rows)
    batch = random_item_batch(NUM_ITEMS)
    unmerged = model.scores(batch)
    wrapped.merge()
    torch.testing.assert_close(model.scores(batch), unmerged, atol=1e-5, rtol=0)
    torch.testing.assert_close(wrapped.base_layer.weight, expected)


def test_target_modules_choose_the_table_or_the_layers():
    model = get_adapted_model(id_model(), LoRAConfig(rank=2, adapt="both",
                                                     target_modules="q_proj,embedding"))
    adapted = {name.partition(".lora_")[0] for name, _ in model.named_parameters()
               if ".lora_" in name}
    assert adapted == {"item_encoder.embedding", "backbone.layers.0.attention.q_proj",
                       "backbone.layers.1.attention.q_proj"}
    only_layers = get_adapted_model(id_model(), LoRAConfig(adapt="both", target_modules="q_proj"))
    assert not isinstance(only_layers.item_encoder.embedding, LoRAEmbedding)


def test_an_id_table_takes_lora_but_no_bottleneck(tmp_path):
    with pytest.raises(ValueError, match="has no layers to adapt"):
        get_adapted_model(id_model(), HoulsbyConfig(adapt="item_encoder"))
    base = id_model().config
    data = type("Data", (), {"num_items": 20, "fingerprint": "x"})()
    with pytest.raises(ValueError, match=r"--adapt both: the base model's items are IDs .* or "
                                         r"LoRA \(scripts/adapter_lora.py\)"):
        target_config(base, data, HoulsbyConfig(adapt="both"))
    assert target_config(base, data, LoRAConfig(adapt="both")).num_items == 20


def test_the_id_part_of_a_text_id_encoder_takes_lora_by_name(tmp_path):
    """`--target-modules id_embedding`: the fusion encoder's ID table only; the text side
    (frozen, cached: above the cache nothing else changes) keeps its weights."""
    folder = save_bert(tmp_path / "bert", hidden_size=HIDDEN)
    content = text_content(tmp_path, [f"item {k}" for k in range(NUM_ITEMS)])
    config = resolve_item_encoder_config("text+id", {"encoder": str(folder),
                                                     "template": "{title}"})
    encoder = build_item_encoder("text+id", NUM_ITEMS, 8, config, content).eval()
    with torch.no_grad():  # a pretrained table is not zero
        encoder.id_embedding.weight[1:].normal_()
    before = encoder.catalog().detach().clone()
    get_adapted_model(encoder, LoRAConfig(rank=2, adapt="item_encoder",
                                          target_modules="id_embedding"))
    assert isinstance(encoder.id_embedding, LoRAEmbedding)
    assert not any(hasattr(m, "base_layer") for m in encoder.projection.modules())
    assert torch.equal(encoder.catalog(), before)
    assert {n for n, p in encoder.named_parameters() if p.requires_grad} == {
        "id_embedding.lora_embedding_A.default", "id_embedding.lora_embedding_B.default"}
    move_factors(encoder)
    assert not torch.equal(encoder.catalog(), before)
    # Transfer keeps the text side cached: the ID table lies above the cache.
    only_table = LoRAConfig(adapt="item_encoder", target_modules="id_embedding")
    assert not adapts_encoder_layers(only_table, "bert", ("id_embedding",))
    assert adapts_encoder_layers(only_table.replace(target_modules=("query", "id_embedding")),
                                 "bert", ("id_embedding",))


def test_model_stats_count_a_table_split_into_frozen_matched_rows_and_the_others():
    """Under LoRA with matched items the table is its frozen matched rows plus the others
    (a parametrisation): still embedding parameters, the factors not."""
    model = get_adapted_model(id_model(), LoRAConfig(rank=2, adapt="item_encoder"))
    matching = ItemMatching(fields=("title",), target=(1, 2, 3), source=(1, 2, 3),
                            target_items=NUM_ITEMS, source_items=NUM_ITEMS, ambiguous=0,
                            blank=0, source_dataset={})
    freeze_matched_rows(model, matching, model.catalog_parameter_names())
    split = parameter_split(model)
    positions = 12 * HIDDEN
    assert split["embedding"] == (NUM_ITEMS + 1) * HIDDEN + positions
    assert split["trainable"] == 2 * (NUM_ITEMS + 1 + HIDDEN)  # the factors
    assert split["trainable_embedding"] == 0


def test_a_text_id_model_transfers_with_lora_on_its_id_table(tiny_dataset_dir, target_dir,
                                                             tmp_path):
    """`--target-modules id_embedding` on a text+id base, items matched by title: the
    checkpoint holds the table's factors and fresh rows only, the text side stays cached,
    and the run reloads to its metrics."""
    bert = save_bert(tmp_path / "bert", dropout=0.0)
    base = tmp_path / "base"
    load_script("pretrain_text").main([
        "--dataset", str(tiny_dataset_dir), "--output-dir", str(base), "--epochs", "1",
        "--encoder", str(bert), "--text-template", "{title} ({genre})",
        "--encoder-cache-dir", str(tmp_path / "cache"), "--item-encoder", "text+id",
        "--preset", "none",  # no repeat bias: the checkpoint holds the table's tensors only
        *MODEL, *TRAIN])
    run = tmp_path / "lora"
    metrics = finetune(("lora",), "--pretrained", str(base), "--dataset", str(target_dir),
                       "--output-dir", str(run), "--epochs", "1", "--adapt", "item_encoder",
                       "--target-modules", "id_embedding", "--rank", "2",
                       "--match-items-by", "title", "--encoder-cache-dir",
                       str(tmp_path / "cache"))
    saved = load_file(run / "best_model" / "adapter_model.safetensors")
    table = "item_encoder.id_embedding"
    assert set(saved) == {f"{table}.lora_embedding_A.default", f"{table}.lora_embedding_B.default",
                          f"{table}.base_layer.parametrizations.weight.original"}
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["item_encoder_config"]["freeze"] is True  # above the cache
    assert config["transfer"]["item_matching"]["matched"] > 0
    again = evaluate_any_run(parse_args(evaluate_parser("t"), [
        "--run", str(run), "--cpu", "--output", str(tmp_path / "eval.json")]))
    assert again["test"] == metrics["test"]
