"""Adapters: identity at injection, only adapters train, placement, trainable share, errors."""

import hashlib

import pytest
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from peftrec.adapters import (
    ADAPTERS,
    Bottleneck,
    HoulsbyConfig,
    LoRAConfig,
    PfeifferConfig,
    format_trainable_share,
    get_adapted_model,
    parse_layers,
    parse_sites,
    trainable_share,
)
from peftrec.adapters.base import adapter_parameter_ids
from peftrec.adapters.lora import ADAPTER_NAME, peft_tensor_name
from peftrec.pretraining import RecommenderConfig, SequentialRecommender
from tests.helpers import perturb_adapters, random_item_batch


def tiny_model(num_items=30):
    backbone = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "ffn_size": 32,
                "max_len": 12, "dropout": 0.1}
    torch.manual_seed(0)
    return SequentialRecommender(RecommenderConfig(num_items=num_items,
                                                   backbone_config=backbone)).eval()






CONFIGS = {
    "houlsby": HoulsbyConfig(),
    "houlsby-parallel": HoulsbyConfig(parallel=True),
    "houlsby-attn": HoulsbyConfig(sites=("attn",)),
    "houlsby-ffn": HoulsbyConfig(sites=("ffn",)),
    "houlsby-parallel-attn": HoulsbyConfig(sites=("attn",), parallel=True),
    "houlsby-parallel-ffn": HoulsbyConfig(sites=("ffn",), parallel=True),
    "houlsby-top1": HoulsbyConfig(layers="top:1"),
    "houlsby-bottom1": HoulsbyConfig(layers="bottom:1", non_linearity="gelu"),
    "houlsby-layer0": HoulsbyConfig(layers="0", reduction_factor=4),
    "pfeiffer": PfeifferConfig(),
    "lora": LoRAConfig(rank=4),
    "lora-top1-qv": LoRAConfig(rank=2, layers="top:1", target_modules=("q_proj", "v_proj")),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_injection_leaves_scores_bit_for_bit_unchanged(name):
    model = tiny_model()
    before = model.scores(random_item_batch())
    adapted = get_adapted_model(model, CONFIGS[name]).eval()
    assert adapted is model
    assert torch.equal(adapted.scores(random_item_batch()), before)
    perturb_adapters(adapted)  # the adapters really are on the forward path
    assert not torch.allclose(adapted.scores(random_item_batch()), before)


def param_hashes(model, skip=frozenset()):
    return {
        name: hashlib.sha256(p.detach().numpy().tobytes()).hexdigest()
        for name, p in model.named_parameters() if id(p) not in skip
    }


STEP_CASES = {
    "houlsby": (HoulsbyConfig(), ()),
    "houlsby-parallel": (HoulsbyConfig(parallel=True, layers="top:1"), ()),
    "pfeiffer": (PfeifferConfig(), ()),
    "lora": (LoRAConfig(rank=2), ()),
    "lora+layernorm+bias": (LoRAConfig(rank=2, extras=("layernorm", "bias")),
                            ("layernorm", "bias")),
    "houlsby+embeddings": (HoulsbyConfig(sites=("ffn",), extras=("embeddings",)),
                           ("embeddings",)),
}


def extra_names(model, extras):
    names = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}"
            if ("layernorm" in extras and isinstance(module, nn.LayerNorm)) or (
                "embeddings" in extras and isinstance(module, nn.Embedding)
            ) or ("bias" in extras and param_name == "bias"):
                names.add(full)
    return names


