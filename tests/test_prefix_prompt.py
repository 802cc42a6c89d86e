"""Prefix and prompt adapters: identity at injection on every host, training, fold, errors."""

import pytest
import torch
from torch import nn

from peftrec.adapters import (
    ADAPTERS,
    GatedPrefixAttention,
    PrefixAttention,
    PrefixConfig,
    PromptAttention,
    PromptConfig,
    fold_prefixes,
    get_adapted_model,
    trainable_share,
)
from peftrec.adapters.base import adapter_config_from_dict, adapter_parameter_ids
from peftrec.modality_encoders.transformer import TransformerStages
from peftrec.pretraining import RecommenderConfig, SequentialRecommender
from tests.helpers import perturb_adapters, random_item_batch

SASREC = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "ffn_size": 32, "max_len": 12,
          "dropout": 0.1}
DIFFREC = {**SASREC, "max_len": 10, "num_steps": 20, "num_seeds": 3}
ENCODER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 64}


def recommender(backbone="sasrec", **overrides):
    settings = {**(SASREC if backbone == "sasrec" else DIFFREC), **overrides}
    torch.manual_seed(0)
    return SequentialRecommender(RecommenderConfig(num_items=30, backbone=backbone,
                                                   backbone_config=settings)).eval()




@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Tiny random BERT, ViT and ViTMAE saved like downloaded models (no tokenizer needed)."""
    from transformers import BertConfig, BertModel, ViTConfig, ViTMAEConfig, ViTMAEModel, ViTModel

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=50, **ENCODER)).save_pretrained(root / "bert")
    ViTModel(ViTConfig(image_size=16, patch_size=8, **ENCODER)).save_pretrained(root / "vit")
    ViTMAEModel(ViTMAEConfig(image_size=16, patch_size=8, **ENCODER)).save_pretrained(root / "mae")
    return root


def text_inputs(padded=True):
    ids = torch.tensor([[2, 7, 9, 11, 4, 3], [2, 5, 8, 3, 0, 0]])
    mask = (ids > 0).long() if padded else torch.ones_like(ids)
    return {"input_ids": ids.clamp_min(1), "attention_mask": mask}


def every_position_predictions(model) -> torch.Tensor:
    """DiffRec's training predictions for every position, at fixed steps and noise."""
    batch, catalog = random_item_batch(), model.item_encoder.catalog()
    torch.manual_seed(0)
    losses = model.backbone.every_position_losses(
        catalog[batch["input_ids"]], batch["input_ids"] > 0, catalog[batch["target_ids"]],
        batch["target_ids"] > 0)
    return losses["predicted"]


def stages(encoders, kind, attention="sdpa"):
    model = TransformerStages(encoders / kind, kind, "text" if kind == "bert" else "image")
    model.model.set_attn_implementation(attention)
    return model.eval()


def image_inputs():
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))}


# Each host: (build the model from the encoders folder, its output, the host getter).
HOSTS = {
    "sasrec": (lambda e: recommender(), lambda m: m.scores(random_item_batch())),
    "diffrec": (lambda e: recommender("diffrec"), lambda m: m.scores(random_item_batch())),
    # a causal denoiser samples through the history cache (`_encode_history`/`_denoise_tail`)
    "diffrec-cached": (lambda e: recommender("diffrec", causal_denoiser=True, inference="strided",
                                             inference_steps=3),
                       lambda m: m.scores(random_item_batch())),
    # training on every position: the predictions of the two-stream pass
    "diffrec-every-position": (
        lambda e: recommender("diffrec", causal_denoiser=True, every_position=True),
        lambda m: every_position_predictions(m)),
    "bert-sdpa": (lambda e: stages(e, "bert"), lambda m: m(text_inputs())),  # 4-D bool mask
    "bert-eager": (lambda e: stages(e, "bert", "eager"), lambda m: m(text_inputs())),  # float
    "bert-no-padding": (lambda e: stages(e, "bert"), lambda m: m(text_inputs(padded=False))),
    "vit": (lambda e: stages(e, "vit"), lambda m: m(image_inputs())),
    "vit_mae": (lambda e: stages(e, "mae"), lambda m: m(image_inputs())),
}
CONFIGS = {
    "prefix": PrefixConfig(num_virtual_tokens=3),
    "prefix-mlp-top1": PrefixConfig(reparameterize=True, reparameterize_hidden=8, layers="top:1"),
    "prompt": PromptConfig(num_tokens=2),
}




