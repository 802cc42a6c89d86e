"""DimeRec (--backbone dimerec): the geodesic random walk on the unit sphere, the interests,
the three-term loss, seeded sampling, adapters, a checkpoint round trip and a short run."""

import json
import math

import pytest
import torch

from peftrec.adapters import (
    DiffusionStepConfig,
    HoulsbyConfig,
    LoRAConfig,
    PrefixConfig,
    get_adapted_model,
)
from peftrec.pretraining.cli import CommandLineError, model_config, parse_args, pretrain_parser
from peftrec.pretraining.dimerec import (
    DimeRec,
    DimeRecConfig,
    exponential_map,
    geodesic_random_walk,
)
from peftrec.pretraining.recommender import RecommenderConfig, SequentialRecommender
from tests.helpers import perturb_adapters, run_pretrain

TINY = {"hidden_size": 8, "num_layers": 1, "num_heads": 2, "ffn_size": 16, "max_len": 6,
        "dropout": 0.0, "num_steps": 5, "inference_steps": 5, "num_seeds": 2,
        "num_interests": 3}
NUM_ITEMS = 11
BATCH = {"input_ids": torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]]),
         "target_ids": torch.tensor([[0, 0, 4, 5, 6], [2, 3, 4, 5, 9]])}


def backbone(**overrides) -> DimeRec:
    torch.manual_seed(0)
    return DimeRec(DimeRecConfig(**{**TINY, **overrides})).eval()