@pytest.mark.parametrize("name", list(STEP_CASES))
def test_one_step_moves_only_adapters_and_named_extras(name):
    config, extras = STEP_CASES[name]
    model = get_adapted_model(tiny_model(), config).train()
    owned = adapter_parameter_ids(model)
    owned_names = {n for n, p in model.named_parameters() if id(p) in owned}
    allowed = owned_names | extra_names(model, extras)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == allowed
    frozen_before = param_hashes(model, skip={id(p) for n, p in model.named_parameters()
                                              if n in allowed})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.loss(random_item_batch())["loss"].backward()
    optimizer.step()

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= allowed
    assert changed & owned_names  # the adapters themselves moved
    if extras:
        assert changed - owned_names  # and so did the named extras
    after = param_hashes(model, skip={id(p) for n, p in model.named_parameters() if n in allowed})
    assert after == frozen_before
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_peft_lora_on_a_backbone_linear_adds_the_update_and_merges():
    model = tiny_model()
    o_proj = model.backbone.layers[1].attention.o_proj
    weight, bias = o_proj.weight.detach().clone(), o_proj.bias.detach().clone()
    get_adapted_model(model, LoRAConfig(rank=4, alpha=8, dropout=0.1, layers="1",
                                        target_modules="o_proj")).eval()
    lora = model.backbone.layers[1].attention.o_proj
    assert isinstance(lora, LoraLayer) and lora.base_layer is o_proj
    x = torch.randn(5, 16)
    assert torch.equal(lora(x), o_proj(x))
    lora_A, lora_B = lora.lora_A[ADAPTER_NAME].weight, lora.lora_B[ADAPTER_NAME].weight
    assert torch.equal(lora_B, torch.zeros(16, 4)) and lora_A.abs().sum() > 0
    assert lora.scaling[ADAPTER_NAME] == 2.0
    with torch.no_grad():
        lora_B.normal_()
    expected = o_proj(x) + x @ lora_A.T @ lora_B.T * 2.0
    torch.testing.assert_close(lora(x), expected)
    lora.merge()
    torch.testing.assert_close(lora(x), expected, atol=1e-5, rtol=0)
    lora.unmerge()
    torch.testing.assert_close(o_proj.weight, weight, atol=1e-6, rtol=0)
    assert torch.equal(o_proj.bias, bias)


def test_a_rank_pattern_gives_the_named_layers_their_own_rank_at_the_same_scale():
    model = tiny_model()
    get_adapted_model(model, LoRAConfig(rank=4, alpha=8, target_modules="q_proj,fc1,fc2",
                                        rank_pattern="fc1=2, fc2=1"))
    ranks, scales = {}, set()
    for name, module in model.backbone.named_modules():
        if isinstance(module, LoraLayer):
            ranks[name.rsplit(".", 1)[-1]] = module.lora_A[ADAPTER_NAME].weight.shape[0]
            scales.add(module.scaling[ADAPTER_NAME])
    assert ranks == {"q_proj": 4, "fc1": 2, "fc2": 1}
    assert scales == {2.0}  # alpha / rank everywhere: alpha follows the pattern's rank
    # Two layers (hidden 16, ffn 32), each: q_proj 4 * (16 + 16), fc1 2 * (16 + 32),
    # fc2 1 * (32 + 16).
    expected = 2 * (4 * 32 + 2 * 48 + 48)
    assert trainable_share(model)[0] == expected


@pytest.mark.parametrize("pattern", ["fc1", "fc1=0", "=2", "fc1=two"])
def test_a_malformed_rank_pattern_is_refused_naming_the_entry(pattern):
    with pytest.raises(ValueError, match="malformed rank_pattern entry"):
        LoRAConfig(rank=4, rank_pattern=pattern)


def test_lora_draws_its_a_matrices_as_the_hand_written_layer_did():
    """One kaiming-uniform A per adapted Linear, in placement order, from the global RNG
    (peft's own init draws more): a fixed-seed run is the one before peft."""
    model = tiny_model()
    torch.manual_seed(7)
    get_adapted_model(model, LoRAConfig(rank=2, target_modules="q_proj,fc1"))
    after = torch.rand(1)
    torch.manual_seed(7)
    expected = [nn.init.kaiming_uniform_(torch.empty(2, 16), a=5 ** 0.5) for _ in range(4)]
    drawn = [m.lora_A[ADAPTER_NAME].weight for m in model.modules() if isinstance(m, LoraLayer)]
    assert all(torch.equal(a, b) for a, b in zip(drawn, expected, strict=True))
    assert torch.equal(after, torch.rand(1))


def test_lora_keeps_the_exact_pretrained_weights_in_the_model():
    model = tiny_model()
    originals = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    o_proj = model.backbone.layers[1].attention.o_proj
    get_adapted_model(model, LoRAConfig(rank=2))
    wrapped = model.backbone.layers[1].attention.o_proj
    assert isinstance(wrapped, LoraLayer) and wrapped.base_layer is o_proj
    for name, param in model.backbone.named_parameters():
        original = name.replace(".base_layer.", ".")
        if original in originals:
            assert torch.equal(param, originals[original]), name
    assert set(originals) == {
        n.replace(".base_layer.", ".") for n, _ in model.backbone.named_parameters()
        if "lora_" not in n
    }


