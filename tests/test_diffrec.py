"""DiffRec: noise schedules, the importance sampler, seeded inference, scoring, training."""

import json
import math

import pytest
import torch
from safetensors.torch import load_model

from peftrec.pretraining.cli import parse_args, pretrain_parser
from peftrec.pretraining.diffrec import DiffRec, DiffRecConfig, ImportanceStepSampler
from peftrec.pretraining.evaluation import chunked_target_ranks, target_ranks
from peftrec.pretraining.pipeline import pretrain
from peftrec.pretraining.recommender import RecommenderConfig, SequentialRecommender
from peftrec.pretraining.schedules import (
    SCHEDULES,
    CosineSchedule,
    LinearSchedule,
    NoiseSchedule,
    SqrtSchedule,
    TruncatedLinearSchedule,
    build_schedule,
)
from tests.helpers import DIFFREC_NUM_ITEMS, DIFFREC_TINY

TINY = DIFFREC_TINY
NUM_ITEMS = DIFFREC_NUM_ITEMS


def model(**overrides) -> SequentialRecommender:
    torch.manual_seed(0)
    config = RecommenderConfig(num_items=NUM_ITEMS, backbone="diffrec",
                               backbone_config={**TINY, **overrides})
    recommender = SequentialRecommender(config).eval()
    with torch.no_grad():  # a non-trivial bias, so it is part of what is checked
        recommender.item_bias.normal_()
    return recommender


def batch() -> dict:
    return {"input_ids": torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5], [0, 0, 0, 0, 7]]),
            "target_ids": torch.tensor([6, 9, 8])}


# -- schedules ----------------------------------------------------------------------------
def expected_abar(name: str, n: int) -> torch.Tensor:
    """abar_1..abar_N from each schedule's definition, with betas clipped at 0.999."""
    t = torch.arange(n + 1, dtype=torch.float64) / n
    if name == "linear":
        return torch.cumprod(1 - torch.linspace(1e-4, 0.02, n, dtype=torch.float64), 0)
    if name == "truncated-linear":
        stretch = 1000 / n
        betas = torch.linspace(1e-4 * stretch + 0.01, 0.02 * stretch + 0.01, n,
                               dtype=torch.float64)
        return torch.cumprod(1 - betas, 0)
    if name == "sqrt":
        f = 1 - torch.sqrt(t + 1e-4)
    else:
        f = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_matches_its_formula_and_decreases_in_the_unit_interval(name):
    schedule = build_schedule(name, 1000)
    abar = schedule.alphas_cumprod.double()
    assert len(abar) == 1000
    torch.testing.assert_close(abar, expected_abar(name, 1000), rtol=1e-5, atol=1e-7)
    assert (abar > 0).all() and (abar < 1).all()
    assert (abar[1:] < abar[:-1]).all()


def test_sqrt_schedule_is_one_minus_sqrt_of_t_until_clipped():
    abar = SqrtSchedule(1000).alphas_cumprod.double()
    n = torch.arange(1, 1000, dtype=torch.float64)
    # Relative to abar_0 = 1: abar_n = f(n/N) / f(0), f(t) = 1 - sqrt(t + 1e-4).
    torch.testing.assert_close(abar[:-1], (1 - torch.sqrt(n / 1000 + 1e-4)) / 0.99,
                               rtol=1e-5, atol=1e-7)
    assert 0 < abar[-1] < 1e-4  # f(1) < 0: the last beta is clipped at 0.999


def test_linear_and_cosine_endpoints():
    assert LinearSchedule(1000).betas[0].item() == pytest.approx(1e-4)
    assert LinearSchedule(1000).betas[-1].item() == pytest.approx(0.02)
    assert CosineSchedule(1000).betas.max().item() == pytest.approx(0.999)


