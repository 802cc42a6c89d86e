"""DiffuRec (--backbone diffurec): the noised target enters every history position, shapes
and seeded reverse sampling, and a short training run on the fixture."""

import json

import pytest
import torch

from peftrec.adapters import DiffusionStepConfig, get_adapted_model
from peftrec.pretraining.diffurec import DiffuRec, DiffuRecConfig
from peftrec.pretraining.recommender import RecommenderConfig, SequentialRecommender
from tests.helpers import perturb_adapters, run_pretrain

TINY = {"hidden_size": 8, "num_layers": 1, "num_heads": 2, "ffn_size": 16, "max_len": 6,
        "dropout": 0.0, "num_steps": 5, "num_seeds": 3}
NUM_ITEMS = 11


def backbone(**overrides) -> DiffuRec:
    torch.manual_seed(0)
    return DiffuRec(DiffuRecConfig(**{**TINY, **overrides})).eval()


def histories() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded histories [2, 5, d] and their masks (True at real items)."""
    torch.manual_seed(1)
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    return torch.randn(2, 5, TINY["hidden_size"]) * mask[..., None], mask


def test_the_noised_target_enters_every_history_position_and_no_padding():
    model, (items, mask) = backbone(uncertainty=0.5), histories()
    steps = model.step_embedding(torch.tensor([2, 4]))
    first = model.embed(items, mask, torch.randn(2, TINY["hidden_size"]), steps)
    second = model.embed(items, mask, torch.randn(2, TINY["hidden_size"]), steps)
    changed = (first - second).abs().sum(-1) > 0
    assert torch.equal(changed, mask)
    # Evaluation scales it by delta exactly: the difference is delta (x_n - x_n').
    noised, other = torch.randn(2, TINY["hidden_size"]), torch.randn(2, TINY["hidden_size"])
    difference = model.embed(items, mask, noised, steps) - model.embed(items, mask, other, steps)
    torch.testing.assert_close(difference[mask], (0.5 * (noised - other))[:, None]
                               .expand(-1, 5, -1)[mask])


def test_shapes_and_seeded_reverse_sampling():
    model, (items, mask) = backbone(), histories()
    model.train()
    losses = model.training_losses(items, mask, torch.randn(2, TINY["hidden_size"]))
    assert set(losses) == {"predicted"} and losses["predicted"].shape == (2, TINY["hidden_size"])
    model.eval()
    samples = model.sample_predictions(items, mask)
    assert samples.shape == (2, TINY["num_seeds"], TINY["hidden_size"])
    torch.testing.assert_close(model.sample_predictions(items, mask), samples)
    # A user's samples do not depend on the rest of the batch.
    torch.testing.assert_close(model.sample_predictions(items[1:], mask[1:]), samples[1:])
    assert not torch.allclose(samples[:, 0], samples[:, 1])  # the seeds differ


def recommender() -> SequentialRecommender:
    torch.manual_seed(0)
    return SequentialRecommender(RecommenderConfig(num_items=NUM_ITEMS, backbone="diffurec",
                                                   backbone_config=TINY))


BATCH = {"input_ids": torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]]),
         "target_ids": torch.tensor([[0, 0, 4, 5, 6], [2, 3, 4, 5, 9]])}


def test_the_recommender_trains_diffurec_on_the_cross_entropy_alone():
    model, batch = recommender(), BATCH
    losses = model.train().loss(batch)
    assert set(losses["terms"]) == {"ce"} and "mse" not in losses
    torch.testing.assert_close(losses["loss"], losses["ce"])
    scores = model.eval().scores({"input_ids": batch["input_ids"]})
    assert scores.shape == (2, NUM_ITEMS + 1) and torch.isfinite(scores[:, 1:]).all()


@pytest.mark.parametrize("config", [DiffusionStepConfig(reduction_factor=4),
                                    DiffusionStepConfig(step_mlp_only=True)],
                         ids=["bottlenecks", "step-mlp-only"])
def test_diffusion_step_adapters_start_as_the_identity_and_then_act(config):
    model = recommender().eval()
    inputs = {"input_ids": BATCH["input_ids"]}
    scores = model.scores(inputs)
    get_adapted_model(model, config)
    assert torch.equal(model.scores(inputs), scores)
    perturb_adapters(model, 0.3)
    assert not torch.allclose(model.scores(inputs), scores)


@pytest.mark.parametrize("settings", [{"num_steps": 1}, {"uncertainty": -1.0},
                                      {"num_seeds": 0}, {"schedule": "nope"}])
def test_bad_settings_are_named(settings):
    with pytest.raises(ValueError, match="num_steps|uncertainty|--num-seeds|schedule"):
        DiffuRecConfig(**settings)


def test_the_loss_falls_on_a_short_run_and_the_checkpoint_scores_alike(tiny_dataset_dir,
                                                                       tmp_path):
    run = tmp_path / "run"
    metrics = run_pretrain(tiny_dataset_dir, run, "--backbone", "diffurec", "--preset", "none",
                           "--max-len", "10", "--num-layers", "1", "--dropout", "0.0",
                           "--lr", "1e-2", "--train-windows", "prefixes", "--batch-size", "64",
                           "--epochs", "2")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 0.3
    assert metrics["test"]["ndcg@10"] > 0
    model = SequentialRecommender.from_pretrained(run / "best_model").eval()
    assert model.config.backbone == "diffurec"
    batch = {"input_ids": torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])}
    torch.testing.assert_close(model.scores(batch), model.scores(batch))
