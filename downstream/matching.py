"""Items matched across domains: a target item that is also a source item keeps its vectors.

    --match-items-by movie_title,release_year [--freeze-matched-items] [--source-dataset DIR]

A target item matches the source item whose values of the named item fields are the same
after normalisation (`normalise_value`: case, surrounding and repeated whitespace, and a
whole number's trailing `.0` do not matter). The source dataset is the one the pretraining
run recorded (its path and fingerprint in the run's config.json), or `--source-dataset`.
Where several source items share a key, the target item takes the first of them by index
and is counted as ambiguous; an item with an empty value in any field matches nothing.

Every per-item parameter of the base (`catalog_parameter_names()`: an ID table, DiffRec's
item bias, an untied output table, any table an encoder declares in `catalog_parameters`)
that has one row per item gets the matched rows copied from the base, bit for bit
(`carry_matched_rows`); the other rows start fresh. Matched rows train like the rest, or,
with `--freeze-matched-items`, are frozen (`freeze_matched_rows`, see `MatchedRows` for
why a split table rather than a gradient hook).

The mapping (target index -> source index) is written to `item_matching.json` in the run
folder, and in an adapter checkpoint beside the adapter, so the model is rebuilt on its
base without the source dataset; config.json records its fields, counts and fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from torch.nn.utils import parametrize

from peftrec.dataset_tools import DataError, SequenceData, load_dataset_folder, resolve_dataset
from peftrec.dataset_tools.checkpoints import RUN_CONFIG
from peftrec.pretraining.recommender import WEIGHTS_NAME, CheckpointError, SequentialRecommender

MATCHING_FILE = "item_matching.json"
UNMATCHED_INIT = ("fresh", "source_mean")
_WHOLE_NUMBER = re.compile(r"([+-]?\d+)\.0+")


def normalise_value(value) -> str:
    """The form item field values are compared in: lower case, no surrounding whitespace,
    inner whitespace runs collapsed to one space; a whole number written with a zero
    fraction is the number itself (1995, 1995.0, "1995" and " 1995.0 " are all "1995"),
    while leading zeros are kept ("007" is not "7": identifiers such as ASINs have them).
    None and NaN are empty."""
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        if float(value).is_integer():
            value = int(value)
    text = " ".join(str(value).split()).lower()
    whole = _WHOLE_NUMBER.fullmatch(text)
    return whole.group(1) if whole else text


@dataclass(frozen=True)
class ItemMatching:
    """Target items matched to source items by `fields`: `target[i]` (1-based target item
    index, ascending) is source item `source[i]`."""

    fields: tuple[str, ...]
    target: tuple[int, ...]
    source: tuple[int, ...]
    target_items: int  # the target catalog's size
    source_items: int
    ambiguous: int  # matched target items whose key several source items share
    blank: int  # target items with an empty value in a field (never matched)
    source_dataset: dict  # name, path, fingerprint

    @property
    def matched(self) -> int:
        return len(self.target)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the fields and the pairs: what a rebuilt model must use again."""
        pairs = json.dumps([list(self.fields), list(self.target), list(self.source)])
        return hashlib.sha256(pairs.encode()).hexdigest()

    def summary(self) -> str:
        return (f"matched {self.matched} of {self.target_items} target items by "
                f"{','.join(self.fields)} ({self.ambiguous} ambiguous)")

    def record(self) -> dict:
        """What config.json keeps: everything but the pairs (they are in MATCHING_FILE)."""
        return {"fields": list(self.fields), "source_dataset": self.source_dataset,
                "target_items": self.target_items, "source_items": self.source_items,
                "matched": self.matched, "ambiguous": self.ambiguous, "blank": self.blank,
                "fingerprint": self.fingerprint, "file": MATCHING_FILE}

    def to_json(self) -> str:
        """MATCHING_FILE's text: the record, then one [target, source] pair per line."""
        head = json.dumps(self.record(), indent=2)[:-2]  # without the closing "\n}"
        pairs = ",\n".join(f"    [{t}, {s}]" for t, s in zip(self.target, self.source,
                                                              strict=True))
        return f'{head},\n  "target_to_source": [\n{pairs}\n  ]\n}}\n'

    @classmethod
    def from_json(cls, text: str) -> ItemMatching:
        values = json.loads(text)
        pairs = values["target_to_source"]
        return cls(fields=tuple(values["fields"]), target=tuple(t for t, _ in pairs),
                   source=tuple(s for _, s in pairs), target_items=values["target_items"],
                   source_items=values["source_items"], ambiguous=values["ambiguous"],
                   blank=values["blank"], source_dataset=values["source_dataset"])