def test_truncated_linear_keeps_a_short_process_ending_in_noise():
    # DiffuRec's and ADRec's 32 steps: betas from 1e-4 * 1000/32 + 0.01 to 0.02 * 1000/32 + 0.01.
    short = TruncatedLinearSchedule(32)
    assert short.betas[0].item() == pytest.approx(0.013125)
    assert short.betas[-1].item() == pytest.approx(0.635)
    assert short.alphas_cumprod[-1].item() < 1e-5  # the plain linear range: 0.72
    assert LinearSchedule(32).alphas_cumprod[-1].item() > 0.7
    # Below 21 steps the end 0.02 * 1000/N + 0.01 would pass 1: 0.001 * 1000/N + 0.01 instead.
    assert TruncatedLinearSchedule(10).betas[-1].item() == pytest.approx(0.11)


def test_schedule_errors_and_config_round_trip():
    with pytest.raises(ValueError, match="cosine"):
        build_schedule("quadratic")
    with pytest.raises(ValueError, match="num_steps"):
        SqrtSchedule(1)
    with pytest.raises(ValueError, match="diffusion-steps"):
        DiffRecConfig(num_steps=1)
    with pytest.raises(ValueError, match="memory"):
        DiffRecConfig(num_seeds=257)
    for name in SCHEDULES:
        schedule = build_schedule(name, 37)
        rebuilt = NoiseSchedule.from_config(schedule.to_config())
        assert type(rebuilt) is type(schedule) and rebuilt.num_steps == 37
        torch.testing.assert_close(rebuilt.alphas_cumprod, schedule.alphas_cumprod)


def test_add_noise_has_the_stated_mean_and_variance():
    schedule = SqrtSchedule(1000)
    generator = torch.Generator().manual_seed(0)
    samples, n = 20_000, 300
    x0 = torch.tensor([1.5, -2.0, 0.0])
    noise = torch.randn(samples, 3, generator=generator, dtype=torch.float64)
    steps = torch.full((samples,), n)
    x = schedule.add_noise(x0.double().expand(samples, 3), noise, steps)
    abar = schedule.alphas_cumprod[n - 1].double()
    variance = 1 - abar
    standard_error = (variance / samples).sqrt()
    assert ((x.mean(0) - abar.sqrt() * x0) .abs() < 4 * standard_error).all()
    # The sample variance's standard error is about variance * sqrt(2 / samples).
    assert ((x.var(0) - variance).abs() < 4 * variance * math.sqrt(2 / samples)).all()


def test_strided_timesteps_and_the_last_step_returns_the_prediction():
    schedule = LinearSchedule(100)
    steps = schedule.set_timesteps(10)
    assert steps[0] == 100 and steps[-1] == 1 and (steps[1:] < steps[:-1]).all()
    x0, xn = torch.ones(2, 4), torch.zeros(2, 4)
    assert torch.equal(schedule.step(x0, 1, xn), x0)
    # Deterministic given the noise; the posterior mean lies between x0 and x_n.
    out = schedule.step(x0, 100, xn, noise=torch.zeros(2, 4))
    assert ((out > 0) & (out < 1)).all()
    with pytest.raises(ValueError, match="inference steps"):
        schedule.set_timesteps(101)


# -- the denoiser ------------------------------------------------------------------------
def test_only_the_noised_positions_change():
    for k in (1, 2):
        backbone = DiffRec(DiffRecConfig(**{**TINY, "noised_positions": k})).eval()
        sequence, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)
        steps = torch.tensor([3, 17])
        noised = backbone.noise_sequence(sequence, mask, steps, torch.randn(2, k, 8))
        assert torch.equal(noised[:, :-k], sequence[:, :-k])
        assert (noised[:, -k:] != sequence[:, -k:]).all()
        # The denoiser's inputs: the step embedding only reaches the noised positions.
        a = backbone.embed(noised, mask, backbone.step_embedding(steps), 1, k)
        b = backbone.embed(noised, mask, backbone.step_embedding(torch.tensor([9, 1])), 1, k)
        assert torch.equal(a[:, :-k], b[:, :-k]) and not torch.equal(a[:, -k:], b[:, -k:])


