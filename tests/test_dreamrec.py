"""DreamRec (--backbone dreamrec): classifier-free guidance, shapes, seeded sampling, its
flags, and a short training run on the fixture."""

import json

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
from peftrec.pretraining.dreamrec import DreamRec, DreamRecConfig
from peftrec.pretraining.recommender import RecommenderConfig, SequentialRecommender
from tests.helpers import perturb_adapters, run_pretrain

TINY = {"hidden_size": 8, "num_layers": 1, "num_heads": 2, "ffn_size": 16, "max_len": 6,
        "dropout": 0.0, "num_steps": 5}
NUM_ITEMS = 11


def backbone(**overrides) -> DreamRec:
    torch.manual_seed(0)
    return DreamRec(DreamRecConfig(**{**TINY, **overrides})).eval()


def histories() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded histories [2, 5, d] and their masks (True at real items)."""
    torch.manual_seed(1)
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    return torch.randn(2, 5, TINY["hidden_size"]) * mask[..., None], mask


def test_the_guided_output_is_one_plus_w_conditional_minus_w_unconditional():
    model, (items, mask) = backbone(guidance_weight=1.5), histories()
    noised, steps = torch.randn(2, TINY["hidden_size"]), torch.tensor([1, 4])
    condition = model.condition(items, mask)
    conditional = model.denoise(noised, condition, steps)
    unconditional = model.denoise(noised, model.null_history.expand(2, -1), steps)
    torch.testing.assert_close(model.guided_prediction(noised, condition, steps),
                               2.5 * conditional - 1.5 * unconditional)
    assert not torch.allclose(conditional, unconditional)  # the history matters
    # w = 0: the conditional prediction alone.
    model.config.guidance_weight = 0.0
    torch.testing.assert_close(model.guided_prediction(noised, condition, steps), conditional)


def test_training_replaces_the_history_by_the_null_vector_with_probability_p():
    (items, mask), targets = histories(), torch.randn(2, TINY["hidden_size"])
    model = backbone(null_history_probability=0.999).train()

    def replayed(condition: torch.Tensor) -> torch.Tensor:
        """The prediction from `condition` with training's draws: nulling, steps, noise."""
        torch.manual_seed(2)
        torch.rand(2)
        steps = torch.randint(1, TINY["num_steps"] + 1, (2,))
        noised = model.schedule.add_noise(targets, torch.randn_like(targets), steps)
        return model.denoise(noised, condition, steps)

    torch.manual_seed(2)
    nulled = model.training_losses(items, mask, targets)["predicted"]
    torch.testing.assert_close(nulled, replayed(model.null_history.expand(2, -1)))
    model.config.null_history_probability = 0.0
    torch.manual_seed(2)
    kept = model.training_losses(items, mask, targets)["predicted"]
    torch.testing.assert_close(kept, replayed(model.condition(items, mask)))


def test_shapes_and_seeded_sampling():
    model, (items, mask) = backbone(), histories()
    model.train()
    losses = model.training_losses(items, mask, torch.randn(2, TINY["hidden_size"]))
    assert losses["mse"].dim() == 0 and losses["predicted"].shape == (2, TINY["hidden_size"])
    model.eval()
    generated = model.sample_predictions(items, mask)
    assert generated.shape == (2, TINY["hidden_size"])
    torch.testing.assert_close(model.sample_predictions(items, mask), generated)
    # A user's vector does not depend on the rest of the batch; another seed changes it.
    torch.testing.assert_close(model.sample_predictions(items[1:], mask[1:]), generated[1:])
    model.config.inference_seed = 1
    assert not torch.allclose(model.sample_predictions(items, mask), generated)


@pytest.mark.parametrize("settings", [{"num_steps": 1}, {"schedule": "nope"},
                                      {"guidance_weight": -1.0},
                                      {"null_history_probability": 1.0}])
def test_bad_settings_are_named(settings):
    with pytest.raises(ValueError, match="num_steps|schedule|guidance|null-history"):
        DreamRecConfig(**settings)


def recommender() -> SequentialRecommender:
    torch.manual_seed(0)
    return SequentialRecommender(RecommenderConfig(num_items=NUM_ITEMS, backbone="dreamrec",
                                                   backbone_config=TINY))