def match_items(source: SequenceData, target: SequenceData,
                fields: tuple[str, ...]) -> ItemMatching:
    """Match `target`'s items to `source`'s by the normalised values of `fields`; a field
    either items table lacks, or no match at all, is a one-line DataError."""
    flag = f"--match-items-by {','.join(fields)}"
    if not fields:
        raise DataError("--match-items-by names no item field; e.g. --match-items-by "
                        "movie_title,release_year")
    for role, data in (("target", target), ("source", source)):
        columns = data.items.column_names
        missing = [f for f in fields if f not in columns]
        if missing:
            raise DataError(f"{flag}: the {role} dataset {data.path} has no item field "
                            f"{', '.join(map(repr, missing))} (its items have {columns})")
    first: dict[tuple[str, ...], int] = {}
    sharing: dict[tuple[str, ...], int] = {}
    for index, key in enumerate(_keys(source, fields), start=1):
        first.setdefault(key, index)
        sharing[key] = sharing.get(key, 0) + 1
    matched_target, matched_source = [], []
    ambiguous = blank = 0
    for index, key in enumerate(_keys(target, fields), start=1):
        if "" in key:
            blank += 1
        elif key in first:
            matched_target.append(index)
            matched_source.append(first[key])
            ambiguous += sharing[key] > 1
    if not matched_target:
        example = next((k for k in _keys(target, fields) if "" not in k), None)
        raise DataError(
            f"{flag}: 0 of {target.num_items} target items match a source item "
            f"({target.path} vs {source.path}; e.g. the target's {example} is no source "
            "item's); choose fields whose values both datasets share"
        )
    return ItemMatching(tuple(fields), tuple(matched_target), tuple(matched_source),
                        target.num_items, source.num_items, ambiguous, blank,
                        {"name": source.name, "path": str(Path(source.path).absolute()),
                         "fingerprint": source.fingerprint})


def _keys(data: SequenceData, fields: tuple[str, ...]) -> list[tuple[str, ...]]:
    columns = [[normalise_value(v) for v in data.items[f]] for f in fields]
    return list(zip(*columns, strict=True))


def load_source_dataset(base_dir: Path, dataset_fingerprint: str | None,
                        given: str | None, cache_dir: Path | None) -> SequenceData:
    """The dataset the base in `base_dir` was pretrained on: `given` (--source-dataset), or
    the one its run's config.json records; checked against the base's dataset fingerprint."""
    if given is not None:
        data = load_dataset_folder(resolve_dataset(given, cache_dir))
        if dataset_fingerprint is not None and data.fingerprint != dataset_fingerprint:
            raise DataError(
                f"--source-dataset {given} is not the dataset --pretrained {base_dir} was "
                f"trained on (fingerprint {data.fingerprint[:12]}, the model's "
                f"{dataset_fingerprint[:12]}); pass that dataset's folder"
            )
        return data
    hint = "pass --source-dataset DIR, the dataset it was pretrained on"
    recorded = _recorded_source(base_dir, dataset_fingerprint)
    if recorded is None:
        raise DataError(f"--match-items-by: no pretraining run config.json beside --pretrained "
                        f"{base_dir} names its source dataset; {hint}")
    try:
        data = load_dataset_folder(recorded)
    except DataError:
        raise DataError(f"--match-items-by: the source dataset of --pretrained {base_dir} is no "
                        f"longer at {recorded} (its run's config.json); {hint}") from None
    if dataset_fingerprint is not None and data.fingerprint != dataset_fingerprint:
        raise DataError(f"--match-items-by: {recorded}, the source dataset of --pretrained "
                        f"{base_dir}, has changed since pretraining (fingerprint "
                        f"{data.fingerprint[:12]}, the model's {dataset_fingerprint[:12]}); "
                        f"{hint}")
    return data