def test_importance_sampler_is_uniform_then_follows_root_mean_square():
    sampler = ImportanceStepSampler(num_steps=4, history_size=3)
    torch.testing.assert_close(sampler.probabilities(), torch.full((4,), 0.25))
    losses = {1: [1.0, 2.0, 3.0, 9.0], 2: [2.0, 2.0, 2.0], 3: [0.5, 1.0, 1.5], 4: [4.0, 1.0]}
    for step, values in losses.items():
        sampler.update(torch.full((len(values),), step), torch.tensor(values))
    # Step 4 has two losses only: still uniform.
    torch.testing.assert_close(sampler.probabilities(), torch.full((4,), 0.25))
    steps, weights = sampler.sample(8)
    torch.testing.assert_close(weights, torch.ones(8))
    sampler.update(torch.tensor([4]), torch.tensor([2.0]))
    kept = {1: [2.0, 3.0, 9.0], 2: [2.0, 2.0, 2.0], 3: [0.5, 1.0, 1.5], 4: [4.0, 1.0, 2.0]}
    rms = torch.tensor([math.sqrt(sum(v * v for v in kept[s]) / 3) for s in range(1, 5)])
    probs = sampler.probabilities()
    torch.testing.assert_close(probs, rms / rms.sum())
    assert probs.sum().item() == pytest.approx(1.0)
    steps, weights = sampler.sample(1000, torch.Generator().manual_seed(0))
    assert steps.min() >= 1 and steps.max() <= 4
    torch.testing.assert_close(weights, 1 / (4 * probs[steps - 1]))
    # The state is a buffer: it is saved and restored with the model.
    restored = ImportanceStepSampler(4, 3)
    restored.load_state_dict(sampler.state_dict())
    torch.testing.assert_close(restored.probabilities(), probs)


def test_sampler_update_with_repeated_steps_in_one_batch():
    sampler = ImportanceStepSampler(num_steps=2, history_size=2)
    sampler.update(torch.tensor([1, 2, 1, 1]), torch.tensor([1.0, 5.0, 2.0, 3.0]))
    assert sorted(sampler.history[0].tolist()) == [2.0, 3.0]  # the last two of step 1
    assert sampler.counts.tolist() == [3, 1]


# -- inference and scoring ----------------------------------------------------------------
@pytest.mark.parametrize("inference", ["one_step", "strided", "reverse"])
def test_fixed_seeds_give_identical_recommendations(inference):
    recommender = model(inference=inference, inference_steps=5)
    first, second = recommender.query(batch()), recommender.query(batch())
    assert torch.equal(first.predicted, second.predicted)
    assert torch.equal(recommender.scores(batch()), recommender.scores(batch()))
    # Different seeds, different samples; another base seed, other samples.
    assert not torch.allclose(first.predicted[:, 0], first.predicted[:, 1])
    other = model(inference=inference, inference_steps=5, inference_seed=5).query(batch())
    assert not torch.allclose(other.predicted, first.predicted)
    # A user's recommendations do not depend on the rest of the batch.
    alone = recommender.query({"input_ids": batch()["input_ids"][1:2]})
    torch.testing.assert_close(alone.predicted[0], first.predicted[1])


def test_set_inference_scores_as_a_model_built_with_those_settings():
    """Other inference settings on trained weights: the same scores as a model configured
    with them from the start; bad settings are refused and leave the model as it was."""
    for settings in ({"num_seeds": 5}, {"inference": "strided", "inference_steps": 4},
                     {"inference": "reverse", "num_seeds": 1}):
        switched = model()
        switched.set_inference(**settings)
        assert switched.backbone.config == model(**settings).backbone.config
        assert torch.equal(switched.scores(batch()), model(**settings).scores(batch()))
        assert not torch.equal(switched.scores(batch()), model().scores(batch()))
    recommender = model()
    with pytest.raises(ValueError, match="--num-seeds must be in 1..256"):
        recommender.set_inference(num_seeds=10_000)
    with pytest.raises(ValueError, match=r"\['hidden_size'\] are not inference settings"):
        recommender.set_inference(hidden_size=4)
    assert recommender.config == model().config and recommender.backbone.config.num_seeds == 3
    sasrec = SequentialRecommender(RecommenderConfig(num_items=NUM_ITEMS, backbone_config={
        k: TINY[k] for k in ("hidden_size", "num_layers", "num_heads", "ffn_size", "max_len")}))
    with pytest.raises(ValueError, match="DiffRec or DiffuRec or ADRec or DimeRec's; this "
                       "model's backbone is sasrec"):
        sasrec.set_inference(num_seeds=2)