def test_the_recommender_trains_on_the_mse_alone_and_ranks_by_the_generated_vector():
    model = recommender()
    batch = {"input_ids": torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]]),
             "target_ids": torch.tensor([[0, 0, 4, 5, 6], [2, 3, 4, 5, 9]])}
    losses = model.train().loss(batch)
    assert set(losses) == {"loss", "mse"}
    model.eval()
    inputs = {"input_ids": batch["input_ids"]}
    generated = model.backbone.sample_predictions(model.item_encoder(inputs["input_ids"]),
                                                  inputs["input_ids"] > 0)
    torch.testing.assert_close(model.scores(inputs),
                               generated @ model.item_encoder.catalog().T)


# (adapter, where its trainable parameters live: the history encoder's or the denoiser's)
ADAPTER_CASES = {
    "houlsby": (HoulsbyConfig(), None),
    "lora": (LoRAConfig(), None),
    "prefix": (PrefixConfig(), None),
    "diffusion-step bottleneck": (DiffusionStepConfig(sites=("ffn",)),
                                  ("backbone.denoiser.", "backbone.step_mlp.")),
    "diffusion-step step-mlp-only": (DiffusionStepConfig(step_mlp_only=True),
                                     ("backbone.denoiser.", "backbone.step_mlp.")),
}


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_adapters_start_as_the_identity_and_then_act(case):
    """Houlsby, LoRA and prefix in the history encoder; the diffusion-step adapters in the
    MLP denoiser (and only there)."""
    config, trainable_prefixes = ADAPTER_CASES[case]
    model = recommender().eval()
    inputs = {"input_ids": torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])}
    scores = model.scores(inputs)
    get_adapted_model(model, config)
    torch.testing.assert_close(model.scores(inputs), scores)
    perturb_adapters(model, 0.3)
    assert not torch.allclose(model.scores(inputs), scores)
    if trainable_prefixes:
        assert all(name.startswith(trainable_prefixes)
                   for name, p in model.named_parameters() if p.requires_grad)


def test_the_denoiser_has_no_attention_site_for_diffusion_step_adapters():
    with pytest.raises(ValueError, match="unknown adapter site.* 'attn'; valid sites: ffn"):
        get_adapted_model(recommender(), DiffusionStepConfig())


def test_flags_set_dreamrec_and_other_backbones_refuse_them():
    args = parse_args(pretrain_parser("t"), [
        "--backbone", "dreamrec", "--preset", "none", "--guidance-weight", "3",
        "--null-history-probability", "0.2", "--diffusion-steps", "50", "--schedule",
        "truncated-linear"])
    config = model_config(args, NUM_ITEMS, "data").backbone_settings()
    assert (config.guidance_weight, config.null_history_probability, config.num_steps,
            config.schedule) == (3.0, 0.2, 50, "truncated-linear")
    with pytest.raises(CommandLineError, match="^--guidance-weight: DreamRec settings, which "
                       "do nothing with --backbone diffrec"):
        parse_args(pretrain_parser("t"), ["--backbone", "diffrec", "--guidance-weight", "3"])
    with pytest.raises(CommandLineError, match="^--untied-output: DiffRec settings"):
        parse_args(pretrain_parser("t"), ["--backbone", "dreamrec", "--preset", "none",
                                          "--untied-output"])


def test_the_loss_falls_on_a_short_run_and_the_checkpoint_scores_alike(tiny_dataset_dir,
                                                                       tmp_path):
    run = tmp_path / "run"
    metrics = run_pretrain(tiny_dataset_dir, run, "--backbone", "dreamrec", "--preset", "none",
                           "--max-len", "10", "--num-layers", "1", "--dropout", "0.0",
                           "--lr", "1e-2", "--diffusion-steps", "20",
                           "--batch-size", "16", "--epochs", "3")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert metrics["test"]["ndcg@10"] > 0
    model = SequentialRecommender.from_pretrained(run / "best_model").eval()
    assert model.config.backbone == "dreamrec" and model.backbone.config.num_steps == 20
    batch = {"input_ids": torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])}
    torch.testing.assert_close(model.scores(batch), model.scores(batch))
