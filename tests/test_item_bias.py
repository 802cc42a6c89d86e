"""--item-bias: one learned score offset per item, in pretraining and added in fine-tuning."""

import pytest
import torch
from safetensors.torch import load_file

from peftrec.dataset_tools import load_dataset_folder
from peftrec.downstream import evaluate_any_run, load_adapted_model
from peftrec.downstream.transfer import matched_target_model, target_config
from peftrec.pretraining import RecommenderConfig, SequentialRecommender
from peftrec.pretraining.cli import evaluate_parser, parse_args, pretrain_parser
from peftrec.pretraining.evaluation import chunked_target_ranks, target_ranks, top_k_items
from peftrec.pretraining.losses import full_softmax_loss, sampled_softmax_loss
from peftrec.pretraining.pipeline import pretrain
from peftrec.pretraining.recommender import load_recommender_config
from peftrec.pretraining.scoring import history_indicator
from tests.helpers import MODEL, TRAIN, finetune

NUM_ITEMS = 30
BACKBONE = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "ffn_size": 32, "max_len": 12,
            "dropout": 0.0}
BATCH = {"input_ids": torch.tensor([[0, 0, 3, 5, 3], [1, 2, 4, 8, 9]]),
         "target_ids": torch.tensor([[0, 0, 5, 3, 7], [2, 4, 8, 9, 1]])}


def sasrec(item_bias: bool, repeat_bias: bool = False, loss: str = "full") -> SequentialRecommender:
    config = RecommenderConfig(num_items=NUM_ITEMS, backbone_config=BACKBONE, loss=loss,
                               item_bias=item_bias, repeat_bias=repeat_bias)
    torch.manual_seed(0)
    return SequentialRecommender(config).eval()


def with_random_bias(model: SequentialRecommender) -> SequentialRecommender:
    with torch.no_grad():
        model.item_bias.normal_(generator=torch.Generator().manual_seed(1))
        model.item_bias[0] = 0.0
    return model


def test_the_bias_starts_at_zero_and_shifts_each_items_score_by_its_own_offset():
    plain = sasrec(False).scores(BATCH)
    biased = sasrec(True)
    assert biased.item_bias.shape == (NUM_ITEMS + 1,) and not biased.item_bias.any()
    assert torch.equal(biased.scores(BATCH), plain)
    with_random_bias(biased)
    torch.testing.assert_close(biased.scores(BATCH) - plain,
                               biased.item_bias.expand_as(plain).detach())


@pytest.mark.parametrize("repeat_bias", [False, True])
def test_chunked_ranks_and_top_k_match_the_dense_scores(repeat_bias):
    model = with_random_bias(sasrec(True, repeat_bias))
    query, targets = model.query(BATCH), torch.tensor([7, 1])
    dense = model.scores(BATCH)
    assert torch.equal(chunked_target_ranks(model, query, targets, chunk_size=7),
                       target_ranks(dense, targets))
    best_scores, best_items = top_k_items(model, query, 5, chunk_size=7)
    expected = dense[:, 1:].topk(5)
    torch.testing.assert_close(best_scores, expected.values)
    assert torch.equal(best_items, expected.indices + 1)


@pytest.mark.parametrize("repeat_bias", [False, True])
def test_every_loss_path_adds_the_bias_and_trains_it(repeat_bias):
    model = with_random_bias(sasrec(True, repeat_bias))
    loss = model.loss(BATCH)["loss"]
    # By hand: the cross-entropy of the dense scores at every position with a target.
    states = model.encode(BATCH["input_ids"])
    logits = states @ model.item_encoder.catalog().T + model.item_bias
    if repeat_bias:
        seen = history_indicator(BATCH["input_ids"], NUM_ITEMS + 1, causal=True)
        logits = logits + model.repeat_bias * seen
    has_target = BATCH["target_ids"] > 0
    expected = torch.nn.functional.cross_entropy(logits[has_target][:, 1:],
                                                 BATCH["target_ids"][has_target] - 1)
    torch.testing.assert_close(loss, expected)
    # The local-catalog path (trained item encoders, sampled softmax) on every item.
    torch.testing.assert_close(model.scorer.loss_on_needed_items(model, BATCH)["loss"], loss)
    loss.backward()
    assert model.item_bias.grad is not None and model.item_bias.grad[1:].abs().sum() > 0