def test_seed_average_equals_the_mean_of_single_seed_softmaxes():
    recommender = model(num_seeds=4)
    query = recommender.query(batch())
    items = torch.arange(1, NUM_ITEMS + 1)
    catalog = recommender.item_encoder.catalog()
    singles = [torch.softmax(query.predicted[:, s] @ catalog[items].T
                             + recommender.item_bias[items], dim=-1) for s in range(4)]
    expected = torch.stack(singles).mean(0)
    torch.testing.assert_close(recommender.score_items(query, items).exp(), expected)
    assert recommender.score_items(query, items).exp().sum(1).sub(1).abs().max() < 1e-5
    # One seed = that seed's softmax; the normaliser covers the whole catalog.
    one = model(num_seeds=1)
    query = one.query(batch())
    torch.testing.assert_close(
        one.score_items(query, items[:3]).exp(),
        torch.softmax(query.predicted[:, 0] @ catalog[items].T + one.item_bias[items], -1)[:, :3],
    )


def losses(recommender: SequentialRecommender) -> dict:
    """Training losses on a fixed two-window batch with the same steps and noise each call
    (items 6 and 9 are targets only, never inputs)."""
    torch.manual_seed(0)
    return recommender.train().loss({
        "input_ids": torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]]),
        "target_ids": torch.tensor([[0, 0, 4, 5, 6], [2, 3, 4, 5, 9]])})


@pytest.mark.parametrize("layout", [{}, {"causal_denoiser": True, "every_position": True}],
                         ids=["last", "every-position"])
def test_logit_scale_sharpens_the_softmax_and_leaves_the_mse_alone(layout):
    """softmax(s h0 E^T + b): s = 1 at start (the plain model); with s = 3 the training
    cross-entropy and the seed-averaged scores use 3 h0 while the MSE still reads h0."""
    plain, scaled = model(**layout), model(**layout, logit_scale=True)
    scaled.load_state_dict(plain.state_dict(), strict=False)
    items = torch.arange(1, NUM_ITEMS + 1)
    torch.testing.assert_close(scaled.eval().scores(batch()), plain.eval().scores(batch()))
    torch.testing.assert_close(losses(scaled)["loss"], losses(plain)["loss"])
    with torch.no_grad():
        scaled.backbone.log_logit_scale.fill_(math.log(3.0))
    assert torch.isclose(losses(scaled)["mse"], losses(plain)["mse"])
    assert not torch.isclose(losses(scaled)["ce"], losses(plain)["ce"])
    losses(scaled)["loss"].backward()
    assert scaled.backbone.log_logit_scale.grad.abs() > 0  # it is learned
    query, reference = scaled.eval().query(batch()), plain.eval().query(batch())
    torch.testing.assert_close(query.predicted, 3 * reference.predicted)
    catalog = plain.item_encoder.catalog()
    expected = torch.stack([torch.softmax(3 * reference.predicted[:, s] @ catalog[items].T
                                          + plain.item_bias[items], -1)
                            for s in range(TINY["num_seeds"])]).mean(0)
    torch.testing.assert_close(scaled.score_items(query, items).exp(), expected)


@pytest.mark.parametrize("layout", [{}, {"causal_denoiser": True, "every_position": True}],
                         ids=["last", "every-position"])
def test_summed_mse_is_the_squared_norm_d_times_the_mean(layout):
    """mse_reduction="sum" (the paper's ||h0 - f||^2) = d x the mean over dimensions, on the
    same weights, steps and noise; the cross-entropy does not change."""
    mean, summed = model(**layout), model(**layout, mse_reduction="sum")
    mean_losses, summed_losses = losses(mean), losses(summed)
    torch.testing.assert_close(summed_losses["mse"], TINY["hidden_size"] * mean_losses["mse"])
    torch.testing.assert_close(summed_losses["ce"], mean_losses["ce"])
    with pytest.raises(ValueError, match="unknown --mse-reduction 'max'"):
        model(mse_reduction="max")


