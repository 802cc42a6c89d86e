"""ADRec (--backbone adrec): a step per position in training, clean history positions at
inference, seeded sampling, a short training run, with --pcgrad too."""

import json

import pytest
import torch

from peftrec.adapters import DiffusionStepConfig, get_adapted_model
from peftrec.pretraining import trainer
from peftrec.pretraining.adrec import ADRec, ADRecConfig
from peftrec.pretraining.pcgrad import pcgrad_objective
from peftrec.pretraining.recommender import RecommenderConfig, SequentialRecommender
from tests.helpers import perturb_adapters, run_pretrain

TINY = {"hidden_size": 8, "num_layers": 1, "num_heads": 2, "ffn_size": 16, "max_len": 6,
        "dropout": 0.0, "num_steps": 5, "num_seeds": 2}
NUM_ITEMS = 11
BATCH = {"input_ids": torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]]),
         "target_ids": torch.tensor([[0, 0, 4, 5, 6], [2, 3, 4, 5, 9]])}
RUN = ["--backbone", "adrec", "--preset", "none", "--max-len", "10", "--num-layers", "1",
       "--dropout", "0.0", "--lr", "1e-2"]


def backbone(**overrides) -> ADRec:
    torch.manual_seed(0)
    return ADRec(ADRecConfig(**{**TINY, **overrides})).eval()


def histories() -> tuple[torch.Tensor, torch.Tensor]:
    """Two left-padded histories [2, 5, d] and their masks (True at real items)."""
    torch.manual_seed(1)
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    return torch.randn(2, 5, TINY["hidden_size"]) * mask[..., None], mask


def recorded_denoiser_calls(model: ADRec, monkeypatch) -> list[tuple]:
    """The (noised items, steps) of every call of the model's denoiser, from now on."""
    calls, denoise = [], model.denoise

    def recording(condition, noised, steps, padding_mask):
        calls.append((noised.clone(), steps.clone()))
        return denoise(condition, noised, steps, padding_mask)

    monkeypatch.setattr(model, "denoise", recording)
    return calls


def test_training_noises_every_target_at_its_own_step_and_leaves_the_rest_clean(monkeypatch):
    model, (items, mask) = backbone(num_steps=1000).train(), histories()
    targets = torch.randn(2, 5, TINY["hidden_size"])
    has_target = mask.clone()
    has_target[1, -1] = False  # a real input without a next item
    calls = recorded_denoiser_calls(model, monkeypatch)
    losses = model.every_position_losses(items, mask, targets, has_target)
    (noised, steps), = calls
    assert losses["predicted"].shape == (2, 5, TINY["hidden_size"])
    assert torch.equal(steps > 0, has_target)  # padding and no target: step 0
    assert len(set(steps[has_target].tolist())) > 3  # drawn per position
    torch.testing.assert_close(noised[~has_target], targets[~has_target])
    assert not torch.allclose(noised[has_target], targets[has_target])


def test_earlier_positions_stay_clean_at_inference(monkeypatch):
    model, (items, mask) = backbone(), histories()
    calls = recorded_denoiser_calls(model, monkeypatch)
    samples = model.sample_predictions(items, mask)
    assert samples.shape == (2, TINY["num_seeds"], TINY["hidden_size"])
    assert len(calls) == TINY["num_steps"]  # every step of the reverse process
    known = items[:, 1:].repeat_interleave(TINY["num_seeds"], dim=0)
    for noised, steps in calls:
        # The history positions hold their next item, clean; only the last is denoised.
        torch.testing.assert_close(noised[:, :-1], known)
        assert (steps[:, :-1] == 0).all() and (steps[:, -1] > 0).all()
    assert [steps[0, -1].item() for _, steps in calls] == list(range(TINY["num_steps"], 0, -1))
    # Seeded: the same samples again, and a user's do not depend on the rest of the batch.
    torch.testing.assert_close(model.sample_predictions(items, mask), samples)
    torch.testing.assert_close(model.sample_predictions(items[1:], mask[1:]), samples[1:])


def recommender() -> SequentialRecommender:
    torch.manual_seed(0)
    return SequentialRecommender(RecommenderConfig(num_items=NUM_ITEMS, backbone="adrec",
                                                   backbone_config=TINY))


def test_the_recommender_trains_the_mse_and_the_cross_entropy_at_every_position():
    model = recommender()
    losses = model.train().loss(BATCH)
    assert set(losses["terms"]) == {"ce", "mse"}
    torch.testing.assert_close(losses["loss"], losses["ce"] + losses["mse"])
    scores = model.eval().scores({"input_ids": BATCH["input_ids"]})
    assert scores.shape == (2, NUM_ITEMS + 1) and torch.isfinite(scores[:, 1:]).all()


def test_diffusion_step_adapters_start_as_the_identity_and_then_act():
    model = recommender().eval()
    inputs = {"input_ids": BATCH["input_ids"]}
    scores = model.scores(inputs)
    get_adapted_model(model, DiffusionStepConfig(reduction_factor=4))
    torch.testing.assert_close(model.scores(inputs), scores)
    perturb_adapters(model, 0.3)
    assert not torch.allclose(model.scores(inputs), scores)


@pytest.mark.parametrize("settings", [{"num_steps": 1}, {"guide_scale": 0.0},
                                      {"num_seeds": 0}, {"schedule": "nope"}])
def test_bad_settings_are_named(settings):
    with pytest.raises(ValueError, match="num_steps|--guide-scale|--num-seeds|schedule"):
        ADRecConfig(**settings)


def test_the_loss_falls_on_a_short_run_and_the_checkpoint_scores_alike(tiny_dataset_dir,
                                                                       tmp_path):
    run = tmp_path / "run"
    metrics = run_pretrain(tiny_dataset_dir, run, *RUN, "--epochs", "3")
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 0.1
    assert metrics["test"]["ndcg@10"] > 0
    model = SequentialRecommender.from_pretrained(run / "best_model").eval()
    assert model.config.backbone == "adrec"
    batch = {"input_ids": torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])}
    torch.testing.assert_close(model.scores(batch), model.scores(batch))


def test_an_adrec_run_trains_with_pcgrad(tiny_dataset_dir, tmp_path, monkeypatch):
    calls = []

    def counted(terms, parameters):
        calls.append(len(terms))
        return pcgrad_objective(terms, parameters)

    monkeypatch.setattr(trainer, "pcgrad_objective", counted)
    metrics = run_pretrain(tiny_dataset_dir, tmp_path / "run", *RUN, "--pcgrad", "--epochs",
                           "1", "--max-steps", "2")
    assert calls == [2, 2]  # the MSE and the cross-entropy projected, at each step
    assert metrics["test"]["ndcg@10"] >= 0
