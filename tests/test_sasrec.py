"""SASRec and the recommender contract: causality, padding, losses, save/load, data splits."""

import numpy as np
import pytest
import torch

from peftrec.dataset_tools import load_dataset_folder
from peftrec.dataset_tools.integrity import write_checksums
from peftrec.pretraining import CheckpointError, RecommenderConfig, SequentialRecommender
from peftrec.pretraining.data import LeaveOneOutDataset, collate_left_padded, item_frequencies
from peftrec.pretraining.losses import full_softmax_loss, sampled_softmax_loss


def tiny_model(num_items=30, **overrides):
    backbone = {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "ffn_size": 32,
                "max_len": 12, "dropout": 0.1}
    config = RecommenderConfig(num_items=num_items, backbone_config=backbone, **overrides)
    torch.manual_seed(0)
    return SequentialRecommender(config).eval()


def test_causal_mask_future_items_never_change_the_past():
    model = tiny_model()
    sequence = torch.randint(1, 31, (3, 10))
    before = model.encode(sequence)
    for t in range(9):
        changed = sequence.clone()
        changed[:, t + 1 :] = torch.randint(1, 31, changed[:, t + 1 :].shape)
        after = model.encode(changed)
        torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(after[:, t + 1], before[:, t + 1])


def test_left_padding_does_not_change_the_states_of_real_items():
    model = tiny_model()
    sequence = torch.randint(1, 31, (1, 6))
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), sequence], dim=1)
    expected = model.encode(sequence)
    torch.testing.assert_close(model.encode(padded)[:, 4:], expected, atol=1e-5, rtol=0)


def test_sequence_longer_than_max_len_is_refused():
    with pytest.raises(ValueError, match="max_len"):
        tiny_model().encode(torch.ones(1, 13, dtype=torch.long))


def test_full_loss_ignores_padding_targets():
    model = tiny_model()
    inputs = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    targets = torch.tensor([[0, 0, 4, 5, 6], [2, 3, 4, 5, 6]])
    loss = model.loss({"input_ids": inputs, "target_ids": targets})["loss"]
    states = model.encode(inputs)[targets > 0]
    expected = full_softmax_loss(states, model.item_encoder.catalog(), targets[targets > 0])
    torch.testing.assert_close(loss, expected)
    # The accelerator path: no selection, padding targets ignored by the loss itself.
    dense = full_softmax_loss(model.encode(inputs), model.item_encoder.catalog(), targets)
    torch.testing.assert_close(dense, expected)
    # Padding is never a class: the logits cover items 1..N only.
    assert model.scores({"input_ids": inputs}).shape == (2, 31)


def test_sampled_softmax_with_whole_catalog_as_negatives_is_close_to_full_softmax():
    torch.manual_seed(0)
    states, catalog = torch.randn(64, 8), torch.randn(51, 8)
    targets = torch.randint(1, 51, (64,))
    full = full_softmax_loss(states, catalog, targets)
    sampled = torch.stack([sampled_softmax_loss(states, catalog, targets, 2000) for _ in range(20)])
    # Many uniform negatives approximate the full partition function.
    assert sampled.mean().item() == pytest.approx(full.item(), rel=0.02)
    probs = torch.full((50,), 1 / 50)
    popularity = sampled_softmax_loss(states, catalog, targets, 2000, probs)
    assert popularity.item() == pytest.approx(full.item(), rel=0.05)


def test_sampled_softmax_with_every_item_as_negative_equals_full_softmax():
    torch.manual_seed(0)
    states, catalog = torch.randn(64, 8), torch.randn(51, 8)
    targets = torch.randint(1, 51, (64,))
    every_item = torch.arange(1, 51)
    sampled = sampled_softmax_loss(states, catalog, targets, 50, negatives=every_item)
    torch.testing.assert_close(sampled, full_softmax_loss(states, catalog, targets))
    uniform = torch.full((50,), 1 / 50)
    sampled = sampled_softmax_loss(states, catalog, targets, 50, uniform, negatives=every_item)
    torch.testing.assert_close(sampled, full_softmax_loss(states, catalog, targets))


def test_chunked_model_scores_match_full_scores():
    model = tiny_model()
    batch = {"input_ids": torch.randint(0, 31, (4, 8))}
    query = model.query(batch)
    chunk = model.score_items(query, torch.arange(5, 12))
    torch.testing.assert_close(chunk, model.scores(batch)[:, 5:12])


def test_save_and_load_give_identical_scores(tmp_path):
    model = tiny_model()
    batch = {"input_ids": torch.randint(0, 31, (4, 8))}
    model.save_pretrained(tmp_path / "ckpt")
    loaded = SequentialRecommender.from_pretrained(tmp_path / "ckpt").eval()
    assert torch.equal(model.scores(batch), loaded.scores(batch))
    assert loaded.config == model.config


def test_loading_a_checkpoint_of_another_model_fails_clearly(tmp_path):
    tiny_model().save_pretrained(tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    config_file.write_text(config_file.read_text().replace('"num_layers": 2', '"num_layers": 3'))
    write_checksums(tmp_path / "ckpt")  # a consistent checkpoint, of another model
    with pytest.raises(CheckpointError, match="do not match"):
        SequentialRecommender.from_pretrained(tmp_path / "ckpt")
    config_file.write_text('{"architecture": "BertModel", "config": {}}')
    write_checksums(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="BertModel"):
        SequentialRecommender.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="not a peftrec checkpoint"):
        SequentialRecommender.from_pretrained(tmp_path)