def test_chunked_evaluation_matches_ranking_all_scores():
    recommender = model()
    targets = batch()["target_ids"]
    expected = target_ranks(recommender.scores(batch()), targets)
    query = recommender.query(batch())
    for chunk in (3, 7, NUM_ITEMS):
        assert torch.equal(chunked_target_ranks(recommender, query, targets, chunk), expected)


@pytest.mark.parametrize("inference", ["one_step", "strided"])
@pytest.mark.parametrize("noised", [1, 2])
def test_causal_denoiser_reuses_the_history(inference, noised):
    recommender = model(causal_denoiser=True, inference=inference, inference_steps=4,
                        noised_positions=noised)
    catalog = recommender.item_encoder.catalog()
    input_ids = batch()["input_ids"]
    backbone = recommender.backbone
    once = backbone.sample_predictions(catalog[input_ids], input_ids > 0, reuse_history=True)
    per_seed = backbone.sample_predictions(catalog[input_ids], input_ids > 0,
                                           reuse_history=False)
    torch.testing.assert_close(once, per_seed, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="causal"):
        model().backbone.sample_predictions(catalog[input_ids], input_ids > 0, True)


# -- every position -------------------------------------------------------------------------
def test_every_position_needs_the_causal_denoiser_and_one_noised_position():
    for settings in ({}, {"causal_denoiser": True, "noised_positions": 2}):
        with pytest.raises(ValueError, match="--every-position needs --causal-denoiser"):
            DiffRecConfig(**TINY, every_position=True, **settings)


def test_every_position_denoises_each_target_from_the_inputs_up_to_it():
    """Each noised target sees the clean inputs up to its position and itself, nothing else:
    the last one is exactly the single-target causal denoiser, and no prediction moves
    when a later input or another target's noise changes."""
    backbone = model(causal_denoiser=True, every_position=True).backbone
    torch.manual_seed(1)
    inputs, noised = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])
    steps = torch.tensor([[5, 9, 13, 20], [1, 2, 3, 4]])
    predicted = backbone.denoise_every_position(inputs, mask, noised, steps, mask)
    single = backbone(torch.cat([inputs, noised[:, -1:]], dim=1),
                      torch.cat([mask, mask.new_ones(2, 1)], dim=1), steps[:, -1])
    torch.testing.assert_close(predicted[:, -1], single)
    for t in range(3):
        later_inputs, other_noise = inputs.clone(), noised.clone()
        later_inputs[:, t + 1:] += torch.randn_like(later_inputs[:, t + 1:])
        other_noise[:, torch.arange(4) != t] = torch.randn(2, 3, 8)
        moved = backbone.denoise_every_position(later_inputs, mask, other_noise, steps, mask)
        torch.testing.assert_close(moved[:, t], predicted[:, t])
        assert not torch.allclose(moved[:, t + 1:], predicted[:, t + 1:])


def test_every_position_trains_on_each_target_with_its_own_step():
    recommender = model(causal_denoiser=True, every_position=True).train()
    sampler = recommender.backbone.step_sampler
    batch = {"input_ids": torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]]),
             "target_ids": torch.tensor([[0, 0, 4, 5, 6], [2, 3, 4, 5, 9]])}
    losses = recommender.loss(batch)
    assert torch.isfinite(losses["loss"])
    assert sampler.counts.sum() == 8  # 3 + 5 targets, one step each (max_len 6: all fit)
    # Inputs as long as max_len lose their first position, as the inference sequence does.
    long = {key: torch.tensor([[1, 2, 3, 4, 5, 6]]) + (key == "target_ids")
            for key in ("input_ids", "target_ids")}
    recommender.loss(long)
    assert sampler.counts.sum() == 8 + 5


@pytest.mark.parametrize("layout", [{}, {"causal_denoiser": True, "every_position": True}],
                         ids=["last", "every-position"])
