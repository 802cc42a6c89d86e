"""Torch datasets over a prepared dataset folder (leave-one-out protocol).

Sequences stay in the memory-mapped Arrow table; each example is sliced on the fly,
so a log far bigger than memory trains the same way.
- training: windows of at most `max_len + 1` items of the user's training part (all
  but the last two items): inputs = window[:-1], targets = window[1:]. `windows="last"`
  takes the most recent window per user (SASRec's recipe); `windows="all"` tiles the
  whole training part, so every training item is a target exactly once per epoch;
  `windows="prefixes"` makes every prefix of the training part a sample whose only
  target is the item after it (RecBole's data augmentation: a user with T training items
  gives T - 1 samples), so a model scoring the last position alone sees every target;
- validation: inputs = training part, target = second to last item;
- test: inputs = training part + validation target, target = last item.
Evaluation inputs are the last `max_len` of those items; `full_history` adds them all
(`history_ids`, for masking every item the user has seen, not only the inputs).
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from peftrec.dataset_tools import SequenceData

SPLITS = ("train", "valid", "test")


TRAIN_WINDOWS = ("last", "all", "prefixes")


class LeaveOneOutDataset(Dataset):
    """Examples as (user, end) pairs: items[:end] feed the model, computed from lengths only."""

    def __init__(
        self,
        data: SequenceData,
        split: str,
        max_len: int,
        max_users: int | None = None,  # evaluation splits only
        seed: int = 0,
        windows: str = "last",  # training split only
        full_history: bool = False,  # evaluation splits only: also every item before the target
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        if windows not in TRAIN_WINDOWS:
            raise ValueError(f"unknown --train-windows {windows!r}; choose one of {TRAIN_WINDOWS}")
        self.split = split
        self.last_target_only = windows == "prefixes"
        self.max_len = max_len
        self.full_history = full_history
        self.sequences = data.sequences.select_columns(["item_indices"]).with_format("numpy")
        self.user_ids = data.sequences.select_columns(["user_id"])  # read only by user_names
        column = data.sequences.data.column("item_indices")
        lengths = pc.list_value_length(column).to_numpy()
        if split == "train":
            train_lengths = lengths - 2
            users = np.flatnonzero(train_lengths >= 2)  # one input and one target at least
            counts = np.ones(len(users), dtype=np.int64)
            stride = max_len
            if windows == "all":
                counts = (train_lengths[users] - 2) // max_len + 1
            elif windows == "prefixes":  # every end from 2 (one input) to the whole part
                counts, stride = train_lengths[users] - 1, 1
            self.users = np.repeat(users, counts)
            offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
            self.ends = train_lengths[self.users] - offsets * stride
        else:
            users = np.flatnonzero(lengths >= 3)
            if max_users is not None and max_users < len(users):  # a seeded sample of users
                users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
            self.users = users
            self.ends = lengths[users] - (2 if split == "valid" else 1)

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, index: int) -> dict[str, np.ndarray | int]:
        user, end = int(self.users[index]), int(self.ends[index])
        items = self.sequences[user]["item_indices"]
        if self.split == "train":
            window = items[max(0, end - self.max_len - 1) : end]
            targets = window[1:]
            if self.last_target_only:  # the earlier targets are other prefixes' samples
                targets = np.where(np.arange(len(targets)) == len(targets) - 1, targets, 0)
            return {"input_ids": window[:-1], "target_ids": targets, "user": user}
        example = {"input_ids": items[:end][-self.max_len :], "target_ids": int(items[end]),
                   "user": user}
        if self.full_history:
            example["history_ids"] = items[:end]
        return example

    def user_names(self, users: list[int]) -> list[str]:
        """The dataset's own ids of users given by index (as examples' `user` holds them)."""
        return [str(self.user_ids[int(user)]["user_id"]) for user in users]


def collate_left_padded(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Left-pad each sequence field (`input_ids`, sequence targets, `history_ids`) with 0 to
    its longest sequence in the batch."""
    batch = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        if np.ndim(values[0]) == 0:
            batch[key] = torch.as_tensor(np.asarray(values, dtype=np.int64))
            continue
        padded = np.zeros((len(values), max(len(value) for value in values)), dtype=np.int64)
        for row, value in enumerate(values):
            if len(value):
                padded[row, -len(value) :] = value
        batch[key] = torch.from_numpy(padded)
    return batch


def item_frequencies(data: SequenceData) -> torch.Tensor:
    """Training-split count of each item index (index 0 = padding, count 0)."""
    counts = np.zeros(data.num_items + 1, dtype=np.int64)
    for items in data.sequences.with_format("numpy")["item_indices"]:
        np.add.at(counts, items[:-2], 1)
    return torch.from_numpy(counts)
