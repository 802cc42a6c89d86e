"""--repeat-bias: one learned score offset for items already in the input sequence."""

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import peftrec.pretraining.diffusion_scorer as diffusion_scorer_module
from peftrec.pretraining import RecommenderConfig, SequentialRecommender
from peftrec.pretraining.cli import parse_args, pretrain_parser
from peftrec.pretraining.evaluation import (
    chunked_target_ranks,
    item_chunks,
    target_ranks,
    top_k_items,
)
from peftrec.pretraining.losses import full_softmax_loss, sampled_softmax_loss
from peftrec.pretraining.pipeline import pretrain
from peftrec.pretraining.scoring import HistoryQuery, history_indicator, seen_items

NUM_ITEMS = 30
BACKBONE = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "ffn_size": 32, "max_len": 12,
            "dropout": 0.0}
DIFFREC = {"hidden_size": 8, "num_layers": 1, "num_heads": 2, "ffn_size": 16, "max_len": 6,
           "dropout": 0.0, "num_steps": 20, "num_seeds": 3}


def model_with_bias(value: float | None) -> SequentialRecommender:
    """A tiny SASRec; `value` None = no repeat bias, else the bias set to it."""
    config = RecommenderConfig(num_items=NUM_ITEMS, backbone_config=BACKBONE,
                               repeat_bias=value is not None)
    torch.manual_seed(0)
    model = SequentialRecommender(config).eval()
    if value is not None:
        with torch.no_grad():
            model.repeat_bias.fill_(value)
    return model


BATCH = {"input_ids": torch.tensor([[0, 0, 3, 5, 3], [1, 2, 4, 8, 9]]),
         "target_ids": torch.tensor([[0, 0, 5, 3, 7], [2, 4, 8, 9, 1]])}


def test_history_indicator_marks_the_items_seen_so_far():
    seen = history_indicator(BATCH["input_ids"], NUM_ITEMS + 1, causal=False)
    assert seen.shape == (2, NUM_ITEMS + 1)
    assert seen[0, 1:].nonzero().flatten().tolist() == [2, 4]  # items 3 and 5 (repeats once)
    assert seen[1, 1:].nonzero().flatten().tolist() == [0, 1, 3, 7, 8]
    causal = history_indicator(BATCH["input_ids"], NUM_ITEMS + 1, causal=True)
    assert causal.shape == (2, 5, NUM_ITEMS + 1)
    for t in range(5):
        expected = set(BATCH["input_ids"][1, : t + 1].tolist())
        assert set(causal[1, t, 1:].nonzero().flatten().add(1).tolist()) == expected
    assert torch.equal(causal[:, -1, 1:], seen[:, 1:])


def test_the_bias_shifts_exactly_the_seen_items_and_starts_at_zero():
    plain = model_with_bias(None).scores(BATCH)
    assert torch.equal(model_with_bias(0.0).scores(BATCH), plain)
    shifted = model_with_bias(-2.5).scores(BATCH)
    seen = history_indicator(BATCH["input_ids"], NUM_ITEMS + 1, causal=False)
    torch.testing.assert_close(shifted - plain, -2.5 * seen.float())
    # At zero the loss is the plain model's too.
    torch.testing.assert_close(model_with_bias(0.0).loss(BATCH)["loss"],
                               model_with_bias(None).loss(BATCH)["loss"])


def test_chunked_evaluation_ranks_with_the_bias_match_the_full_scores():
    model = model_with_bias(-1.0)
    query = model.query(BATCH)
    assert isinstance(query, HistoryQuery)
    targets = torch.tensor([3, 9])  # both in their row's history
    chunked = chunked_target_ranks(model, query, targets, chunk_size=7)
    assert torch.equal(chunked, target_ranks(model.scores(BATCH), targets))
    best_scores, best_items = top_k_items(model, query, 5, chunk_size=7)
    expected = model.scores(BATCH)[:, 1:].topk(5)
    torch.testing.assert_close(best_scores, expected.values)
    assert torch.equal(best_items, expected.indices + 1)


def test_every_loss_path_adds_the_same_offsets():
    model = model_with_bias(-1.5)
    loss = model.loss(BATCH)["loss"]
    # The dense (accelerator) path: no padding selection, the loss ignores padding targets.
    states = model.encode(BATCH["input_ids"])
    offsets = -1.5 * history_indicator(BATCH["input_ids"], NUM_ITEMS + 1, causal=True).float()
    catalog = model.item_encoder.catalog()
    torch.testing.assert_close(
        full_softmax_loss(states, catalog, BATCH["target_ids"], offsets), loss)
    # The local-catalog path (trained item encoders, sampled softmax) on every item.
    torch.testing.assert_close(model.scorer.loss_on_needed_items(model, BATCH)["loss"], loss)
    has_target = BATCH["target_ids"] > 0
    every_item = torch.arange(1, NUM_ITEMS + 1)
    sampled = sampled_softmax_loss(states[has_target], catalog, BATCH["target_ids"][has_target],
                                   NUM_ITEMS, negatives=every_item,
                                   item_offsets=offsets[has_target])
    torch.testing.assert_close(sampled, loss)