def _recorded_source(base_dir: Path, dataset_fingerprint: str | None) -> str | None:
    """The dataset path a pretraining run's config.json (beside or above the checkpoint)
    records for this checkpoint's dataset; None when there is none."""
    for folder in (base_dir.parent, base_dir):
        try:
            section = json.loads((folder / RUN_CONFIG).read_text())["dataset"]
            path, fingerprint = section["path"], section["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if dataset_fingerprint is None or fingerprint == dataset_fingerprint:
            return path
    return None


def carried_parameters(model: SequentialRecommender, matching: ItemMatching) -> list[str]:
    """The per-item parameters matching carries: those with one row per target item."""
    parameters = dict(model.named_parameters())
    return [name for name in model.catalog_parameter_names()
            if name in parameters and parameters[name].dim() >= 1
            and parameters[name].shape[0] == matching.target_items + 1]


def carry_matched_rows(model: SequentialRecommender, base_dir: Path, matching: ItemMatching,
                       unmatched: str = "fresh") -> list[str]:
    """Copy the base's rows of the matched source items into every per-item parameter of
    `model` (bit for bit); returns the parameters' names. `unmatched`: "fresh" keeps the
    other rows as initialised, "source_mean" sets them to the mean of the base's item rows
    (zero-shot: an unknown item is scored as the average source item)."""
    if unmatched not in UNMATCHED_INIT:
        raise ValueError(f"unmatched rows: {unmatched!r} is not one of {UNMATCHED_INIT}")
    names = carried_parameters(model, matching)
    if not names:
        raise ValueError(
            f"--match-items-by: the base model has no per-item parameters (its "
            f"{model.config.item_encoder!r} item encoder computes every item's vector from "
            "its content), so matching has nothing to carry; drop --match-items-by"
        )
    parameters = dict(model.named_parameters())
    target = torch.tensor(matching.target, dtype=torch.long)
    source = torch.tensor(matching.source, dtype=torch.long)
    with safe_open(str(base_dir / WEIGHTS_NAME), framework="pt") as weights:
        stored = set(weights.keys())
        absent = [name for name in names if name not in stored]
        if absent:
            raise CheckpointError(f"--match-items-by: --pretrained {base_dir} has no {absent} "
                                  "to carry; pass a checkpoint of the same architecture")
        rows = {name: weights.get_tensor(name) for name in names}
    with torch.no_grad():
        for name in names:
            parameter, base = parameters[name], rows[name]
            if (base.shape[0] != matching.source_items + 1
                    or base.shape[1:] != parameter.shape[1:]):
                raise CheckpointError(
                    f"--match-items-by: {name} of --pretrained {base_dir} has shape "
                    f"{tuple(base.shape)}, not one row per item of the source's "
                    f"{matching.source_items} (+ padding) of width {tuple(parameter.shape[1:])}"
                )
            base = base.to(parameter.dtype)
            if unmatched == "source_mean":
                parameter[1:] = base[1:].mean(0)
            parameter[target] = base[source]
    return names


class MatchedRows(nn.Module):
    """A parametrisation that composes a per-item tensor from frozen matched rows and
    trainable other rows: `weight = cat([frozen, trainable])[order]`.

    Why a split rather than a gradient hook or a restore after each step: AdamW's decoupled
    weight decay (`p -= lr * wd * p`) moves every row of a parameter it holds, with or
    without a gradient, and its moments would carry earlier updates; a hook that zeroes
    frozen rows' gradients cannot stop either, and restoring rows after each step needs a
    hook in the Trainer's loop. Here the matched rows are not in any optimizer at all (a
    parameter without `requires_grad`), so neither gradient, weight decay nor momentum can
    reach them, under any optimizer or process count; the trainable parameter (the
    parametrisation's `original`) holds exactly the other rows, which is what an adapter
    checkpoint saves. Cost: each read of the tensor composes it (one gather).
    """

    def __init__(self, tensor: torch.Tensor, rows: torch.Tensor) -> None:
        super().__init__()
        frozen = torch.zeros(tensor.shape[0], dtype=torch.bool, device=tensor.device)
        frozen[rows.to(tensor.device)] = True
        order = torch.empty(tensor.shape[0], dtype=torch.long, device=tensor.device)
        count = int(frozen.sum())
        order[frozen] = torch.arange(count, device=tensor.device)
        order[~frozen] = count + torch.arange(tensor.shape[0] - count, device=tensor.device)
        self.frozen = nn.Parameter(tensor.detach()[frozen].clone(), requires_grad=False)
        self.register_buffer("order", order)

    def forward(self, trainable: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.frozen, trainable])[self.order]

    def right_inverse(self, tensor: torch.Tensor) -> torch.Tensor:
        """The trainable rows (the unmatched ones, ascending) of a whole tensor."""
        return tensor[self.order >= len(self.frozen)]


def freeze_matched_rows(model: nn.Module, matching: ItemMatching, names: list[str]) -> None:
    """Freeze the matched rows of the parameters `names` (see `MatchedRows`); the other
    rows keep their `requires_grad`. Call it after adapters are injected (injection
    freezes and unfreezes whole parameters)."""
    rows = torch.tensor(matching.target, dtype=torch.long)
    for name in names:
        owner, _, attribute = name.rpartition(".")
        module = model.get_submodule(owner)
        parametrize.register_parametrization(
            module, attribute, MatchedRows(getattr(module, attribute), rows))


def plain_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None
                     ) -> dict[str, torch.Tensor]:
    """`state_dict` (default: the model's) with each frozen-row tensor composed back under
    its own name, as an unfrozen model has it: what a complete checkpoint stores."""
    state = dict(model.state_dict() if state_dict is None else state_dict)
    for module_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attribute, chain in module.parametrizations.items():
            if not isinstance(chain[0], MatchedRows):
                continue
            prefix = f"{module_name}." if module_name else ""
            stem = f"{prefix}parametrizations.{attribute}"
            trainable = state.pop(f"{stem}.original")
            frozen, order = state.pop(f"{stem}.0.frozen"), state.pop(f"{stem}.0.order")
            state[f"{prefix}{attribute}"] = torch.cat([frozen, trainable])[order]
    return state


def read_matching(directory: Path, record: dict) -> ItemMatching:
    """The mapping saved in `directory`, checked against its `record` in a config."""
    path = Path(directory) / MATCHING_FILE
    try:
        matching = ItemMatching.from_json(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory} was fine-tuned with items matched to the base's, "
                              f"but its {MATCHING_FILE} is missing; restore it") from None
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is malformed ({error})") from None
    if matching.fingerprint != record.get("fingerprint"):
        raise CheckpointError(f"{path} is not the item matching {directory} was trained with "
                              "(another fingerprint); restore the original file")
    return matching