@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("host", list(HOSTS))
def test_injection_leaves_outputs_bit_for_bit_unchanged(encoders, host, config):
    build, run = HOSTS[host]
    model = build(encoders)
    with torch.no_grad():
        before = run(model)
        adapted = get_adapted_model(model, CONFIGS[config]).eval()
        assert any(isinstance(m, GatedPrefixAttention) for m in adapted.modules())
        assert torch.equal(run(adapted), before)
        perturb_adapters(adapted, 0.5)  # the adapters really are on the forward path
        after = run(adapted)
    assert after.shape == before.shape  # prompt positions never reach the output
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_diffrec_history_cache_matches_the_full_denoiser_with_adapters(config):
    model = get_adapted_model(recommender("diffrec", causal_denoiser=True), CONFIGS[config])
    perturb_adapters(model, 0.5)
    backbone = model.backbone.eval()
    vectors = model.item_encoder.catalog()[random_item_batch()["input_ids"]]
    mask = random_item_batch()["input_ids"] > 0
    cached = backbone.sample_predictions(vectors, mask, reuse_history=True)
    full = backbone.sample_predictions(vectors, mask, reuse_history=False)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_one_step_moves_only_adapter_parameters(config):
    model = get_adapted_model(recommender(), CONFIGS[config]).train()
    owned = {n for n, p in model.named_parameters() if id(p) in adapter_parameter_ids(model)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == owned
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.loss(random_item_batch())["loss"].backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= owned
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_gradients_reach_gates_at_once_and_prefixes_once_gates_open(config):
    model = get_adapted_model(recommender(), CONFIGS[config]).train()
    wrappers = [m for m in model.modules() if isinstance(m, GatedPrefixAttention)]
    model.loss(random_item_batch())["loss"].backward()
    assert all(w.gate.grad.abs().sum() > 0 for w in wrappers)  # zero gate, non-zero prefix
    model.zero_grad()
    with torch.no_grad():
        for wrapper in wrappers:
            wrapper.gate.fill_(0.5)
    model.loss(random_item_batch())["loss"].backward()
    for wrapper in wrappers:
        prefix = [p for n, p in wrapper.named_parameters()
                  if not n.startswith("base.") and n != "gate"]
        assert prefix and all(p.grad is not None and p.grad.abs().sum() > 0 for p in prefix)


def test_fold_replaces_the_mlp_by_its_prefix_and_keeps_outputs(encoders):
    model = get_adapted_model(stages(encoders, "bert"), PrefixConfig(reparameterize=True))
    perturb_adapters(model, 0.5)
    with torch.no_grad():
        before = model(text_inputs())
    assert fold_prefixes(model) is model
    names = {n for n, _ in model.named_parameters()}
    assert not any(".mlp." in n or n.endswith(".embedding") for n in names)
    wrappers = [m for m in model.modules() if isinstance(m, PrefixAttention)]
    assert len(wrappers) == 2 and all(w.key_value.shape == (10, 64) for w in wrappers)
    with torch.no_grad():
        assert torch.equal(model(text_inputs()), before)


def count_per_layer(layers, kind):
    return [sum(isinstance(m, kind) for m in layer.modules()) for layer in layers]


@pytest.mark.parametrize("kind, config", [(PrefixAttention, PrefixConfig),
                                          (PromptAttention, PromptConfig)])
@pytest.mark.parametrize("layers, expected", [("top:1", [0, 1]), ("bottom:1", [1, 0]),
                                              ("0", [1, 0]), ("all", [1, 1])])
def test_placement_wraps_exactly_the_chosen_layers(encoders, kind, config, layers, expected):
    model = get_adapted_model(recommender(), config(layers=layers))
    assert count_per_layer(model.backbone.layers, kind) == expected
    assert isinstance(model.backbone.layers[expected.index(1)].attention, kind)
    for name in ("bert", "vit"):
        encoder = get_adapted_model(stages(encoders, name), config(layers=layers))
        assert count_per_layer(encoder.layers, kind) == expected


def test_trainable_share_matches_a_hand_count():
    # 2 layers, width 16, 2 heads: prefix 10 x (16 keys + 16 values), prompt 10 x 16 tokens.
    prefix = get_adapted_model(recommender(), PrefixConfig())
    assert trainable_share(prefix)[0] == 2 * (10 * 32 + 2)
    prompt = get_adapted_model(recommender(), PromptConfig())
    assert trainable_share(prompt)[0] == 2 * (10 * 16 + 2)
    mlp = get_adapted_model(recommender(), PrefixConfig(reparameterize=True, layers="0"))
    # embedding 10 x 16, MLP 16 -> 16 -> 32 (the attention width by default), gates
    assert trainable_share(mlp)[0] == 10 * 16 + (16 * 16 + 16) + (16 * 32 + 32) + 2


def test_registry_lists_the_methods():
    assert ADAPTERS["prefix"][0] is PrefixConfig and ADAPTERS["prompt"][0] is PromptConfig


class NoAttention(nn.Module):
    """A host with adapter sites but no declared self-attention modules."""

    adapter_sites = {"ffn": "layers.{i}"}

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))


