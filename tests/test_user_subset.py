"""dataset_tools.write_user_subset: a seeded share of a dataset folder's users, each with
its whole sequence, as a dataset folder of its own (the scaling study's data axis)."""

from __future__ import annotations

import pytest

from peftrec.dataset_tools import DataError, load_dataset_folder, write_user_subset


def sequences_by_user(data) -> dict[str, list[tuple[str, int]]]:
    """Each user's sequence as (item id, timestamp) pairs: comparable across re-indexing."""
    item_ids = data.items["item_id"]
    return {row["user_id"]: [(item_ids[i - 1], t) for i, t in
                             zip(row["item_indices"], row["timestamps"], strict=True)]
            for row in data.sequences}


def test_a_subset_is_the_chosen_users_whole_sequences(tiny_dataset_dir, tmp_path):
    parent = load_dataset_folder(tiny_dataset_dir)
    subset = load_dataset_folder(write_user_subset(tiny_dataset_dir, tmp_path / "s", 0.3, seed=1))
    whole, part = sequences_by_user(parent), sequences_by_user(subset)
    assert len(part) == round(0.3 * len(whole))
    assert all(part[user] == whole[user] for user in part)
    # The catalog: exactly the items the chosen users saw, in the parent's order, every field.
    seen = {item for sequence in part.values() for item, _ in sequence}
    assert subset.items["item_id"] == [i for i in parent.items["item_id"] if i in seen]
    assert subset.items.column_names == parent.items.column_names
    assert subset.info["statistics"]["interactions"] == sum(map(len, part.values()))
    assert subset.info["user_subset"]["parent"]["fingerprint"] == parent.fingerprint


def test_the_same_seed_chooses_the_same_users_and_another_seed_others(tiny_dataset_dir,
                                                                      tmp_path):
    def users(name: str, seed: int) -> list[str]:
        path = write_user_subset(tiny_dataset_dir, tmp_path / name, 0.5, seed=seed)
        return load_dataset_folder(path).sequences["user_id"]

    first = users("a", 0)
    assert users("b", 0) == first
    assert users("c", 1) != first


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_a_share_outside_0_1_is_refused(tiny_dataset_dir, tmp_path, fraction):
    with pytest.raises(DataError, match=r"the share of users must be in \(0, 1\]"):
        write_user_subset(tiny_dataset_dir, tmp_path / "s", fraction)
    assert not (tmp_path / "s").exists()