def test_an_untied_output_table_scores_while_the_item_table_feeds_the_denoiser(layout):
    """`untied_output`: softmax(h0 W^T + b) with W a copy of the items at start (the plain
    model exactly); then scores and the cross-entropy follow W, the denoiser's inputs and
    the MSE the item table, and the softmax's gradient reaches W, not the item table."""
    plain, untied = model(**layout), model(**layout, untied_output=True)
    untied.load_state_dict(plain.state_dict(), strict=False)
    untied.copy_items_to_output()
    items = torch.arange(1, NUM_ITEMS + 1)
    torch.testing.assert_close(untied.eval().scores(batch()), plain.eval().scores(batch()))
    torch.testing.assert_close(losses(untied)["loss"], losses(plain)["loss"])
    assert "output_items" in untied.catalog_parameter_names()
    with torch.no_grad():
        untied.output_items.normal_()
    assert torch.isclose(losses(untied)["mse"], losses(plain)["mse"])
    assert not torch.isclose(losses(untied)["ce"], losses(plain)["ce"])
    # Loss = CE alone, the noised copies detached: the targets' rows (6 and 9 are never
    # inputs) then reach the CE only through the output table, which an untied model owns.
    for untie in (False, True):
        ce_only = model(**layout, untied_output=untie, mse_weight=0.0, detach_noised_items=True)
        ce_only.load_state_dict(untied.state_dict(), strict=False)
        table = ce_only.item_encoder.embedding.weight
        (gradient,) = torch.autograd.grad(losses(ce_only)["loss"], [table])
        assert (gradient[[6, 9]].abs().sum() == 0) == untie
    (gradient,) = torch.autograd.grad(losses(ce_only)["loss"], [ce_only.output_items])
    assert gradient[[6, 9]].abs().sum() > 0
    query = untied.eval().query(batch())
    torch.testing.assert_close(query.predicted, plain.eval().query(batch()).predicted)
    expected = torch.stack([torch.softmax(query.predicted[:, s] @ untied.output_items[items].T
                                          + untied.item_bias[items], -1)
                            for s in range(TINY["num_seeds"])]).mean(0)
    torch.testing.assert_close(untied.score_items(query, items).exp(), expected)


@pytest.mark.parametrize("layout", [{"noised_positions": 2}, {"causal_denoiser": True},
                                    {"causal_denoiser": True, "every_position": True}],
                         ids=["last-two", "causal-last", "every-position"])
def test_detached_noised_items_pass_no_gradient_through_the_noised_copy(layout):
    """With `detach_noised_items` the prediction does not depend on the clean targets
    through their noised copies (the MSE target still does); without it, it does."""
    torch.manual_seed(2)
    inputs, targets = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    mask = torch.ones(2, 4, dtype=torch.bool)
    for detach in (False, True):
        backbone = model(**layout, detach_noised_items=detach).backbone.train()
        clean = inputs.clone().requires_grad_()
        target = (targets if layout.get("every_position") else targets[:, -1]).clone()
        target.requires_grad_()
        if layout.get("every_position"):
            losses = backbone.every_position_losses(clean, mask, target, mask)
        else:
            losses = backbone.training_losses(clean, mask, target)
        # A random readout: the sum of a layer-normed vector has no gradient at all.
        readout = (losses["predicted"] * torch.randn_like(losses["predicted"])).sum()
        gradients = torch.autograd.grad(readout, [clean, target], allow_unused=True)
        through_target = gradients[1] is not None and gradients[1].abs().sum() > 0
        assert through_target != detach
        # K = 2 noises the last input too: detached, it reaches the output only as noise.
        last_input_moves = gradients[0][:, -1].abs().sum() > 0
        assert last_input_moves != (detach and layout.get("noised_positions") == 2)
        assert gradients[0][:, :2].abs().sum() > 0  # the clean history always trains