def test_leave_one_out_examples_never_leak_validation_or_test_targets(tiny_dataset_dir):
    data = load_dataset_folder(tiny_dataset_dir)
    max_len = 6
    splits = {s: LeaveOneOutDataset(data, s, max_len) for s in ("train", "valid", "test")}
    sequences = data.sequences["item_indices"]
    for split in splits.values():
        assert len(split) == data.num_users  # every fixture user has >= 4 items
    for index in range(data.num_users):
        items = np.asarray(sequences[index])
        train, valid, test = (splits[s][index] for s in ("train", "valid", "test"))
        window = np.concatenate([train["input_ids"][:1], train["target_ids"]])
        # Training sees only the prefix before the validation target, by position.
        assert np.array_equal(window, items[:-2][-(max_len + 1):])
        assert np.array_equal(valid["input_ids"], items[:-2][-max_len:])
        assert valid["target_ids"] == items[-2]
        assert np.array_equal(test["input_ids"], items[:-1][-max_len:])
        assert test["target_ids"] == items[-1]
    batch = collate_left_padded([splits["train"][i] for i in range(8)])
    # Padding is never a target: every non-zero input has a real target and vice versa.
    assert torch.equal(batch["input_ids"] > 0, batch["target_ids"] > 0)
    assert (batch["target_ids"][batch["input_ids"] > 0] > 0).all()


def test_all_training_windows_make_every_training_item_a_target_once(tiny_dataset_dir):
    data = load_dataset_folder(tiny_dataset_dir)
    windows = LeaveOneOutDataset(data, "train", max_len=4, windows="all")
    sequences = data.sequences["item_indices"]
    targets: dict[int, list] = {}
    for index in range(len(windows)):
        example = windows[index]
        assert 1 <= len(example["input_ids"]) <= 4
        assert np.array_equal(example["input_ids"][1:], example["target_ids"][:-1])
        targets.setdefault(int(windows.users[index]), []).append(example["target_ids"])
    assert len(targets) == data.num_users
    for user, parts in targets.items():
        covered = np.concatenate(parts[::-1])  # windows are listed newest first
        assert np.array_equal(covered, np.asarray(sequences[user])[1:-2])


def test_prefix_samples_are_every_prefix_of_the_training_part(tiny_dataset_dir):
    data = load_dataset_folder(tiny_dataset_dir)
    prefixes = LeaveOneOutDataset(data, "train", max_len=4, windows="prefixes")
    sequences = data.sequences["item_indices"]
    training_parts = [np.asarray(items)[:-2] for items in sequences]
    assert len(prefixes) == sum(len(part) - 1 for part in training_parts)
    seen: dict[int, list[int]] = {}
    for index in range(len(prefixes)):
        example = prefixes[index]
        part = training_parts[example["user"]]
        end = int(prefixes.ends[index])  # the prefix is part[:end - 1], its target part[end - 1]
        assert np.array_equal(example["input_ids"], part[: end - 1][-4:])
        # The target after the prefix is the sample's only one, at its last position.
        assert example["target_ids"][-1] == part[end - 1]
        assert not example["target_ids"][:-1].any()
        seen.setdefault(example["user"], []).append(end)
    assert all(sorted(ends) == list(range(2, len(training_parts[user]) + 1))
               for user, ends in seen.items())
    again = LeaveOneOutDataset(data, "train", max_len=4, windows="prefixes")
    assert np.array_equal(again.users, prefixes.users)
    assert np.array_equal(again.ends, prefixes.ends)


def test_evaluation_user_sample_is_seeded_and_sized(tiny_dataset_dir):
    data = load_dataset_folder(tiny_dataset_dir)
    first = LeaveOneOutDataset(data, "test", 6, max_users=10, seed=3)
    again = LeaveOneOutDataset(data, "test", 6, max_users=10, seed=3)
    other = LeaveOneOutDataset(data, "test", 6, max_users=10, seed=4)
    assert len(first) == 10 and np.array_equal(first.users, again.users)
    assert not np.array_equal(first.users, other.users)
    assert len(LeaveOneOutDataset(data, "test", 6, max_users=1000)) == data.num_users


def test_dataloader_workers_read_the_memory_mapped_sequences(tiny_dataset_dir):
    from torch.utils.data import DataLoader

    data = load_dataset_folder(tiny_dataset_dir)
    dataset = LeaveOneOutDataset(data, "train", 8, windows="all")
    batches = [list(DataLoader(dataset, batch_size=16, collate_fn=collate_left_padded,
                               num_workers=workers)) for workers in (0, 2)]
    assert len(batches[0]) == len(batches[1]) > 1
    for single, parallel in zip(*batches, strict=True):
        assert torch.equal(single["input_ids"], parallel["input_ids"])
        assert torch.equal(single["target_ids"], parallel["target_ids"])


def test_item_frequencies_count_training_items_only(tiny_dataset_dir):
    data = load_dataset_folder(tiny_dataset_dir)
    counts = item_frequencies(data)
    assert counts[0] == 0
    assert counts.sum() == sum(len(s) - 2 for s in data.sequences["item_indices"])


def test_popularity_sampling_needs_frequencies():
    with pytest.raises(ValueError, match="frequencies"):
        tiny_model(loss="sampled", negative_sampling="popularity")
