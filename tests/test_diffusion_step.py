"""Diffusion-step adapters: identity at injection, step dependence, both inference paths,
`step_mlp_only`, only adapters train, placement, errors."""

import pytest
import torch

from peftrec.adapters import (
    ADAPTERS,
    BottleneckSite,
    DiffusionStepConfig,
    StepModulatedBottleneck,
    get_adapted_model,
)
from peftrec.adapters.base import adapter_config_from_dict, adapter_parameter_ids
from peftrec.pretraining import RecommenderConfig, SequentialRecommender
from peftrec.pretraining.sasrec import CausalSelfAttention, FeedForward
from tests.helpers import DIFFREC_NUM_ITEMS, DIFFREC_TINY, perturb_adapters

TINY = {**DIFFREC_TINY, "num_layers": 2}  # two layers, for placement
NUM_ITEMS = DIFFREC_NUM_ITEMS


def model(**overrides) -> SequentialRecommender:
    torch.manual_seed(0)
    config = RecommenderConfig(num_items=NUM_ITEMS, backbone="diffrec",
                               backbone_config={**TINY, **overrides})
    return SequentialRecommender(config).eval()


def batch() -> dict:
    return {"input_ids": torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5], [0, 0, 0, 0, 7]]),
            "target_ids": torch.tensor([[0, 0, 4, 5, 6], [2, 3, 4, 5, 9], [0, 0, 0, 0, 8]])}




def fixed_losses(recommender) -> dict:
    torch.manual_seed(0)  # the same diffusion steps and noise on every call
    with torch.no_grad():
        return recommender.loss(batch())


CONFIGS = {
    "default": DiffusionStepConfig(reduction_factor=4),
    "ffn-top1": DiffusionStepConfig(layers="top:1", sites=("ffn",), non_linearity="gelu"),
    "step-mlp-only": DiffusionStepConfig(step_mlp_only=True),
}


DENOISERS = {"bidirectional": {"noised_positions": 2},
             "causal": {"causal_denoiser": True, "noised_positions": 2},
             "every position": {"causal_denoiser": True, "every_position": True}}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("denoiser", list(DENOISERS))
def test_injection_leaves_scores_and_losses_bit_for_bit_unchanged(name, denoiser):
    recommender = model(**DENOISERS[denoiser])
    scores, losses = recommender.scores(batch()), fixed_losses(recommender)
    get_adapted_model(recommender, CONFIGS[name])
    assert torch.equal(recommender.scores(batch()), scores)
    after = fixed_losses(recommender)
    assert all(torch.equal(after[key], losses[key]) for key in ("loss", "mse", "ce"))
    perturb_adapters(recommender, 0.3)  # the adapters really are on both paths
    assert not torch.allclose(recommender.scores(batch()), scores)
    assert not torch.allclose(fixed_losses(recommender)["loss"], losses["loss"])


def perturbed_ffn_adapter():
    """A DiffRec with perturbed diffusion_step adapters: its backbone and layer 0's FFN one."""
    recommender = get_adapted_model(model(), CONFIGS["default"])
    perturb_adapters(recommender, 0.3)
    backbone = recommender.backbone
    return backbone, backbone.layers[0].feed_forward.fc2.adapter


def adapter_output(backbone, adapter, x: torch.Tensor, steps: list) -> torch.Tensor:
    """The adapter on `x` [2, L, d] with `steps`: one per row (on the last position), or
    a list of K per row (on the last K positions)."""
    steps = torch.tensor([steps, steps])
    noised = 1 if steps.dim() == 1 else steps.shape[1]
    with torch.no_grad(), backbone.step_context.use(backbone.step_embedding(steps), noised):
        return adapter(x)


def test_the_adapter_effect_depends_on_the_step():
    backbone, adapter = perturbed_ffn_adapter()
    x = torch.randn(2, 5, 8)
    early, late = (adapter_output(backbone, adapter, x, step) for step in (3, 17))
    assert torch.equal(early[:, :-1], late[:, :-1])  # the history is not modulated
    assert not torch.allclose(early[:, -1], late[:, -1])
    with torch.no_grad():  # without the modulation, the step makes no difference
        adapter.modulation.weight.zero_()
        adapter.modulation.bias.zero_()
    assert torch.equal(adapter_output(backbone, adapter, x, 3),
                       adapter_output(backbone, adapter, x, 17))
    assert backbone.step_context.embedding is None  # cleared after each use


def test_with_a_step_per_position_each_noised_position_gets_its_own():
    backbone, adapter = perturbed_ffn_adapter()
    x = torch.randn(2, 5, 8)
    both_early, last_late = (adapter_output(backbone, adapter, x, steps)
                             for steps in ([3, 3], [3, 17]))
    assert torch.equal(both_early[:, :-1], last_late[:, :-1])
    assert not torch.allclose(both_early[:, -1], last_late[:, -1])
    # One step per row is the same as that step at every noised position.
    with torch.no_grad(), backbone.step_context.use(
            backbone.step_embedding(torch.tensor([3, 3])), 2):
        torch.testing.assert_close(adapter(x), both_early)