@pytest.mark.parametrize("every_position", [False, True])
def test_diffrec_loss_takes_the_bias_as_seen_items_not_catalog_wide_offsets(every_position,
                                                                           monkeypatch):
    """DiffRec's cross-entropy gets the repeat bias as the items each position has seen, as
    SASRec's does: the loss of the dense [positions, N + 1] offsets, which are not built
    (they and their gradient were two such tensors every step)."""
    settings = {**DIFFREC, "causal_denoiser": every_position, "every_position": every_position}
    torch.manual_seed(0)
    model = SequentialRecommender(RecommenderConfig(
        num_items=NUM_ITEMS, backbone="diffrec", backbone_config=settings, repeat_bias=True))
    with torch.no_grad():
        model.repeat_bias.fill_(-1.5)
        model.item_bias.normal_()
    calls = []

    def recorded(*args):
        calls.append(args)
        return full_softmax_loss(*args)

    monkeypatch.setattr(diffusion_scorer_module, "full_softmax_loss", recorded)
    ce = model.loss(BATCH)["ce"]
    ((states, catalog, targets, offsets, *_),) = calls
    assert offsets is model.item_bias  # shared by every position: no [P, N + 1] offsets
    inputs, all_targets = BATCH["input_ids"], BATCH["target_ids"]
    if every_position:  # each position has seen the inputs up to it
        has_target = all_targets > 0
        seen = history_indicator(inputs, NUM_ITEMS + 1, causal=True)[has_target]
    else:  # the window's last target has seen every input
        has_target = all_targets[:, -1] > 0
        seen = history_indicator(inputs, NUM_ITEMS + 1, causal=False)[has_target]
        all_targets = all_targets[:, -1]
    assert torch.equal(targets, all_targets[has_target])
    dense = model.item_bias + model.repeat_bias * seen
    torch.testing.assert_close(ce, full_softmax_loss(states, catalog, targets, dense))