class NotAttention(NoAttention):
    attention_modules = "layers.{i}"  # points at plain Linear layers


@pytest.mark.parametrize(
    "make_model, config, message",
    [
        (NoAttention, PrefixConfig(), "NoAttention declares no `attention_modules`"),
        (NoAttention, PromptConfig(), "NoAttention declares no `attention_modules`"),
        (NotAttention, PrefixConfig(), "Linear is no self-attention module"),
        (recommender, PrefixConfig(layers="7"), "layer 7 is out of range: the model has 2 layers"),
        (recommender, PromptConfig(layers="top:3"), "the model has 2 layers"),
        (recommender, PrefixConfig(adapt="item_encoder"), "no layers to adapt"),
    ],
)
def test_impossible_placements_raise_clear_errors(make_model, config, message):
    with pytest.raises(ValueError, match=message):
        get_adapted_model(make_model(), config)


@pytest.mark.parametrize(
    "make_config, message",
    [
        (lambda: PrefixConfig(num_virtual_tokens=0), "num_virtual_tokens must be an int >= 1"),
        (lambda: PrefixConfig(reparameterize="yes"), "reparameterize must be True or False"),
        (lambda: PrefixConfig(reparameterize_hidden=0), "reparameterize_hidden"),
        (lambda: PromptConfig(num_tokens=1.5), "num_tokens must be an int >= 1"),
        (lambda: PrefixConfig(layers="top"), "malformed layer spec"),
        (lambda: adapter_config_from_dict({"method": "prefix", "num_tokens": 3}),
         r"unknown settings \['num_tokens'\] for adapter method 'prefix'"),
        (lambda: adapter_config_from_dict({"method": "prompt", "reparameterize": True}),
         "unknown settings"),
    ],
)
def test_bad_configs_fail_at_construction(make_config, message):
    with pytest.raises(ValueError, match=message):
        make_config()


def test_configs_round_trip_through_a_dict():
    config = PrefixConfig(num_virtual_tokens=4, reparameterize=True, layers="top:1")
    assert adapter_config_from_dict(config.to_dict()) == config
    prompt = PromptConfig(num_tokens=3, layers="0")
    assert adapter_config_from_dict(prompt.to_dict()) == prompt
