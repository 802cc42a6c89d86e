"""Ranking metrics against hand-computed values."""

import math

import pytest
import torch

from peftrec.pretraining.evaluation import (
    EvaluationProtocol,
    chunked_target_ranks,
    evaluate,
    ranking_metrics,
    target_ranks,
    top_k_items,
)


def test_metrics_match_hand_computed_values():
    ranks = torch.tensor([0, 1, 4, 12])
    metrics = ranking_metrics(ranks, ks=(1, 5, 10))
    assert metrics["hr@1"] == pytest.approx(1 / 4)
    assert metrics["hr@5"] == pytest.approx(3 / 4)
    assert metrics["hr@10"] == pytest.approx(3 / 4)
    expected_ndcg5 = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(6)) / 4
    assert metrics["ndcg@5"] == pytest.approx(expected_ndcg5)
    assert metrics["ndcg@10"] == pytest.approx(expected_ndcg5)
    assert metrics["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 13) / 4)


def test_rank_counts_strictly_higher_items_and_skips_padding():
    # Column 0 is padding: its huge score must never push the target down.
    scores = torch.tensor([[100.0, 0.1, 0.9, 0.5, 0.3]])
    assert target_ranks(scores, torch.tensor([3])).tolist() == [1]
    assert target_ranks(scores, torch.tensor([2])).tolist() == [0]
    assert target_ranks(scores, torch.tensor([1])).tolist() == [3]


def test_ties_count_against_the_target():
    scores = torch.zeros(2, 6)  # a constant scorer
    ranks = target_ranks(scores, torch.tensor([1, 5]))
    assert ranks.tolist() == [4, 4]  # worst of 5 real items, not best
    scores = torch.tensor([[0.0, 0.5, 0.7, 0.7, 0.1]])
    assert target_ranks(scores, torch.tensor([2])).tolist() == [1]


def test_k_larger_than_catalog_is_always_a_hit():
    scores = torch.randn(8, 4)  # 3 real items
    ranks = target_ranks(scores, torch.randint(1, 4, (8,)))
    metrics = ranking_metrics(ranks, ks=(5, 20))
    assert metrics["hr@5"] == 1.0 and metrics["hr@20"] == 1.0
    assert metrics["ndcg@20"] == pytest.approx(metrics["ndcg@5"])


def test_history_mask_removes_seen_items_but_never_the_target():
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.1]])
    history = torch.tensor([[0, 1, 3]])  # 0 = padding
    assert target_ranks(scores, torch.tensor([3]), history).tolist() == [1]  # item 2 above
    assert target_ranks(scores, torch.tensor([3])).tolist() == [2]


class DotScorer(torch.nn.Module):
    """The scorer contract over a fixed catalog of item vectors (row 0 = padding)."""

    def __init__(self, catalog: torch.Tensor):
        super().__init__()
        self.catalog = catalog
        self.config = type("Config", (), {"num_items": len(catalog) - 1})()

    def score_items(self, query, item_ids):
        return query @ self.catalog[item_ids].T


class LastItemScorer(DotScorer):
    """Scores the catalog against the vector of the batch's last input item."""

    def query(self, batch):
        return self.catalog[batch["input_ids"][:, -1]]


def test_mask_history_masks_the_whole_history_not_only_the_inputs(tiny_dataset_dir):
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from peftrec.dataset_tools import load_dataset_folder
    from peftrec.pretraining.data import LeaveOneOutDataset, collate_left_padded
    from peftrec.pretraining.pipeline import evaluation_dataset

    data = load_dataset_folder(tiny_dataset_dir)
    torch.manual_seed(0)
    scorer = LastItemScorer(torch.randn(data.num_items + 1, 8))
    protocol = EvaluationProtocol(mask_history=True)
    dataset = evaluation_dataset(data, "test", 3, protocol)  # histories of 7-24 items
    everyone = collate_left_padded([dataset[i] for i in range(len(dataset))])
    scores = scorer.query(everyone) @ scorer.catalog.T
    whole = target_ranks(scores, everyone["target_ids"], everyone["history_ids"])
    assert not torch.equal(whole, target_ranks(scores, everyone["target_ids"],
                                               everyone["input_ids"]))  # the test can tell
    accelerator = Accelerator(cpu=True)
    metrics = evaluate(scorer, DataLoader(dataset, batch_size=16, collate_fn=collate_left_padded),
                       accelerator, protocol)
    assert metrics.pop("protocol")["masked_items"] == "whole_history"
    assert metrics == ranking_metrics(whole)
    inputs_only = LeaveOneOutDataset(data, "test", 3)  # no history_ids: refused, not guessed
    with pytest.raises(ValueError, match="whole history"):
        evaluate(scorer, DataLoader(inputs_only, batch_size=16, collate_fn=collate_left_padded),
                 accelerator, protocol)


@pytest.mark.parametrize("chunk_size", [1, 7, 50, 64, 1000])
def test_chunked_ranks_equal_unchunked_ranks(chunk_size):
    torch.manual_seed(0)
    catalog, query = torch.randn(65, 8), torch.randn(16, 8)
    scorer = DotScorer(catalog)
    targets = torch.randint(1, 65, (16,))
    history = torch.randint(0, 65, (16, 10))
    full = query @ catalog.T
    for mask in (None, history):
        expected = target_ranks(full, targets, mask)
        got = chunked_target_ranks(scorer, query, targets, chunk_size, mask)
        assert torch.equal(got, expected)


def test_chunked_ranks_keep_pessimistic_ties():
    scorer = DotScorer(torch.zeros(11, 4))  # every item scores 0
    ranks = chunked_target_ranks(scorer, torch.randn(3, 4), torch.tensor([1, 5, 10]), 3)
    assert ranks.tolist() == [9, 9, 9]


@pytest.mark.parametrize("chunk_size", [1, 7, 50, 64, 1000])
def test_chunked_top_k_equals_unchunked_top_k(chunk_size):
    torch.manual_seed(1)
    catalog, query = torch.randn(65, 8), torch.randn(16, 8)
    exclude = torch.randint(0, 65, (16, 5))
    scores, items = top_k_items(DotScorer(catalog), query, 10, chunk_size, exclude)
    full = query @ catalog.T
    full[:, 0] = float("-inf")
    full.scatter_(1, exclude, float("-inf"))
    expected = full.topk(10, dim=1)
    assert torch.equal(items, expected.indices)
    torch.testing.assert_close(scores, expected.values)
    assert (items > 0).all()