def test_the_sampled_softmax_takes_offsets_shared_by_every_target():
    torch.manual_seed(0)
    states, catalog = torch.randn(4, 8), torch.randn(NUM_ITEMS + 1, 8)
    targets, offsets = torch.tensor([1, 5, 9, 30]), torch.randn(NUM_ITEMS + 1)
    negatives = torch.tensor([2, 5, 7, 11, 30])
    shared = sampled_softmax_loss(states, catalog, targets, 5, negatives=negatives,
                                  item_offsets=offsets)
    per_row = sampled_softmax_loss(states, catalog, targets, 5, negatives=negatives,
                                   item_offsets=offsets.expand(4, -1))
    torch.testing.assert_close(shared, per_row)
    every_item = torch.arange(1, NUM_ITEMS + 1)
    torch.testing.assert_close(
        sampled_softmax_loss(states, catalog, targets, NUM_ITEMS, negatives=every_item,
                             item_offsets=offsets),
        full_softmax_loss(states, catalog, targets, offsets))


def test_sampled_softmax_training_with_the_bias_runs():
    model = with_random_bias(sasrec(True, loss="sampled")).train()
    loss = model.loss(BATCH)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.item_bias.grad.abs().sum() > 0


@pytest.mark.parametrize("backbone, why", [("diffrec", "always learns one of its own"),
                                           ("dreamrec", "takes none"),
                                           ("dimerec", "takes none")])
def test_backbones_whose_scorer_cannot_take_the_flag_refuse_it(backbone, why):
    with pytest.raises(ValueError, match=f"--item-bias: the {backbone} backbone {why}"):
        RecommenderConfig(num_items=NUM_ITEMS, backbone=backbone, item_bias=True)


@pytest.fixture(scope="module")
def id_base(tiny_dataset_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("bases") / "id"
    pretrain(parse_args(pretrain_parser("t"), ["--dataset", str(tiny_dataset_dir),
                                               "--output-dir", str(run), "--epochs", "2",
                                               "--preset", "none", *MODEL, *TRAIN]))
    return run


def test_a_bias_added_in_fine_tuning_is_trained_saved_alone_and_reloaded(
        id_base, target_dir, tmp_path):
    run = tmp_path / "lora_bias"
    metrics = finetune(("lora",), "--pretrained", str(id_base), "--dataset", str(target_dir),
                       "--output-dir", str(run), "--epochs", "2", "--layers", "top:1",
                       "--item-bias")
    saved = load_file(run / "best_model" / "adapter_model.safetensors")
    target = load_dataset_folder(target_dir)
    assert saved["item_bias"].shape == (target.num_items + 1,)
    assert saved["item_bias"][1:].abs().sum() > 0 and saved["item_bias"][0] == 0
    without = finetune(("lora",), "--pretrained", str(id_base), "--dataset", str(target_dir),
                       "--output-dir", str(tmp_path / "lora"), "--epochs", "1",
                       "--layers", "top:1")
    assert (metrics["parameters"]["trainable"]
            == without["parameters"]["trainable"] + target.num_items + 1)
    model = load_adapted_model(run / "best_model", target)
    assert model.config.item_bias and torch.equal(model.item_bias.detach(), saved["item_bias"])
    again = evaluate_any_run(parse_args(evaluate_parser("t"), [
        "--run", str(run), "--cpu", "--output", str(tmp_path / "eval.json")]))
    assert again["test"] == metrics["test"]


def test_a_base_trained_with_the_bias_keeps_it_and_a_transfer_starts_it_at_zero(
        tiny_dataset_dir, target_dir, tmp_path):
    base = tmp_path / "base"
    pretrain(parse_args(pretrain_parser("t"), ["--dataset", str(tiny_dataset_dir),
                                               "--output-dir", str(base), "--epochs", "1",
                                               "--preset", "none", "--item-bias",
                                               *MODEL, *TRAIN]))
    base_dir = base / "best_model"
    assert load_file(base_dir / "model.safetensors")["item_bias"].abs().sum() > 0
    target = load_dataset_folder(target_dir)
    config = target_config(load_recommender_config(base_dir), target)
    assert config.item_bias
    model = matched_target_model(config, base_dir, target)
    assert model.item_bias.shape == (target.num_items + 1,) and not model.item_bias.any()