def test_an_adapter_run_outside_the_denoisers_step_refuses_instead_of_ignoring_it():
    backbone, adapter = perturbed_ffn_adapter()
    x = torch.randn(2, 5, 8)
    with pytest.raises(RuntimeError, match="outside the denoiser's forward pass"):
        adapter(x)
    # Activation checkpointing recomputes the layer in the backward pass, after the forward
    # pass cleared the context: refused too, not run as an unmodulated bottleneck.
    layer, mask = backbone.layers[0], torch.ones(2, 1, 5, 5, dtype=torch.bool)
    with backbone.step_context.use(backbone.step_embedding(torch.tensor([3, 17])), 1):
        out = torch.utils.checkpoint.checkpoint(layer, x.requires_grad_(), mask,
                                                use_reentrant=False)
    with pytest.raises(RuntimeError, match="outside the denoiser's forward pass"):
        out.sum().backward()


@pytest.mark.parametrize(
    "inference, noised, sites",
    [("one_step", 1, ("attn", "ffn")), ("strided", 2, ("attn", "ffn")),
     ("one_step", 2, ("attn",)), ("strided", 1, ("ffn",))],
)
def test_history_caching_and_per_seed_inference_still_agree(inference, noised, sites):
    recommender = model(causal_denoiser=True, inference=inference, inference_steps=4,
                        noised_positions=noised)
    catalog = recommender.item_encoder.catalog()
    input_ids = batch()["input_ids"]
    backbone = recommender.backbone
    before = backbone.sample_predictions(catalog[input_ids], input_ids > 0, reuse_history=True)
    get_adapted_model(recommender, DiffusionStepConfig(sites=sites, reduction_factor=2))
    perturb_adapters(recommender, 0.3)
    once = backbone.sample_predictions(catalog[input_ids], input_ids > 0, reuse_history=True)
    per_seed = backbone.sample_predictions(catalog[input_ids], input_ids > 0,
                                           reuse_history=False)
    torch.testing.assert_close(once, per_seed, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(once, before)  # the cached path runs through the adapters


def test_step_mlp_only_trains_exactly_the_step_mlp():
    recommender = model()
    step_mlp = recommender.backbone.step_mlp
    get_adapted_model(recommender, CONFIGS["step-mlp-only"])
    trainable = {id(p) for p in recommender.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in step_mlp.parameters()}
    assert not any(isinstance(m, StepModulatedBottleneck) for m in recommender.modules())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_optimizer_step_moves_only_adapter_parameters(name):
    recommender = get_adapted_model(model(), CONFIGS[name]).train()
    owned = adapter_parameter_ids(recommender)
    before = {n: p.detach().clone() for n, p in recommender.named_parameters()}
    optimizer = torch.optim.SGD([p for p in recommender.parameters() if p.requires_grad],
                                lr=0.1)
    recommender.loss(batch())["loss"].backward()
    optimizer.step()
    changed = {n for n, p in recommender.named_parameters() if not torch.equal(p, before[n])}
    assert changed
    assert changed <= {n for n, p in recommender.named_parameters() if id(p) in owned}


@pytest.mark.parametrize(
    "config, expected",
    [(DiffusionStepConfig(), [2, 2]), (DiffusionStepConfig(layers="top:1"), [0, 2]),
     (DiffusionStepConfig(sites=("ffn",)), [1, 1]),
     (DiffusionStepConfig(layers="0", sites=("attn",)), [1, 0])],
)
def test_placement_puts_adapters_exactly_where_requested(config, expected):
    recommender = get_adapted_model(model(), config)
    layers = recommender.backbone.layers
    assert [sum(isinstance(m, StepModulatedBottleneck) for m in layer.modules())
            for layer in layers] == expected
    # The output projections are wrapped; the attention and feed-forward stay in place.
    for layer in layers:
        assert isinstance(layer.attention, CausalSelfAttention)
        assert isinstance(layer.feed_forward, FeedForward)
    if expected[-1]:
        assert isinstance(layers[-1].feed_forward.fc2, BottleneckSite)


def test_registry_and_config_round_trip():
    assert "diffusion_step" in ADAPTERS
    config = DiffusionStepConfig(sites="ffn", reduction_factor=2, step_mlp_only=True)
    assert config.sites == ("ffn",)
    assert adapter_config_from_dict(config.to_dict()) == config


@pytest.mark.parametrize("config", [DiffusionStepConfig(), CONFIGS["step-mlp-only"]])
def test_a_non_diffusion_backbone_is_refused(config):
    with pytest.raises(ValueError, match=r"need a diffusion backbone \(diffrec, "):
        sasrec = RecommenderConfig(num_items=NUM_ITEMS, backbone_config={"hidden_size": 8})
        get_adapted_model(SequentialRecommender(sasrec), config)


@pytest.mark.parametrize(
    "settings, message",
    [({"adapt": "item_encoder"}, "--adapt backbone"), ({"adapt": "both"}, "--adapt backbone"),
     ({"reduction_factor": 0}, "reduction_factor"), ({"non_linearity": "tanh"}, "swish")],
)
def test_bad_configs_fail_at_construction(settings, message):
    with pytest.raises(ValueError, match=message):
        DiffusionStepConfig(**settings)


def test_an_unknown_site_is_refused_against_the_model_sites():
    with pytest.raises(ValueError, match="unknown adapter site.*attn, ffn"):
        get_adapted_model(model(), DiffusionStepConfig(sites=("mlp",)))
