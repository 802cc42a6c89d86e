"""Content item heads (linear, mlp, moe) and the content + ID fusion encoders (text+id,
image+id): shapes, the MoE gate, old checkpoints, head-only adapters, transfer, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from peftrec.adapters import HoulsbyConfig, LoRAConfig, get_adapted_model
from peftrec.dataset_tools import build_image_store, load_dataset_folder
from peftrec.dataset_tools.integrity import write_checksums
from peftrec.downstream import adapt, build_target_model, evaluate_any_run, target_config
from peftrec.modality_encoders import (
    HEADS,
    ITEM_ENCODERS,
    ContentItemEncoder,
    build_head,
    build_item_content,
    build_item_encoder,
    item_encoder_modality,
    resolve_item_encoder_config,
)
from peftrec.modality_encoders.transformer import TransformerStages
from peftrec.pretraining.cli import evaluate_parser, parse_args, run_main
from peftrec.pretraining.recommender import (
    CheckpointError,
    RecommenderConfig,
    SequentialRecommender,
    load_recommender_config,
)
from tests.helpers import (
    MODEL,
    TEXTS,
    TRAIN,
    finetune,
    load_script,
    random_item_batch,
    save_bert,
    save_vision,
    text_content,
)

BACKBONE = {"hidden_size": 8, "num_heads": 2, "ffn_size": 16, "max_len": 8, "dropout": 0.0}
HEAD_CASES = [("mlp", {}), ("mlp", {"head_hidden_size": 5, "head_dropout": 0.1}),
              ("moe", {}), ("moe", {"num_experts": 3, "moe_noise": True})]


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return save_bert(tmp_path_factory.mktemp("heads") / "bert", dropout=0.0)


def text_model(bert: Path, tmp_path: Path, item_encoder: str = "text", **settings):
    """A small text SASRec over TEXTS (5 items), head and fusion settings as given."""
    config = resolve_item_encoder_config(
        item_encoder, {"encoder": str(bert), "template": "{title}", **settings})
    model_config = RecommenderConfig(num_items=len(TEXTS), backbone_config=BACKBONE,
                                     item_encoder=item_encoder, item_encoder_config=config)
    return SequentialRecommender(model_config, content=text_content(tmp_path, TEXTS))


def batch() -> dict:
    return random_item_batch(num_items=len(TEXTS), batch=3, length=6)


def with_random_parameters(model: nn.Module) -> nn.Module:
    """Move every parameter off its (partly zero) start, so that a gate or a table that
    starts at zero is really on the forward path."""
    torch.manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


# --- the heads ---------------------------------------------------------------------------------

@pytest.mark.parametrize("head, settings", [("linear", {}), *HEAD_CASES])
def test_every_head_maps_encoder_outputs_to_item_vectors(head, settings):
    module = build_head(head, 12, 8, settings)
    assert module(torch.randn(7, 12)).shape == (7, 8)
    assert module(torch.randn(2, 3, 12)).shape == (2, 3, 8)
    assert set(HEADS) == {"linear", "mlp", "moe"}


def test_the_mlp_head_is_a_linear_shortcut_plus_a_gelu_branch():
    head = build_head("mlp", 12, 8, {"head_hidden_size": 5}).eval()
    assert (head.fc1.in_features, head.fc1.out_features, head.fc2.out_features) == (12, 5, 8)
    x = torch.randn(4, 12)
    expected = head.shortcut(x) + head.fc2(nn.functional.gelu(head.fc1(x)))
    torch.testing.assert_close(head(x), expected)
    assert build_head("mlp", 12, 8, {}).fc1.out_features == 12  # width default: the input's


def test_moe_gate_weights_are_a_distribution_over_the_experts():
    head = build_head("moe", 12, 8, {"num_experts": 5}).eval()
    assert len(head.experts) == 5 and head.gate_weight.shape == (12, 5)
    x = torch.randn(6, 12)
    torch.testing.assert_close(head.gate_weights(x), torch.full((6, 5), 0.2))  # zero at start
    with torch.no_grad():
        head.gate_weight.normal_()
    gates = head.gate_weights(x)
    assert gates.shape == (6, 5) and (gates >= 0).all() and not torch.allclose(gates, gates[0])
    torch.testing.assert_close(gates.sum(-1), torch.ones(6))
    # Each expert is a parametric whitening: W (x - b), b of the input's size, no bias on W.
    expert = head.experts[0]
    assert expert.bias.shape == (12,) and expert.linear.bias is None
    with torch.no_grad():
        expert.bias.normal_()
    mixed = sum(gates[:, k, None] * e.linear(x - e.bias) for k, e in enumerate(head.experts))
    torch.testing.assert_close(head(x), mixed)
    assert build_head("moe", 12, 8, {}).gate_weight.shape == (12, 8)  # 8 experts by default


def test_noisy_gating_is_an_option_and_only_in_training():
    x = torch.randn(6, 12)
    plain = build_head("moe", 12, 8, {"num_experts": 3}).train()
    assert plain.noise_weight is None and torch.equal(plain.gate_weights(x), plain.gate_weights(x))
    noisy = build_head("moe", 12, 8, {"num_experts": 3, "moe_noise": True}).train()
    assert noisy.noise_weight.shape == (12, 3)
    first, second = noisy.gate_weights(x), noisy.gate_weights(x)
    assert not torch.equal(first, second)
    torch.testing.assert_close(first.sum(-1), torch.ones(6))
    noisy.eval()
    assert torch.equal(noisy.gate_weights(x), noisy.gate_weights(x))


def test_evaluation_runs_the_head_over_the_cached_catalog_once_until_training(bert, tmp_path):
    """The evaluator scores the catalog in chunks, batch after batch: in eval mode the head
    runs over the cached encoder outputs once, not once per chunk; train() drops them."""
    model = with_random_parameters(text_model(bert, tmp_path, head="moe"))
    assert model.item_encoder.encoder is None  # frozen encoder: cached outputs, head on top
    head_passes = []
    model.item_encoder.projection.register_forward_hook(lambda *_: head_passes.append(1))
    trained_catalog = model.item_encoder.catalog()
    model.eval()
    chunks = [model.item_encoder.catalog()[ids] for ids in (torch.arange(1, 3),
                                                             torch.arange(3, len(TEXTS) + 1))]
    assert len(head_passes) == 2  # one in training mode, one for both chunks
    torch.testing.assert_close(torch.cat(chunks), trained_catalog[1:].detach())
    with_random_parameters(model.train()).eval()  # a training step moved the head
    assert not torch.allclose(model.item_encoder.catalog()[1:], torch.cat(chunks))
    assert len(head_passes) == 3


def test_the_head_is_recorded_and_rebuilt_from_the_checkpoint(bert, tmp_path):
    model = with_random_parameters(text_model(bert, tmp_path, head="moe", num_experts=3)).eval()
    config = model.config.item_encoder_config
    assert (config["head"], config["num_experts"], config["moe_noise"]) == ("moe", 3, False)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = SequentialRecommender.from_pretrained(tmp_path / "ckpt",
                                                   content=text_content(tmp_path, TEXTS)).eval()
    assert type(loaded.item_encoder.projection).__name__ == "MoEHead"
    # (another instance reads the cache from disk: equal up to the matmul's rounding)
    torch.testing.assert_close(loaded.scores(batch()), model.scores(batch()))
    mlp = text_model(bert, tmp_path, head="mlp").config.item_encoder_config
    assert mlp["head_hidden_size"] == 32  # resolved to the encoder's width, then recorded


def test_the_linear_head_loads_an_old_checkpoint_unchanged(bert, tmp_path):
    """A checkpoint written before --item-head: its config has no head settings, its
    weights `item_encoder.projection.weight` / `.bias`."""
    model = with_random_parameters(text_model(bert, tmp_path)).eval()
    model.save_pretrained(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / "config.json").read_text())
    config = meta["config"]["item_encoder_config"]
    assert config["head"] == "linear"
    for key in ("head", "head_hidden_size", "num_experts", "head_dropout", "moe_noise",
                "fusion"):
        del config[key]
    (tmp_path / "old" / "config.json").write_text(json.dumps(meta))
    (tmp_path / "old" / "checksums.json").unlink()  # written before checksums were, too
    weights = load_file(tmp_path / "old" / "model.safetensors")
    assert {k for k in weights if k.startswith("item_encoder.")} == {
        "item_encoder.projection.weight", "item_encoder.projection.bias"}
    loaded = SequentialRecommender.from_pretrained(tmp_path / "old",
                                                   content=text_content(tmp_path, TEXTS)).eval()
    head = loaded.item_encoder.projection
    assert isinstance(head, HEADS["linear"]) and isinstance(head, nn.Linear)
    assert torch.equal(head.weight, weights["item_encoder.projection.weight"])
    assert torch.equal(head.bias, weights["item_encoder.projection.bias"])
    torch.testing.assert_close(loaded.scores(batch()), model.scores(batch()))


def test_a_text_run_written_before_item_heads_resumes_and_seeds_items(bert, tiny_dataset_dir,
                                                                      tmp_path):
    """Runs recorded without the head settings compare equal to the same run recorded
    with them at their defaults (resume, --init-items-from)."""
    common = ["--dataset", str(tiny_dataset_dir), "--encoder", str(bert), "--text-template",
              "{title}", "--encoder-cache-dir", str(tmp_path / "cache"), *MODEL, *TRAIN]
    run = tmp_path / "old"
    load_script("pretrain_text").main([*common, "--output-dir", str(run), "--epochs", "1"])
    for config_file, section in ((run / "config.json", "model"),
                                 (run / "best_model" / "config.json", "config")):
        meta = json.loads(config_file.read_text())
        config = meta[section]["item_encoder_config"]
        assert (config["head"], config["fusion"]) == ("linear", None)
        for key in ("head", "head_hidden_size", "num_experts", "head_dropout", "moe_noise",
                    "fusion"):
            del config[key]
        config_file.write_text(json.dumps(meta))
    load_script("pretrain_text").main([*common, "--output-dir", str(run), "--epochs", "2",
                                       "--resume"])
    assert len((run / "log.jsonl").read_text().splitlines()) == 2
    seeded = tmp_path / "seeded"
    load_script("pretrain_text").main([*common, "--output-dir", str(seeded), "--epochs", "1",
                                       "--lr", "0", "--init-items-from", str(run)])
    source = load_file(run / "best_model" / "model.safetensors")
    copied = load_file(seeded / "best_model" / "model.safetensors")
    assert torch.equal(copied["item_encoder.projection.weight"],
                       source["item_encoder.projection.weight"])


# --- head-only adapters on the mlp and moe heads -----------------------------------------------

ADAPTERS = [
    (HoulsbyConfig(adapt="item_encoder", sites=("projection",), reduction_factor=2), "adapter."),
    (HoulsbyConfig(adapt="item_encoder", sites=("projection",), reduction_factor=2,
                   parallel=True), "adapter."),
    (LoRAConfig(adapt="item_encoder", target_modules=("projection",), rank=2), "lora_"),
    (LoRAConfig(adapt="item_encoder", rank=2), "lora_"),  # the encoder's default target
]


@pytest.mark.parametrize("head, settings", HEAD_CASES)
@pytest.mark.parametrize("adapter, marker", ADAPTERS,
                         ids=["houlsby", "houlsby-parallel", "lora-projection", "lora-default"])
def test_head_adapters_start_as_the_identity_and_keep_the_cache(bert, tmp_path, head, settings,
                                                                adapter, marker):
    model = with_random_parameters(text_model(bert, tmp_path, head=head, **settings)).eval()
    before = model.scores(batch())
    get_adapted_model(model, adapter)
    assert torch.equal(model.eval().scores(batch()), before)  # identity at injection
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("item_encoder.projection.") and marker in n
                             for n in trainable)
    if adapter.method == "lora":  # every Linear of the head, and nothing else
        linears = {n for n, m in build_head(head, 32, 8, settings).named_modules()
                   if isinstance(m, nn.Linear)}
        assert {n.split(".lora_")[0] for n in trainable} == {
            f"item_encoder.projection.{n}" for n in linears}
    # The cache is kept: no transformer in the module, so none in the training step.
    assert model.item_encoder.encoder is None
    assert not any(isinstance(m, TransformerStages) for m in model.modules())
    model.train().loss(batch())["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_tune_projection_trains_every_parameter_of_the_moe_head(bert, tmp_path):
    model = text_model(bert, tmp_path, head="moe", num_experts=3, moe_noise=True)
    get_adapted_model(model, HoulsbyConfig(adapt="backbone", layers="top:1", sites=("ffn",),
                                           extras=("projection",)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {f"item_encoder.projection.{n}" for n, _ in model.item_encoder.projection
            .named_parameters()}
    assert {"item_encoder.projection.gate_weight", "item_encoder.projection.noise_weight",
            "item_encoder.projection.experts.2.bias"} <= head
    assert head <= trainable
    assert trainable - head == {n for n in trainable if ".adapter." in n and "backbone." in n}


# --- content + ID fusion -----------------------------------------------------------------------

def test_fusion_encoders_are_registered_content_encoders():
    assert {"text+id", "image+id"} <= set(ITEM_ENCODERS)
    assert [item_encoder_modality(n) for n in ("id", "text", "text+id", "image", "image+id")] \
        == [None, "text", "text", "image", "image"]
    for name in ("text+id", "image+id"):
        assert issubclass(ITEM_ENCODERS[name], ContentItemEncoder)
        assert ITEM_ENCODERS[name].catalog_parameters == ("id_embedding.weight",)


@pytest.mark.parametrize("fusion", ["sum", "gate"])
def test_the_id_table_starts_at_zero_and_the_item_vector_is_the_content_vector(bert, tmp_path,
                                                                             fusion):
    model = text_model(bert, tmp_path, "text+id", fusion=fusion, head="mlp").eval()
    items = model.item_encoder
    assert items.fusion == fusion and model.config.item_encoder_config["fusion"] == fusion
    assert model.catalog_parameter_names() == ["item_encoder.id_embedding.weight"]
    assert items.id_embedding.weight.shape == (len(TEXTS) + 1, 8)
    assert not items.id_embedding.weight.any()
    assert torch.equal(items.catalog(), items.content_catalog())
    with torch.no_grad():
        items.id_embedding.weight[1:].normal_()
    ids = items.id_embedding.weight
    content = items.content_catalog()
    if fusion == "sum":
        expected = content + ids
    else:
        gate = torch.sigmoid(items.fusion_gate(torch.cat([content, ids], -1)))
        expected = content + gate * ids
    torch.testing.assert_close(items.catalog(), expected)
    assert not items.catalog()[0].any()  # padding
    real = torch.tensor([0, 3, 1])
    torch.testing.assert_close(items.encode_items(real), expected[real])
    # Trained, the ID table learns and its padding row stays zero.
    model.train().loss(batch())["loss"].backward()
    grad = items.id_embedding.weight.grad
    assert grad[1:].any() and not grad[0].any()


def test_the_scaled_fusion_starts_as_an_id_model_and_learns_how_much_content_to_take(
        bert, tmp_path):
    model = text_model(bert, tmp_path, "text+id", fusion="scaled", head="mlp").eval()
    items = model.item_encoder
    assert model.catalog_parameter_names() == ["item_encoder.id_embedding.weight"]
    assert items.content_scale.shape == (8,) and not items.content_scale.any()
    ids = items.id_embedding.weight
    assert not ids[0].any() and 0.005 < ids[1:].std() < 0.05  # an ID model's start
    assert torch.equal(items.catalog(), ids)  # the content scaled to zero
    # At the start only the scale reaches the content: the head learns once it has grown.
    model.train().loss(batch())["loss"].backward()
    assert items.content_scale.grad.any() and ids.grad[1:].any() and not ids.grad[0].any()
    assert all(not p.grad.any() for p in items.projection.parameters())
    model.eval()
    with torch.no_grad():
        items.content_scale.normal_()
    expected = ids + items.content_scale * items.content_catalog()
    torch.testing.assert_close(items.catalog(), expected)
    real = torch.tensor([0, 3, 1])
    torch.testing.assert_close(items.encode_items(real), expected[real])


def test_the_scaled_fusion_transfers_its_scale_and_head_and_restarts_its_table(
        bert, tiny_dataset_dir, target_dir, tmp_path):
    run = tmp_path / "scaled"
    load_script("pretrain_text").main([
        "--dataset", str(tiny_dataset_dir), "--output-dir", str(run), "--epochs", "1",
        "--encoder", str(bert), "--text-template", "{title} ({genre})", "--encoder-cache-dir",
        str(tmp_path / "cache"), "--item-encoder", "text+id", "--fusion", "scaled",
        "--preset", "none", *MODEL, *TRAIN])
    base_dir = run / "best_model"
    source = load_file(base_dir / "model.safetensors")
    assert source["item_encoder.content_scale"].any()  # trained off zero
    target = load_dataset_folder(target_dir)
    torch.manual_seed(0)
    model = build_target_model(target_config(load_recommender_config(base_dir), target),
                               base_dir, target, tmp_path / "cache")
    state = model.state_dict()
    for name in set(state) - {"item_encoder.id_embedding.weight"}:
        assert torch.equal(state[name], source[name]), name
    table = state["item_encoder.id_embedding.weight"]
    assert table.shape == (target.num_items + 1, 16)
    assert not table[0].any() and 0.005 < table[1:].std() < 0.05  # fresh, as an ID model's


def test_a_fusion_model_trains_its_encoder_end_to_end(bert, tmp_path):
    model = text_model(bert, tmp_path, "text+id", freeze=False, head="moe", num_experts=2)
    items = model.item_encoder
    assert items.encodes_on_demand
    model.train().loss(batch())["loss"].backward()
    assert items.encoder.model.encoder.layer[0].output.dense.weight.grad is not None
    assert items.id_embedding.weight.grad[1:].any()
    model.eval()
    with torch.no_grad():
        items.id_embedding.weight[1:].normal_()
        torch.testing.assert_close(items.catalog(),
                                   items.content_catalog() + items.id_embedding.weight)


@pytest.fixture(scope="module")
def fusion_base(tiny_dataset_dir, bert, tmp_path_factory) -> tuple[Path, Path]:
    """A text+id SASRec (gate fusion, moe head) pretrained by scripts/pretrain_text.py."""
    root = tmp_path_factory.mktemp("fusion_base")
    run = root / "run"
    load_script("pretrain_text").main([
        "--dataset", str(tiny_dataset_dir), "--output-dir", str(run), "--epochs", "2",
        "--encoder", str(bert), "--text-template", "{title} ({genre})",
        "--encoder-cache-dir", str(root / "cache"), "--item-encoder", "text+id",
        "--fusion", "gate", "--item-head", "moe", "--num-experts", "3", "--preset", "none",
        *MODEL, *TRAIN])
    return run, root / "cache"


def test_a_fusion_model_pretrains_end_to_end(fusion_base, tiny_dataset_dir):
    run, cache = fusion_base
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["test"]["ndcg@10"] <= 1
    config = load_recommender_config(run / "best_model")
    assert config.item_encoder == "text+id"
    assert {k: config.item_encoder_config[k] for k in ("fusion", "head", "num_experts")} == {
        "fusion": "gate", "head": "moe", "num_experts": 3}
    weights = load_file(run / "best_model" / "model.safetensors")
    table = weights["item_encoder.id_embedding.weight"]
    data = load_dataset_folder(tiny_dataset_dir)
    assert table.shape == (data.num_items + 1, 16)
    assert table[1:].any() and not table[0].any()  # trained from zero; padding stays zero
    assert {"item_encoder.fusion_gate.weight", "item_encoder.projection.gate_weight"} <= set(
        weights)
    assert not any(k.startswith("item_encoder.encoder.") for k in weights)  # frozen + cached
    again = evaluate_any_run(parse_args(evaluate_parser("t"), [
        "--run", str(run), "--cpu", "--output", str(run.parent / "eval.json")]))
    assert again["test"] == metrics["test"]


def test_transfer_keeps_the_content_part_and_restarts_the_id_part(fusion_base, target_dir):
    run, cache = fusion_base
    base_dir = run / "best_model"
    target = load_dataset_folder(target_dir)
    model = build_target_model(target_config(load_recommender_config(base_dir), target),
                               base_dir, target, cache)
    source = load_file(base_dir / "model.safetensors")
    state = model.state_dict()
    per_item = {"item_encoder.id_embedding.weight"}
    assert set(model.catalog_parameter_names()) == per_item
    assert set(state) == set(source)
    for name in set(state) - per_item:  # head, gate, backbone: bit for bit the source's
        assert torch.equal(state[name], source[name]), name
    table = state["item_encoder.id_embedding.weight"]
    assert table.shape == (target.num_items + 1, 16) and not table.any()
    items = model.eval().item_encoder
    assert torch.equal(items.catalog(), items.content_catalog())  # scores = the content part's
    # Adapters in the encoder's top layer: partial caching, the encoder's own weights from
    # its folder, the rest from the base as above.
    adapter = HoulsbyConfig(adapt="item_encoder", layers="top:1")
    config = target_config(load_recommender_config(base_dir), target, adapter)
    assert (config.item_encoder_config["freeze"], config.item_encoder_config["trainable_layers"]) \
        == (False, 1)
    partial = adapt(build_target_model(config, base_dir, target, cache), adapter)
    assert partial.item_encoder.start == 1
    assert torch.equal(partial.state_dict()["item_encoder.projection.gate_weight"],
                       source["item_encoder.projection.gate_weight"])
    assert partial.item_encoder.id_embedding.weight.requires_grad
    trainable = {n for n, p in partial.named_parameters() if p.requires_grad}
    assert trainable - {"item_encoder.id_embedding.weight"} and all(
        ".layer.1." in n and ".adapter." in n
        for n in trainable - {"item_encoder.id_embedding.weight"})


def test_zero_shot_and_head_adapters_on_a_fusion_model(fusion_base, target_dir, tmp_path):
    run, cache = fusion_base
    common = ["--pretrained", str(run), "--dataset", str(target_dir),
              "--encoder-cache-dir", str(cache)]
    zero = finetune((), *common, "--output-dir", str(tmp_path / "zero"), "--zero-shot")
    untrained = finetune(("houlsby",), *common, "--output-dir", str(tmp_path / "lr0"),
                         "--epochs", "1", "--lr", "0", "--adapt", "item_encoder",
                         "--sites", "projection", "--reduction-factor", "4")
    assert untrained["test"] == zero["test"]  # an adapter and a zero ID table change nothing
    config = json.loads((tmp_path / "lr0" / "config.json").read_text())["model"]
    assert config["item_encoder_config"]["freeze"] is True  # still cached
    trained = tmp_path / "lora"
    metrics = finetune(("lora",), *common, "--output-dir", str(trained), "--epochs", "1",
                       "--adapt", "item_encoder", "--target-modules", "projection",
                       "--rank", "2", "--tune", "projection")
    saved = load_file(trained / "best_model" / "adapter_model.safetensors")
    target = load_dataset_folder(target_dir)
    assert saved["item_encoder.id_embedding.weight"].shape == (target.num_items + 1, 16)
    assert saved["item_encoder.id_embedding.weight"].any()  # the restarted table learned
    assert {n.split(".lora_")[0] for n in saved if ".lora_" in n} == {
        f"item_encoder.projection.experts.{k}.linear" for k in range(3)}
    assert "item_encoder.projection.gate_weight" in saved  # --tune projection: the whole head
    assert all(n.startswith("item_encoder.projection.") or n == "item_encoder.id_embedding.weight"
               for n in saved)
    again = evaluate_any_run(parse_args(evaluate_parser("t"), [
        "--run", str(trained), "--cpu", "--output", str(tmp_path / "eval.json")]))
    assert again["test"] == metrics["test"]


def test_init_items_from_copies_a_fusion_models_item_side(fusion_base, tiny_dataset_dir,
                                                          tmp_path):
    run, cache = fusion_base
    out = tmp_path / "init"
    load_script("pretrain_text").main([
        "--dataset", str(tiny_dataset_dir), "--output-dir", str(out), "--epochs", "1",
        "--lr", "0", "--encoder", str(json.loads((run / "config.json").read_text())["model"]
                                      ["item_encoder_config"]["encoder"]),
        "--text-template", "{title} ({genre})", "--encoder-cache-dir", str(cache),
        "--item-encoder", "text+id", "--fusion", "gate", "--item-head", "moe",
        "--num-experts", "3", "--init-items-from", str(run), *MODEL, *TRAIN])
    source = load_file(run / "best_model" / "model.safetensors")
    copied = load_file(out / "best_model" / "model.safetensors")
    for name in (n for n in source if n.startswith("item_encoder.")):
        assert torch.equal(copied[name], source[name]), name


def test_an_image_fusion_encoder_builds_from_the_image_script_flags(tiny_dataset_dir, tmp_path):
    from PIL import Image

    vit = save_vision(tmp_path / "vit", "vit")
    (tmp_path / "src").mkdir()
    data = load_dataset_folder(tiny_dataset_dir)
    for k, item_id in enumerate(data.items.to_pandas()["item_id"]):
        Image.new("RGB", (32, 32), (k * 6 % 256, 0, 255 - k * 6 % 256)).save(
            tmp_path / "src" / f"{item_id}.png")
    build_image_store(tmp_path / "src", tmp_path / "store", size=32, fmt="PNG")
    script = load_script("pretrain_image")
    from peftrec.pretraining.cli import model_config, pretrain_parser

    args = parse_args(pretrain_parser(script.__doc__, "image"), [
        "--dataset", str(tiny_dataset_dir), "--encoder", str(vit), "--image-store",
        str(tmp_path / "store"), "--item-encoder", "image+id", "--item-head", "mlp",
        "--head-hidden-size", "6", *MODEL])
    config = model_config(args, data.num_items, data.fingerprint, data)
    assert config.item_encoder == "image+id"
    assert config.item_encoder_config["fusion"] == "sum"  # the default fusion
    content = build_item_content(data, config.item_encoder, config.item_encoder_config,
                                 tmp_path / "cache")
    items = build_item_encoder("image+id", data.num_items, 16, config.item_encoder_config,
                               content).eval()
    assert items.modality == "image" and items.projection.fc1.out_features == 6
    assert items.catalog().shape == (data.num_items + 1, 16)
    assert torch.equal(items.catalog(), items.content_catalog())


# --- bad input: one line, before anything is written -------------------------------------------

def run_text_script(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_main(load_script("pretrain_text").main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("flags, message", [
    (["--item-head", "moe", "--num-experts", "0"], "--num-experts must be an int >= 1"),
    (["--num-experts", "4"], "--num-experts 4: a setting of --item-head moe, not of "
                             "--item-head linear"),
    (["--moe-noise", "--item-head", "mlp"], "--moe-noise: a setting of --item-head moe"),
    (["--head-hidden-size", "8", "--item-head", "moe"], "--head-hidden-size 8: a setting of "
                                                        "--item-head mlp"),
    (["--head-dropout", "0.1"], "--head-dropout 0.1: a setting of --item-head mlp/moe"),
    (["--fusion", "gate"], "--fusion gate: only a content + ID item encoder fuses "
                           "(--item-encoder text+id)"),
    (["--item-head", "mlp", "--head-dropout", "1.5"], "--head-dropout must be in [0, 1)"),
])
def test_bad_head_and_fusion_settings_fail_in_one_line(bert, tiny_dataset_dir, tmp_path, capsys,
                                                       flags, message):
    out = tmp_path / "run"
    err = run_text_script(["--dataset", str(tiny_dataset_dir), "--output-dir", str(out),
                           "--encoder", str(bert), "--text-template", "{title}",
                           "--encoder-cache-dir", str(tmp_path / "cache"), *flags, *TRAIN],
                          capsys)
    assert message in err
    assert not out.exists()


def test_an_unknown_head_is_refused_by_flag_and_by_config_file(bert, tiny_dataset_dir, tmp_path,
                                                               capsys):
    common = ["--dataset", str(tiny_dataset_dir), "--output-dir", str(tmp_path / "run"),
              "--encoder", str(bert), "--text-template", "{title}", *TRAIN]
    with pytest.raises(SystemExit):
        load_script("pretrain_text").main([*common, "--item-head", "deep"])
    assert "invalid choice: 'deep'" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"item_head": "deep"}))
    err = run_text_script([*common, "--config", str(tmp_path / "c.yaml")], capsys)
    assert "c.yaml: head: 'deep' is not one of ['linear', 'mlp', 'moe']" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("edit, shown", [
    ({"head": "linear", "num_experts": None}, "the config says head 'linear' "
     "(projection.bias [16], projection.weight [16, 32]), the weights hold "
     "projection.experts.0.bias [32]"),
    ({"num_experts": 4}, "the config says head 'moe' (projection.experts.0.bias [32]"),
])
def test_a_head_that_does_not_fit_the_checkpoint_is_named_in_one_line(
        fusion_base, target_dir, tmp_path, capsys, edit, shown):
    run, cache = fusion_base
    edited = tmp_path / "edited"
    shutil.copytree(run, edited, ignore=shutil.ignore_patterns("state", "eval*.json"))
    for config_file, section in ((edited / "config.json", "model"),
                                 (edited / "best_model" / "config.json", "config")):
        meta = json.loads(config_file.read_text())
        meta[section]["item_encoder_config"].update(edit)
        config_file.write_text(json.dumps(meta))
    write_checksums(edited / "best_model")  # a consistent checkpoint, of another head
    with pytest.raises(CheckpointError, match="item head does not fit its weights") as error:
        load_recommender_config(edited / "best_model")
    assert shown in str(error.value) and len(str(error.value).splitlines()) == 1
    # evaluate.py and fine-tuning stop with that line before writing anything
    with pytest.raises(SystemExit):
        run_main(load_script("evaluate").main, ["--run", str(edited), "--cpu"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and shown in err
    assert not (edited / "evaluation.json").exists()
    with pytest.raises(SystemExit):
        run_main(load_script("finetune_full").main, [
            "--pretrained", str(edited), "--dataset", str(target_dir), "--output-dir",
            str(tmp_path / "ft"), "--encoder-cache-dir", str(cache), *TRAIN])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and shown in err
    assert not (tmp_path / "ft").exists()