@pytest.mark.parametrize("backbone", ["sasrec", "diffrec", "diffrec every position"])
@pytest.mark.parametrize("repeats, sign", [(False, -1), (True, 1)])
def test_the_bias_learns_whether_users_repeat(repeats, sign, backbone):
    """Sequences of distinct items push the bias down; targets that repeat an earlier
    item push it up. DiffRec learns it through the cross-entropy of its last target, or of
    every position's."""
    if backbone == "sasrec":
        model = model_with_bias(0.0).train()
    else:
        settings = {**DIFFREC, "max_len": 12}
        if backbone == "diffrec every position":
            settings.update(causal_denoiser=True, every_position=True)
        torch.manual_seed(0)
        model = SequentialRecommender(RecommenderConfig(
            num_items=NUM_ITEMS, backbone="diffrec", backbone_config=settings,
            repeat_bias=True)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        items = torch.stack([torch.randperm(NUM_ITEMS, generator=generator)[:9] + 1
                             for _ in range(16)])
        inputs, targets = items[:, :-1], items[:, 1:].clone()
        if repeats:
            targets[:, 1:] = inputs[:, :-1]  # next = the item before last
        loss = model.loss({"input_ids": inputs, "target_ids": targets})["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert sign * model.repeat_bias.item() > 0.1


def test_pretraining_with_the_flag_trains_and_saves_the_bias(tiny_dataset_dir, tmp_path):
    argv = ["--dataset", str(tiny_dataset_dir), "--output-dir", str(tmp_path / "run"),
            "--hidden-size", "16", "--num-heads", "2", "--ffn-size", "32", "--max-len", "20",
            "--batch-size", "16", "--report-to", "none", "--cpu", "--epochs", "2",
            "--repeat-bias"]
    pretrain(parse_args(pretrain_parser("test"), argv))
    best = tmp_path / "run" / "best_model"
    assert load_file(best / "model.safetensors")["repeat_bias"].item() < 0  # no repeats
    loaded = SequentialRecommender.from_pretrained(best)
    assert loaded.config.repeat_bias


def test_diffrec_adds_the_bias_to_every_seed_softmax_and_its_normaliser():
    def diffrec(bias: float | None) -> SequentialRecommender:
        config = RecommenderConfig(num_items=NUM_ITEMS, backbone="diffrec",
                                   backbone_config=DIFFREC, repeat_bias=bias is not None)
        torch.manual_seed(0)
        recommender = SequentialRecommender(config).eval()
        with torch.no_grad():
            recommender.item_bias.normal_()
            if bias is not None:
                recommender.repeat_bias.fill_(bias)
        return recommender

    batch = {"input_ids": BATCH["input_ids"]}
    items = torch.arange(1, NUM_ITEMS + 1)
    # At 0 it is the plain model exactly.
    torch.testing.assert_close(diffrec(0.0).scores(batch), diffrec(None).scores(batch))
    recommender = diffrec(-2.0)
    query = recommender.query(batch)
    catalog = recommender.item_encoder.catalog()
    seen = history_indicator(batch["input_ids"], NUM_ITEMS + 1, causal=False)[:, items]
    singles = [torch.softmax(query.predicted[:, s] @ catalog[items].T
                             + recommender.item_bias[items] - 2.0 * seen, dim=-1)
               for s in range(3)]
    expected = torch.stack(singles).mean(0)
    torch.testing.assert_close(recommender.score_items(query, items).exp(), expected)
    # Chunked ranking (the evaluator's path) agrees with ranking all scores.
    targets = torch.tensor([7, 1])
    full = target_ranks(recommender.scores(batch), targets)
    assert torch.equal(chunked_target_ranks(recommender, query, targets, 4), full)


def test_seen_items_are_the_history_indicators_columns():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, NUM_ITEMS + 1, (6, 9), generator=generator)
    input_ids[0, :4] = 0  # padding marks item 0, as in the indicator
    dense = history_indicator(input_ids, NUM_ITEMS + 1, causal=False)
    for item_ids in (torch.arange(NUM_ITEMS + 1), torch.arange(8, 15),
                     torch.tensor([5, 0, 5, 30, 2, 5])):  # unsorted, with repeats (targets)
        assert torch.equal(seen_items(input_ids, item_ids), dense[:, item_ids])


class CatalogWideTensors(TorchDispatchMode):
    """Records every tensor an op returns whose non-leading dims span the catalog (the
    catalog itself, [N + 1, d], is leading): a [batch, catalog] table would be one."""

    def __init__(self, num_items: int) -> None:
        super().__init__()
        self.sizes, self.found = {num_items, num_items + 1}, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else [out]:
            if isinstance(tensor, torch.Tensor) and self.sizes & set(tensor.shape[1:]):
                self.found.append((str(func), tuple(tensor.shape)))
        return out


@pytest.mark.parametrize("backbone", ["sasrec", "diffrec"])
def test_chunked_repeat_bias_scores_equal_the_dense_ones_without_a_catalog_wide_table(
        backbone, monkeypatch):
    if backbone == "sasrec":
        model = model_with_bias(-1.0)
    else:
        torch.manual_seed(0)
        model = SequentialRecommender(RecommenderConfig(
            num_items=NUM_ITEMS, backbone="diffrec", backbone_config=DIFFREC,
            repeat_bias=True)).eval()
        with torch.no_grad():
            model.repeat_bias.fill_(-1.0)
        # DiffRec's normaliser over the catalog runs in chunks of its own: make them small.
        monkeypatch.setattr(diffusion_scorer_module, "NORMALIZER_ELEMENTS", 2 * 3 * 7)
    batch = {"input_ids": BATCH["input_ids"]}
    targets = torch.tensor([3, 9])
    with torch.no_grad(), CatalogWideTensors(NUM_ITEMS) as recorder:
        query = model.query(batch)
        chunks = [model.score_items(query, items) for items in item_chunks(NUM_ITEMS, 7, "cpu")]
        ranks = chunked_target_ranks(model, query, targets, chunk_size=7)
    assert not recorder.found, recorder.found
    with torch.no_grad():
        everything = model.scores(batch)
        assert torch.equal(ranks, target_ranks(everything, targets))
        seen = history_indicator(batch["input_ids"], NUM_ITEMS + 1, causal=False)
        for items, scores in zip(item_chunks(NUM_ITEMS, 7, "cpu"), chunks, strict=True):
            if backbone == "sasrec":  # the dense formula the chunked one replaces, exactly
                dense = (query.state @ model.item_encoder.catalog()[items].T
                         + model.repeat_bias * seen[:, items])
                assert torch.equal(scores, dense)
            torch.testing.assert_close(scores, everything[:, items])