def test_a_diffrec_run_from_before_every_position_resumes(tiny_dataset_dir, tmp_path):

    run = tmp_path / "run"
    argv = ["--dataset", str(tiny_dataset_dir), "--output-dir", str(run), *SMALL]
    pretrain(parse_args(pretrain_parser("test"), [*argv, "--epochs", "1"]))
    config = json.loads((run / "config.json").read_text())
    del config["model"]["backbone_config"]["every_position"]  # as written before it existed
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model settings differ \(\['backbone_config'\]\)"):
        pretrain(parse_args(pretrain_parser("test"), [*argv, "--epochs", "2", "--resume",
                                                      "--causal-denoiser", "--every-position"]))
    pretrain(parse_args(pretrain_parser("test"), [*argv, "--epochs", "2", "--resume"]))
    assert len((run / "log.jsonl").read_text().splitlines()) == 2


# -- training and checkpoints --------------------------------------------------------------
SMALL = ["--backbone", "diffrec", "--preset", "none", "--hidden-size", "16", "--num-heads", "2",
         "--ffn-size", "32", "--max-len", "10", "--num-layers", "1", "--dropout", "0.0",
         "--batch-size", "16", "--eval-batch-size", "64", "--report-to", "none", "--cpu",
         "--diffusion-steps", "50", "--num-seeds", "2", "--patience", "100"]


@pytest.mark.parametrize("targets", [[], ["--causal-denoiser", "--every-position"]],
                         ids=["last", "every-position"])
def test_training_lowers_mse_and_ce_and_the_checkpoint_round_trips(tiny_dataset_dir, tmp_path,
                                                                   targets):
    from peftrec.dataset_tools import load_dataset_folder
    from peftrec.pretraining.data import LeaveOneOutDataset, collate_left_padded

    argv = ["--dataset", str(tiny_dataset_dir), "--output-dir", str(tmp_path / "run"),
            *SMALL, *targets, "--epochs", "1", "--lr", "1e-2"]
    args = parse_args(pretrain_parser("test"), argv)
    assert args.backbone == "diffrec"
    data = load_dataset_folder(tiny_dataset_dir)
    examples = LeaveOneOutDataset(data, "train", 10)
    fixed = collate_left_padded([examples[i] for i in range(min(len(examples), 48))])

    def losses(recommender):
        torch.manual_seed(0)  # the same steps and noise before and after training
        recommender.train()
        with torch.no_grad():
            out = recommender.loss(fixed)
        return out["mse"].item(), out["ce"].item()

    pretrain(args)
    first = SequentialRecommender.from_pretrained(tmp_path / "run" / "best_model")
    args = parse_args(pretrain_parser("test"), [*argv[:-4], "--epochs", "30", "--lr", "1e-2",
                                                "--output-dir", str(tmp_path / "longer")])
    pretrain(args)
    trained = SequentialRecommender.from_pretrained(tmp_path / "longer" / "best_model")
    load_model(trained, str(tmp_path / "longer" / "state" / "model.safetensors"))  # last epoch
    mse_before, ce_before = losses(first)
    mse_after, ce_after = losses(trained)
    assert mse_after < 0.7 * mse_before
    assert ce_after < ce_before - 0.3
    assert trained.backbone.step_sampler.counts.sum() > 0  # the history was saved

    # Save / load: identical scores, the same schedule, the same sampler state.
    trained.eval()
    trained.save_pretrained(tmp_path / "copy")
    loaded = SequentialRecommender.from_pretrained(tmp_path / "copy").eval()
    assert loaded.config == trained.config
    assert type(loaded.backbone.schedule) is type(trained.backbone.schedule)
    torch.testing.assert_close(loaded.backbone.step_sampler.history,
                               trained.backbone.step_sampler.history)
    eval_batch = {"input_ids": fixed["input_ids"][:8]}
    assert torch.equal(loaded.scores(eval_batch), trained.scores(eval_batch))


