"""Backbones own their scoring: a backbone registered in BACKBONES with a scorer of its own
trains, scores, saves and reloads through SequentialRecommender, which has no branch on it
(docs/architecture.md, "Backbones and their scorers")."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from peftrec.pretraining.recommender import BACKBONES, RecommenderConfig, SequentialRecommender
from peftrec.pretraining.sasrec import SASRec
from peftrec.pretraining.scoring import DotProductScorer

NUM_ITEMS = 12


@dataclass
class CumulativeConfig:
    hidden_size: int = 8
    max_len: int = 10
    temperature: float = 1.0  # an inference setting: it only divides the query


class BiasedScorer:
    """Dot product of the last state / temperature with the items, plus a learned per-item
    bias; trained on each window's last target."""

    losses = ("full",)
    inference_settings = ("temperature",)

    def catalog_parameters(self, config, backbone_config) -> dict[str, nn.Parameter]:
        return {"popularity": nn.Parameter(torch.zeros(config.num_items + 1))}

    def loss(self, model, batch):
        scores = self.score_items(model, self.query(model, batch),
                                  torch.arange(1, model.config.num_items + 1))
        return {"loss": nn.functional.cross_entropy(scores, batch["target_ids"][:, -1] - 1)}

    def query(self, model, batch):
        return model.encode(batch["input_ids"])[:, -1] / model.backbone.config.temperature

    def score_items(self, model, query, item_ids):
        return query @ model.item_encoder.catalog()[item_ids].T + model.popularity[item_ids]


class Cumulative(nn.Module):
    """States = a linear map of the running sum of the item vectors."""

    scorer = BiasedScorer()

    def __init__(self, config: CumulativeConfig) -> None:
        super().__init__()
        self.config = config
        self.mix = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, item_vectors, padding_mask):
        return self.mix((item_vectors * padding_mask[..., None]).cumsum(1))


@pytest.fixture
def cumulative(monkeypatch) -> SequentialRecommender:
    monkeypatch.setitem(BACKBONES, "cumulative", (CumulativeConfig, Cumulative))
    torch.manual_seed(0)
    return SequentialRecommender(RecommenderConfig(num_items=NUM_ITEMS, backbone="cumulative"))


BATCH = {"input_ids": torch.tensor([[0, 2, 5, 7], [1, 3, 3, 9]]),
         "target_ids": torch.tensor([[0, 5, 7, 4], [3, 3, 9, 11]])}


def test_the_backbones_scorer_trains_and_scores_with_its_own_parameters(cumulative):
    assert cumulative.catalog_parameter_names() == ["item_encoder.embedding.weight",
                                                    "popularity"]
    with torch.no_grad():
        cumulative.popularity[6] = 100.0
    assert (cumulative.scores(BATCH)[:, 1:].argmax(-1) + 1).tolist() == [6, 6]
    cumulative.loss(BATCH)["loss"].backward()
    assert cumulative.popularity.grad[[4, 11]].abs().min() > 0  # the targets' biases learn


def test_inference_settings_and_losses_are_the_scorers(cumulative):
    items = torch.arange(1, NUM_ITEMS + 1)
    with torch.no_grad():
        before = cumulative.score_items(cumulative.query(BATCH), items)
        cumulative.set_inference(temperature=2.0)
        after = cumulative.score_items(cumulative.query(BATCH), items)
    assert cumulative.config.backbone_config == {"temperature": 2.0}
    torch.testing.assert_close(after, before / 2)  # the bias is 0
    with pytest.raises(ValueError, match="DiffRec or DiffuRec or ADRec or DimeRec's; this "
                                         r"model's backbone is cumulative, which has "
                                         r"only \['temperature'\]"):
        cumulative.set_inference(num_seeds=2)
    with pytest.raises(ValueError, match="the cumulative backbone trains with the full "
                                         "softmax only; use --loss full"):
        RecommenderConfig(num_items=NUM_ITEMS, backbone="cumulative", loss="sampled")


def test_a_checkpoint_reloads_under_the_scorers_parameter_names(cumulative, tmp_path):
    with torch.no_grad():
        cumulative.popularity.normal_()
    cumulative.save_pretrained(tmp_path / "run")
    loaded = SequentialRecommender.from_pretrained(tmp_path / "run").eval()
    assert torch.equal(loaded.popularity, cumulative.popularity)
    with torch.no_grad():
        assert torch.equal(loaded.scores(BATCH), cumulative.eval().scores(BATCH))


def test_sasrec_scores_with_the_dot_product_and_has_no_per_item_parameters_of_its_own():
    model = SequentialRecommender(RecommenderConfig(num_items=NUM_ITEMS, backbone_config={
        "hidden_size": 8, "num_heads": 2, "ffn_size": 16, "max_len": 10}))
    assert isinstance(SASRec.scorer, DotProductScorer) and model.scorer is SASRec.scorer
    assert model.output_items is None
    assert model.catalog_parameter_names() == ["item_encoder.embedding.weight"]
