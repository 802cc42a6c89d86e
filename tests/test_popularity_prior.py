"""Zero-shot with the target's popularity prior: the scores it adds, the weight chosen on
validation, the flag on finetune_full and its refusals."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator

from peftrec.dataset_tools import load_dataset_folder
from peftrec.downstream.popularity_prior import (
    WEIGHT_GRID,
    PopularityPrior,
    evaluate_with_prior,
    parse_prior,
)
from peftrec.pretraining import RecommenderConfig, SequentialRecommender
from peftrec.pretraining.data import item_frequencies
from peftrec.pretraining.evaluation import EvaluationProtocol
from peftrec.pretraining.pipeline import evaluate_model
from tests.helpers import finetune, random_item_batch

BACKBONE = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "ffn_size": 32, "max_len": 20}


@pytest.fixture(scope="module")
def target(target_dir):
    return load_dataset_folder(target_dir)


def model_for(data) -> SequentialRecommender:
    torch.manual_seed(0)
    return SequentialRecommender(RecommenderConfig(num_items=data.num_items,
                                                   backbone_config=BACKBONE)).eval()


def test_the_prior_adds_weight_times_log_count_to_every_score(target):
    model = model_for(target)
    counts = item_frequencies(target)
    scored = PopularityPrior(model, counts, 0.5)
    batch = random_item_batch(num_items=target.num_items)
    items = torch.arange(1, target.num_items + 1)
    with torch.no_grad():
        plain = model.score_items(model.query(batch), items)
        with_prior = scored.score_items(scored.query(batch), items)
    torch.testing.assert_close(with_prior - plain,
                               (0.5 * torch.log1p(counts[items].float())).expand_as(plain))
    assert scored.config is model.config


def test_auto_chooses_the_weight_on_validation_and_tests_at_it_only(target, monkeypatch):
    model, accelerator, protocol = model_for(target), Accelerator(cpu=True), EvaluationProtocol()
    evaluated = []
    original = evaluate_model

    def recording(scored, *args, splits=("valid", "test")):
        evaluated.append((scored.weight, splits))
        return original(scored, *args, splits=splits)

    monkeypatch.setattr("peftrec.downstream.popularity_prior.evaluate_model", recording)
    metrics, record = evaluate_with_prior(model, target, protocol, 64, accelerator, "auto")
    valid = {float(w): score for w, score in record["valid_by_weight"].items()}
    assert list(valid) == list(WEIGHT_GRID)
    best = max(valid.values())
    assert record["weight"] == next(w for w, score in valid.items() if score == best)
    # Every weight scored on validation alone; the test split once, at the chosen weight,
    # and validation not again: the chosen weight's scores are kept.
    assert evaluated[:-1] == [(w, ("valid",)) for w in WEIGHT_GRID]
    assert evaluated[-1] == (record["weight"], ("test",))
    assert metrics["valid"]["ndcg@10"] == best
    fixed, fixed_record = evaluate_with_prior(model, target, protocol, 64, accelerator,
                                              record["weight"])
    assert fixed["test"] == metrics["test"] and fixed_record["weight"] == record["weight"]
    assert fixed["valid"] == metrics["valid"] and fixed["protocol"] == metrics["protocol"]
    # Weight 0 is the model as it is.
    zero, _ = evaluate_with_prior(model, target, protocol, 64, accelerator, 0.0)
    assert zero["test"] == original(model, target, protocol, 64, accelerator)["test"]


@pytest.mark.parametrize("value", ["often", "-1", "nan", ""])
def test_a_weight_that_is_not_auto_or_non_negative_is_refused(value):
    with pytest.raises(ValueError, match="expected 'auto'"):
        parse_prior(value)


def test_parse_prior_accepts_auto_a_weight_and_nothing():
    assert parse_prior("auto") == "auto" and parse_prior("0.5") == 0.5 and parse_prior(None) is None


def test_zero_shot_with_the_prior_records_the_chosen_weight(text_base, target_dir, tmp_path):
    run_dir, cache = text_base
    run = tmp_path / "zero"
    metrics = finetune((), "--pretrained", str(run_dir), "--dataset", str(target_dir),
                       "--output-dir", str(run), "--zero-shot", "--popularity-prior", "auto",
                       "--encoder-cache-dir", str(cache))
    recorded = json.loads((run / "metrics.json").read_text())
    assert recorded["popularity_prior"]["weight"] in WEIGHT_GRID
    assert recorded["test"] == metrics["test"]
    config = json.loads((run / "config.json").read_text())
    assert config["transfer"]["popularity_prior"] == "auto"


def test_the_prior_without_zero_shot_is_refused_before_anything_is_written(
        text_base, target_dir, tmp_path):
    run_dir, cache = text_base
    with pytest.raises(ValueError, match="--popularity-prior: a zero-shot setting"):
        finetune((), "--pretrained", str(run_dir), "--dataset", str(target_dir),
                 "--output-dir", str(tmp_path / "full"), "--popularity-prior", "0.5",
                 "--encoder-cache-dir", str(cache))
    assert not (tmp_path / "full").exists()