def test_tensors_of_the_former_hand_written_lora_layer_are_read_under_peft_names():
    """Adapter checkpoints written before LoRA came from peft still load (the loader
    renames their tensors; a real ML-100k run reloaded to its recorded metrics)."""
    model = get_adapted_model(tiny_model(), LoRAConfig(rank=2, extras=("bias",)))
    parameters = dict(model.named_parameters())
    q_proj = "backbone.layers.0.attention.q_proj"
    assert peft_tensor_name(f"{q_proj}.lora_A", parameters) == f"{q_proj}.lora_A.default.weight"
    assert peft_tensor_name(f"{q_proj}.lora_B", parameters) == f"{q_proj}.lora_B.default.weight"
    assert peft_tensor_name(f"{q_proj}.base.bias", parameters) == f"{q_proj}.base_layer.bias"
    for name in parameters:  # today's names, and names the model lacks, stay as they are
        assert peft_tensor_name(name, parameters) == name
    assert peft_tensor_name("backbone.nope.lora_A", parameters) == "backbone.nope.lora_A"


def test_trainable_share_matches_a_hand_count():
    model = tiny_model()
    _, base_total, _ = trainable_share(model)
    get_adapted_model(model, HoulsbyConfig(layers="top:1", sites=("ffn",)))
    # hidden 16, reduction 16 -> width 1: down 16*1 + 1, up 1*16 + 16.
    expected = (16 + 1) + (16 + 16)
    trainable, total, percent = trainable_share(model)
    assert (trainable, total) == (expected, base_total + expected)
    assert percent == pytest.approx(100 * expected / total)
    assert format_trainable_share(model) == (
        f"trainable params: {expected:,} || all params: {total:,} || "
        f"trainable%: {100 * expected / total:.2f}"
    )

    lora_model = get_adapted_model(tiny_model(), LoRAConfig(rank=2, layers="top:1"))
    # q,k,v,o: 2*16 + 16*2 each; fc1 16->32: 2*16 + 32*2; fc2 32->16: 2*32 + 16*2.
    assert trainable_share(lora_model)[0] == 4 * 64 + 96 + 96


def count_per_layer(model, kind):
    return [sum(isinstance(m, kind) for m in layer.modules()) for layer in model.backbone.layers]


@pytest.mark.parametrize(
    "config, kind, expected",
    [
        (HoulsbyConfig(), Bottleneck, [2, 2]),
        (HoulsbyConfig(layers="top:1"), Bottleneck, [0, 2]),
        (HoulsbyConfig(layers="bottom:1", sites=("attn",)), Bottleneck, [1, 0]),
        (HoulsbyConfig(layers="1", sites=("ffn",)), Bottleneck, [0, 1]),
        (PfeifferConfig(), Bottleneck, [1, 1]),
        (LoRAConfig(), LoraLayer, [6, 6]),
        (LoRAConfig(layers="0", target_modules=("q_proj", "v_proj")), LoraLayer, [2, 0]),
        (LoRAConfig(layers="top:1", target_modules="fc1,fc2"), LoraLayer, [0, 2]),
    ],
)
def test_placement_puts_adapters_exactly_where_requested(config, kind, expected):
    model = get_adapted_model(tiny_model(), config)
    assert count_per_layer(model, kind) == expected
    assert sum(isinstance(m, kind) for m in model.item_encoder.modules()) == 0


def test_attn_site_sits_after_the_attention_and_keeps_it_reachable():
    model = tiny_model()
    attention = model.backbone.layers[0].attention
    get_adapted_model(model, HoulsbyConfig(sites=("attn",), layers="0"))
    site = model.backbone.layers[0].attention
    assert site.base is attention and isinstance(site.adapter, Bottleneck)
    assert site.adapter.down.out_features == 1 and site.adapter.up.out_features == 16


def test_registry_lists_the_methods():
    assert {"houlsby", "pfeiffer", "lora"} <= set(ADAPTERS)


@pytest.mark.parametrize(
    "spec, expected",
    [("all", [0, 1, 2, 3]), ("top:1", [3]), ("top:4", [0, 1, 2, 3]), ("bottom:2", [0, 1]),
     ("0,2", [0, 2]), ("2, 0", [0, 2]), ("3", [3])],
)
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 4) == expected


