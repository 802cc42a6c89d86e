"""Torch datasets over a prepared dataset folder (leave-one-out protocol).

Sequences stay in the memory-mapped Arrow table; each example is sliced on the fly.
- training: the user's training part (all but the last two items), the last
  `max_len + 1` of them: inputs = items[:-1], targets = items[1:];
- validation: inputs = training part, target = second to last item;
- test: inputs = training part + validation target, target = last item.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from dataset_tools import SequenceData

SPLITS = ("train", "valid", "test")


class LeaveOneOutDataset(Dataset):
    def __init__(self, data: SequenceData, split: str, max_len: int) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        self.split = split
        self.max_len = max_len
        self.sequences = data.sequences.select_columns(["item_indices"]).with_format("numpy")
        column = data.sequences.data.column("item_indices")
        lengths = pc.list_value_length(column).to_numpy()
        # Training needs at least two training items (one input, one target).
        minimum = 4 if split == "train" else 3
        self.users = np.flatnonzero(lengths >= minimum)

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, index: int) -> dict[str, np.ndarray | int]:
        user = int(self.users[index])
        items = self.sequences[user]["item_indices"]
        if self.split == "train":
            window = items[:-2][-(self.max_len + 1) :]
            return {"input_ids": window[:-1], "target_ids": window[1:]}
        end = len(items) - (2 if self.split == "valid" else 1)
        history = items[:end][-self.max_len :]
        return {"input_ids": history, "target_ids": int(items[end]), "user": user}


def collate_left_padded(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Left-pad `input_ids` (and sequence targets) with 0 to the longest sequence in the batch."""
    length = max(len(example["input_ids"]) for example in examples)
    batch = {}
    for key in examples[0]:
        values = [example[key] for example in examples]
        if np.ndim(values[0]) == 0:
            batch[key] = torch.as_tensor(np.asarray(values, dtype=np.int64))
            continue
        padded = np.zeros((len(values), length), dtype=np.int64)
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