def histories() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded histories [2, 5, d] and their masks (True at real items)."""
    torch.manual_seed(1)
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    return torch.randn(2, 5, TINY["hidden_size"]) * mask[..., None], mask


def unit_vectors(*shape: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(*shape), dim=-1)


def test_the_exponential_map_keeps_norms():
    torch.manual_seed(0)
    points = unit_vectors(64, 16)
    noise = torch.randn(64, 16) * 3
    tangents = noise - (noise * points).sum(-1, keepdim=True) * points  # v . x = 0
    moved = exponential_map(points, tangents)
    torch.testing.assert_close(moved.norm(dim=-1), torch.ones(64), rtol=0, atol=1e-5)
    # Along the geodesic, the angle travelled is |v| (mod 2 pi): the first quarter turn.
    short = tangents / tangents.norm(dim=-1, keepdim=True) * 0.7
    cosine = (exponential_map(points, short) * points).sum(-1)
    torch.testing.assert_close(cosine, torch.full((64,), math.cos(0.7)))


def test_a_zero_noise_walk_is_the_identity_and_norms_stay_one_at_every_step():
    torch.manual_seed(0)
    points, noise = unit_vectors(32, 16), torch.randn(32, 16)
    angles = torch.rand(32) * 3
    torch.testing.assert_close(geodesic_random_walk(points, torch.zeros(32, 16), angles), points,
                               rtol=0, atol=0)
    torch.testing.assert_close(geodesic_random_walk(points, noise, torch.zeros(32)), points,
                               rtol=0, atol=0)
    model = backbone(num_steps=1000)
    targets = unit_vectors(1000, TINY["hidden_size"])
    steps = torch.arange(1, 1001)
    walked = model.walk(targets, torch.randn_like(targets), steps)
    torch.testing.assert_close(walked.norm(dim=-1), torch.ones(1000), rtol=0, atol=1e-5)
    # Further from the target with the step; the last is about a quarter turn away.
    cosine = (walked * targets).sum(-1)
    assert cosine[:100].mean() > cosine[450:550].mean() > cosine[-100:].mean()
    last = model.walk(targets, torch.randn_like(targets), torch.full((1000,), 1000))
    assert abs((last * targets).sum(-1).mean()) < 0.1


def test_interests_are_k_unit_vectors_that_ignore_padding():
    model, (items, mask) = backbone(), histories()
    interests = model.interests(items, mask)
    assert interests.shape == (2, TINY["num_interests"], TINY["hidden_size"])
    torch.testing.assert_close(interests.norm(dim=-1), torch.ones(2, TINY["num_interests"]))
    padded = items.clone()
    padded[0, :2] = torch.randn(2, TINY["hidden_size"])  # whatever sits at padding
    torch.testing.assert_close(model.interests(padded, mask), interests)
    assert not torch.allclose(interests[:, 0], interests[:, 1])  # K different interests


def test_training_reads_the_interest_nearest_the_target_and_predicts_a_unit_vector():
    model, (items, mask) = backbone().train(), histories()
    targets = torch.randn(2, TINY["hidden_size"])
    losses = model.training_losses(items, mask, targets)
    interests = model.interests(items, mask)
    cosines = (interests * torch.nn.functional.normalize(targets, dim=-1)[:, None]).sum(-1)
    torch.testing.assert_close(losses["interest"], interests[torch.arange(2), cosines.argmax(1)])
    assert losses["predicted"].shape == (2, TINY["hidden_size"])
    torch.testing.assert_close(losses["predicted"].norm(dim=-1), torch.ones(2))
    assert losses["mse"].dim() == 0 and 0 <= losses["mse"] <= 4  # squared chord of unit vectors


def test_seeded_sampling():
    model, (items, mask) = backbone(), histories()
    samples = model.sample_predictions(items, mask)
    assert samples.shape == (2, TINY["num_seeds"], TINY["hidden_size"])
    torch.testing.assert_close(samples.norm(dim=-1), torch.ones(2, TINY["num_seeds"]))
    torch.testing.assert_close(model.sample_predictions(items, mask), samples)
    # A user's samples do not depend on the rest of the batch; another seed changes them.
    torch.testing.assert_close(model.sample_predictions(items[1:], mask[1:]), samples[1:])
    model.config.inference_seed = 1
    assert not torch.allclose(model.sample_predictions(items, mask), samples)


@pytest.mark.parametrize("settings", [{"num_steps": 1}, {"schedule": "nope"},
                                      {"num_interests": 0}, {"temperature": 0.0},
                                      {"denoised_softmax_weight": -1.0}, {"num_seeds": 0},
                                      {"inference_steps": 6}])
def test_bad_settings_are_named(settings):
    with pytest.raises(ValueError, match="num_steps|schedule|interests|temperature|weight|"
                       "seeds|inference-steps"):
        DimeRecConfig(**{**TINY, **settings})


def recommender(**settings) -> SequentialRecommender:
    torch.manual_seed(0)
    return SequentialRecommender(RecommenderConfig(num_items=NUM_ITEMS, backbone="dimerec",
                                                   backbone_config=TINY, **settings))


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_the_loss_is_guidance_plus_weighted_mse_plus_weighted_denoised_softmax(loss):
    model = recommender(loss=loss, num_negatives=5)
    model.backbone.config.mse_weight, model.backbone.config.denoised_softmax_weight = 2.0, 0.5
    losses = model.train().loss(BATCH)
    assert set(losses["terms"]) == {"gem", "mse", "ssm"}
    torch.testing.assert_close(losses["loss"], losses["gem"] + 2 * losses["mse"] + losses["ssm"])
    torch.testing.assert_close(losses["terms"]["mse"], 2 * losses["mse"])


def test_items_are_ranked_by_cosine_with_the_mean_generated_direction_over_temperature():
    model = recommender(repeat_bias=True).eval()
    with torch.no_grad():
        model.repeat_bias.fill_(-1.0)
    inputs = {"input_ids": BATCH["input_ids"]}
    samples = model.backbone.sample_predictions(model.item_encoder(inputs["input_ids"]),
                                                inputs["input_ids"] > 0)
    normalize = torch.nn.functional.normalize
    items = normalize(model.item_encoder.catalog(), dim=-1)
    expected = normalize(samples.mean(1), dim=-1) @ items.T / model.backbone.config.temperature
    seen = torch.zeros_like(expected, dtype=torch.bool).scatter_(1, inputs["input_ids"], True)
    torch.testing.assert_close(model.scores(inputs)[:, 1:], (expected - seen.float())[:, 1:])


@pytest.mark.parametrize("config", [HoulsbyConfig(), LoRAConfig(), PrefixConfig(),
                                    DiffusionStepConfig(reduction_factor=4)],
                         ids=["houlsby", "lora", "prefix", "diffusion_step"])
def test_adapters_in_the_denoiser_start_as_the_identity_and_then_act(config):
    model = recommender().eval()
    inputs = {"input_ids": BATCH["input_ids"]}
    scores = model.scores(inputs)
    get_adapted_model(model, config)
    torch.testing.assert_close(model.scores(inputs), scores)
    perturb_adapters(model, 0.3)
    assert not torch.allclose(model.scores(inputs), scores)


def test_a_saved_model_loads_back_and_scores_alike(tmp_path):
    model = recommender().eval()
    inputs = {"input_ids": BATCH["input_ids"]}
    model.save_pretrained(tmp_path / "model")
    loaded = SequentialRecommender.from_pretrained(tmp_path / "model").eval()
    assert loaded.backbone.config == model.backbone.config
    torch.testing.assert_close(loaded.scores(inputs), model.scores(inputs))


def test_flags_set_dimerec_and_other_backbones_refuse_them():
    args = parse_args(pretrain_parser("t"), [
        "--backbone", "dimerec", "--num-interests", "2", "--temperature", "0.05",
        "--denoised-softmax-weight", "0.5", "--mse-weight", "3", "--diffusion-steps", "50",
        "--inference-steps", "10", "--num-seeds", "3"])
    config = model_config(args, NUM_ITEMS, "data").backbone_settings()
    assert (config.num_interests, config.temperature, config.denoised_softmax_weight,
            config.mse_weight, config.num_steps, config.inference_steps,
            config.num_seeds) == (2, 0.05, 0.5, 3.0, 50, 10, 3)
    with pytest.raises(CommandLineError, match="^--num-interests: DimeRec settings, which do "
                       "nothing with --backbone diffrec"):
        parse_args(pretrain_parser("t"), ["--backbone", "diffrec", "--num-interests", "2"])
    with pytest.raises(CommandLineError, match="^--untied-output: DiffRec settings"):
        parse_args(pretrain_parser("t"), ["--backbone", "dimerec", "--untied-output"])


def test_the_loss_falls_on_a_short_run_and_the_checkpoint_scores_alike(tiny_dataset_dir,
                                                                       tmp_path):
    run = tmp_path / "run"
    metrics = run_pretrain(tiny_dataset_dir, run, "--backbone", "dimerec", "--preset", "none",
                           "--max-len", "10",
                           "--num-layers", "1", "--dropout", "0.0", "--lr", "1e-2",
                           "--diffusion-steps", "20", "--inference-steps", "4",
                           "--num-seeds", "2", "--batch-size", "16", "--epochs", "3")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert metrics["test"]["ndcg@10"] > 0
    model = SequentialRecommender.from_pretrained(run / "best_model").eval()
    assert model.config.backbone == "dimerec" and model.backbone.config.num_steps == 20
    batch = {"input_ids": torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])}
    torch.testing.assert_close(model.scores(batch), model.scores(batch))