@pytest.mark.parametrize(
    "spec, message",
    [("top:5", "between 1 and 4"), ("bottom:0", "K must be >= 1"), ("7", "model has 4 layers"),
     ("top", "malformed"), ("middle:1", "malformed"), ("0,,1", "malformed"), ("-1", "malformed"),
     ("", "malformed"), ("top:x", "malformed")],
)
def test_parse_layers_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_layers(spec, 4)


def test_parse_sites():
    assert parse_sites("attn, ffn") == ("attn", "ffn")
    assert parse_sites(("ffn",), valid=("attn", "ffn")) == ("ffn",)
    with pytest.raises(ValueError, match="valid sites: attn, ffn"):
        parse_sites("attn,mlp", valid=("attn", "ffn"))
    with pytest.raises(ValueError, match="malformed"):
        parse_sites("attn,")


class FakeMethodConfig:
    method = "nope"


class NoSites(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)


@pytest.mark.parametrize(
    "make_model, config, message",
    [
        (tiny_model, FakeMethodConfig(), "unknown adapter method 'nope'.*houlsby"),
        (tiny_model, HoulsbyConfig(sites=("mlp",)), "unknown adapter site.*valid sites: attn, ffn"),
        (tiny_model, HoulsbyConfig(layers="7"), "layer 7 is out of range: the model has 2 layers"),
        (tiny_model, LoRAConfig(layers="0,7"), "the model has 2 layers"),
        (tiny_model, HoulsbyConfig(layers="top:3"), "the model has 2 layers"),
        (tiny_model, LoRAConfig(target_modules=("nothing",)), "matches target_modules"),
        (NoSites, HoulsbyConfig(), "NoSites has no layers to adapt"),
        (NoSites, LoRAConfig(), "NoSites has no layers to adapt"),
    ],
)
def test_bad_inputs_raise_clear_errors(make_model, config, message):
    with pytest.raises(ValueError, match=message):
        get_adapted_model(make_model(), config)


@pytest.mark.parametrize(
    "make_config, message",
    [
        (lambda: HoulsbyConfig(layers="0;1"), "malformed layer spec"),
        (lambda: HoulsbyConfig(non_linearity="tanh"), "swish, relu, gelu"),
        (lambda: HoulsbyConfig(reduction_factor=0), "reduction_factor"),
        (lambda: HoulsbyConfig(extras=("everything",)), "layernorm, bias"),
        (lambda: LoRAConfig(rank=0), "rank"),
        (lambda: LoRAConfig(layers="top:"), "malformed layer spec"),
    ],
)
def test_bad_configs_fail_at_construction(make_config, message):
    with pytest.raises(ValueError, match=message):
        make_config()


def test_configs_are_immutable_and_replace_makes_a_copy():
    config = HoulsbyConfig()
    changed = config.replace(parallel=True, sites="ffn")
    assert changed.parallel and changed.sites == ("ffn",) and not config.parallel
    with pytest.raises(AttributeError):
        config.parallel = True  # type: ignore[misc]
    assert PfeifferConfig().sites == ("ffn",) and PfeifferConfig().method == "pfeiffer"


class TinyHost(nn.Module):
    """A minimal in-file model: two layers of sites, a norm, an embedding, a projection."""

    adapter_sites = {"ffn": "layers.{i}.ffn"}
    lora_targets = ("ffn",)

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(5, 8)
        self.layers = nn.ModuleList(nn.ModuleDict({"ffn": nn.Linear(8, 8)}) for _ in range(2))
        self.norm = nn.LayerNorm(8)
        self.projection = nn.Linear(8, 4, bias=False)


@pytest.mark.parametrize(
    "extras, expected",
    [
        ((), set()),
        (("projection",), {"projection.weight"}),
        (("embeddings",), {"embedding.weight"}),
        (("layernorm",), {"norm.weight", "norm.bias"}),
        (("bias",), {"norm.bias", "layers.0.ffn.base.bias", "layers.1.ffn.base.bias"}),
    ],
)
def test_extras_unfreeze_exactly_what_they_name(extras, expected):
    model = get_adapted_model(TinyHost(), PfeifferConfig(reduction_factor=4, extras=extras))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {f"layers.{i}.ffn.adapter.{lin}.{w}" for i in range(2) for lin in ("down", "up")
                for w in ("weight", "bias")}
    assert trainable == adapters | expected