def test_evaluate_script_takes_other_inference_settings(tiny_dataset_dir, tmp_path):
    from peftrec.pretraining.cli import evaluate_parser
    from peftrec.pretraining.pipeline import evaluate_run

    run = tmp_path / "run"
    trained = pretrain(parse_args(pretrain_parser("test"), [
        "--dataset", str(tiny_dataset_dir), "--output-dir", str(run), *SMALL, "--epochs", "1"]))

    def evaluate(*flags: str) -> dict:
        return evaluate_run(parse_args(evaluate_parser("test"), ["--run", str(run), "--cpu",
                                                                 *flags]))

    assert evaluate()["test"] == trained["test"]  # the run's own settings: 2 seeds
    same = evaluate("--num-seeds", "2", "--output", str(tmp_path / "two.json"))
    assert same["test"] == trained["test"] and same["inference"] == {"num_seeds": 2}
    strided = evaluate("--inference", "strided", "--inference-steps", "5")
    assert strided["inference"] == {"inference": "strided", "inference_steps": 5}
    saved = json.loads((run / "evaluation.json").read_text())
    assert saved["inference"] == strided["inference"] and saved["test"] == strided["test"]
    with pytest.raises(ValueError, match=r"--inference-steps must be in 1..50 .*, got 500"):
        evaluate("--inference", "strided", "--inference-steps", "500")


def test_causal_strided_cosine_variant_trains_and_evaluates(tiny_dataset_dir, tmp_path):
    argv = ["--dataset", str(tiny_dataset_dir), "--output-dir", str(tmp_path / "run"), *SMALL,
            "--epochs", "1", "--causal-denoiser", "--inference", "strided",
            "--inference-steps", "5", "--noised-positions", "2", "--schedule", "cosine"]
    metrics = pretrain(parse_args(pretrain_parser("test"), argv))
    assert 0 <= metrics["test"]["ndcg@10"] <= 1
    loaded = SequentialRecommender.from_pretrained(tmp_path / "run" / "best_model")
    assert loaded.backbone.config.causal_denoiser and loaded.backbone.schedule.name == "cosine"


def test_cli_puts_diffusion_flags_in_the_backbone_config_only_for_diffrec():
    from peftrec.pretraining.cli import model_config

    parser = pretrain_parser("test")
    args = parse_args(parser, ["--backbone", "diffrec", "--preset", "none", "--schedule",
                               "cosine", "--diffusion-steps", "30", "--inference", "strided",
                               "--inference-steps", "5", "--noised-positions", "2",
                               "--causal-denoiser", "--num-seeds", "4",
                               "--detach-noised-items", "--logit-scale", "--untied-output",
                               "--mse-reduction", "sum"])
    config = model_config(args, 10, "x").backbone_settings()
    assert (config.schedule, config.num_steps, config.inference, config.inference_steps,
            config.noised_positions, config.causal_denoiser, config.num_seeds,
            config.detach_noised_items, config.logit_scale, config.untied_output,
            config.mse_reduction) == (
        "cosine", 30, "strided", 5, 2, True, 4, True, True, True, "sum")
    plain = model_config(parse_args(parser, []), 10, "x")
    assert "schedule" not in plain.backbone_config
    with pytest.raises(ValueError, match="full"):
        RecommenderConfig(num_items=5, backbone="diffrec", loss="sampled")


def test_diffrec_flags_on_sasrec_are_an_error_and_the_benchmark_drops_them(tmp_path):
    from peftrec.pretraining.cli import CommandLineError, without_diffusion_flags

    diffusion = ["--untied-output", "--num-seeds", "4", "--schedule=cosine", "--causal-denoiser"]
    with pytest.raises(CommandLineError, match=r"^--schedule, --num-seeds, --causal-denoiser, "
                       r"--untied-output: DiffRec settings, which do nothing with --backbone "
                       r"sasrec; drop them or use --backbone diffrec$"):
        parse_args(pretrain_parser("test"), diffusion)
    config = tmp_path / "run.yaml"  # a config file's DiffRec settings too
    config.write_text("untied-output: true\n")
    with pytest.raises(CommandLineError, match="^--untied-output: DiffRec settings"):
        parse_args(pretrain_parser("test"), ["--config", str(config)])
    assert parse_args(pretrain_parser("test"), ["--backbone", "diffrec", *diffusion]).num_seeds == 4
    mixed = ["--lr", "2e-3", "--untied-output", "--num-seeds", "4", "--repeat-bias",
             "--schedule=cosine", "--max-len", "50", "--noised-positions", "2"]
    assert without_diffusion_flags(mixed) == ["--lr", "2e-3", "--repeat-bias", "--max-len", "50"]
